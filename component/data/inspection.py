"""Seeing what training sees: rendered SFT examples with the supervised text marked, and the data report.

The examples go through the same template, tokenization and truncation as
training. Supervised text (each assistant reply and its end-of-turn token) is
shown in green on a terminal, or between [[ and ]] otherwise; where an example
is cut at max_seq_length, a ✂ marks the cut and the text after it is left out.
The report gives examples, tokens, supervised tokens, truncated and dropped
examples, and a length histogram. Loading the config and the tokenizer is the
caller's (component/cli.py), so this module stays in the data layer.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Literal, Optional, TextIO

from component.config import Config
from component.data.cache import cache_root
from component.data.packing import load_packed
from component.data.preference import build_preference_dataset
from component.data.sft import DataSummary, build_sft_mixture, read_checked, record_messages, truncate
from component.data.splits import dataset_specs, mix_seed
from component.data.supervision import Supervision, render_examples, supervision, turn_parts
from component.data.template import IGNORE_INDEX, encode
from component.data.tokenizer_template import resolve_template, use_chat_template_file

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "[[", "]]"
CUT = "✂"
HISTOGRAM_BINS = 8
BAR_WIDTH = 40
COLOR_CHOICES = ("auto", "always", "never")


@dataclass(frozen=True)
class InspectOptions:
    """Which examples to show, how, and where to dump the tokenized training set."""

    index: int = 0
    """First example to show (0-based line of valid examples)."""
    num: int = 3
    """How many examples to show."""
    dump: Optional[str] = None
    """Write input_ids and labels of every training example to this JSONL file."""
    color: Literal["auto", "always", "never"] = "auto"
    """auto: colour on a terminal, [[ ]] marks elsewhere."""


def marked_text(text: str, offsets, labels, kept: int, color: bool) -> str:
    """The rendered text with supervised characters marked and the truncation point shown."""
    sup = [False] * len(text)
    for (start, end), lab in zip(offsets[:kept], labels[:kept], strict=True):
        if lab != IGNORE_INDEX:
            sup[start:end] = [True] * (end - start)
    cut_at = offsets[kept - 1][1] if kept < len(offsets) else None
    opening, closing = (GREEN, RESET) if color else (OPEN, CLOSE)
    out, inside = [], False
    for i, ch in enumerate(text):
        if i == cut_at:
            dropped = len(offsets) - kept
            out.append((closing if inside else "") + f"{CUT} cut here: {dropped} more tokens are not trained on")
            return "".join(out)
        if sup[i] != inside:
            out.append(opening if sup[i] else closing)
            inside = sup[i]
        out.append(ch)
    return "".join(out) + (closing if inside else "")


def show_example(
    n: int, record: dict, template, tokenizer, max_len: int, color: bool, options: Supervision = Supervision()
) -> str:
    """Example n as training sees it (several where reasoning_history is per_turn), then a line per
    assistant turn: the tokens learned of its reasoning, reply and tool calls."""
    messages, tools = record_messages(record), record.get("tools")
    shown = []
    for j, rendered in enumerate(render_examples(template, tokenizer, messages, tools, options)):
        full = encode(tokenizer, rendered)
        kept, was_cut = truncate(full, max_len)
        offsets = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        supervised = sum(1 for x in kept.labels if x != IGNORE_INDEX)
        status = "DROPPED: no supervised token left" if supervised == 0 else ("truncated" if was_cut else "kept whole")
        header = (
            f"── example {n}{f'.{j}' if j else ''}: {len(kept.input_ids)} tokens"
            f"{f' (of {len(full.input_ids)})' if was_cut else ''}, {supervised} supervised, {status}"
        )
        shown.append(header + "\n" + marked_text(rendered.text, offsets, kept.labels, len(kept.input_ids), color))
        if j == 0:
            shown.append(_part_lines(template, tokenizer, messages, tools, options, offsets, kept.labels))
    return "\n".join(shown)


def _part_lines(template, tokenizer, messages, tools, options: Supervision, offsets, labels) -> str:
    """Per message: what it is, and for an assistant turn the supervised tokens of each part."""
    parts = dict(turn_parts(template, tokenizer, messages, tools, options.empty_think))
    lines = []
    for k, m in enumerate(messages):
        if k not in parts:
            lines.append(f"   [{k}] {m.role}: not learned")
            continue
        counts = []
        for name, (start, end) in parts[k].items():
            if end <= start:
                continue
            # labels stop where the example is cut; the tokens after the cut are not learned
            inside = [lab for (s, e), lab in zip(offsets, labels, strict=False) if s < end and e > start]
            counts.append(f"{name} {sum(lab != IGNORE_INDEX for lab in inside)}/{len(inside)}")
        lines.append(f"   [{k}] assistant, tokens learned: {', '.join(counts)}")
    return "\n".join(lines)


def histogram(lengths: list[int], max_len: int) -> list[str]:
    width = max(1, -(-max_len // HISTOGRAM_BINS))
    counts = [0] * HISTOGRAM_BINS
    for n in lengths:
        counts[min((n - 1) // width, HISTOGRAM_BINS - 1)] += 1
    top = max(counts) or 1
    lines = []
    for i, c in enumerate(counts):
        lo, hi = i * width + 1, min((i + 1) * width, max_len)
        lines.append(f"  {lo:>6}-{hi:<6} {c:>6} {'#' * round(BAR_WIDTH * c / top)}")
    return lines


def report(summary: DataSummary, lengths: list[int], max_len: int) -> str:
    lines = [
        "── data report",
        f"  format:             {summary.data_format}",
        f"  examples:           {summary.examples}",
        f"  tokens:             {summary.tokens}",
        f"  supervised tokens:  {summary.supervised_tokens}"
        f" ({100 * summary.supervised_tokens / max(summary.tokens, 1):.1f}%)",
        f"  truncated:          {summary.truncated} (at max_seq_length {max_len})",
        f"  dropped:            {summary.dropped_no_supervised} (no supervised token after truncation)",
        f"  invalid lines:      {summary.invalid_lines}",
        "  length histogram (tokens per example):",
    ]
    return "\n".join(lines + histogram(lengths, max_len))


def dump(dataset, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True):
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")


def show_sft_data(config: Config, tokenizer, options: InspectOptions, out: Optional[TextIO] = None) -> None:
    """Write the template's stop token, the chosen examples marked, and the report to `out`."""
    out = out or sys.stdout
    use_chat_template_file(tokenizer, config.data.chat_template)
    template = resolve_template(config.data.template_name, tokenizer, config.model.model_name_or_path)
    color = options.color == "always" or (options.color == "auto" and out.isatty())
    data = config.data
    stop = template.stop_text(tokenizer)
    out.write(
        f"template {template.name!r}: stop token {stop!r} (id {tokenizer.convert_tokens_to_ids(stop)}); "
        f"source: {template.source}\n"
    )
    specs = dataset_specs(data.datasets, data.train_file, data.data_format)  # train_file or a `datasets` list
    reads = read_checked(specs, data.skip_invalid_examples, template, tokenizer)
    shown = [
        (record, supervision(spec.train_on, data.empty_think_block, data.reasoning_history))
        for spec, read in zip(specs, reads, strict=True)
        for record in read.records
    ]
    for n in range(options.index, min(options.index + options.num, len(shown))):
        record, supervised = shown[n]
        out.write(show_example(n, record, template, tokenizer, data.max_seq_length, color, supervised) + "\n")
    built = build_sft_mixture(
        specs,
        template,
        tokenizer,
        data.max_seq_length,
        skip_invalid=data.skip_invalid_examples,
        strategy=data.mix_strategy,
        seed=mix_seed(config),
        empty_think=data.empty_think_block,
        reasoning_history=data.reasoning_history,
    )
    lengths = [len(x) for x in built.dataset["input_ids"]]
    out.write(report(built.summary, lengths, data.max_seq_length) + "\n")
    if options.dump:
        dump(built.dataset, options.dump)
        out.write(f"wrote {len(lengths)} examples to {options.dump}\n")


# ---------------------------------------------------------------- DPO pairs


def show_pair(n: int, row: dict, tokenizer, color: bool) -> str:
    """One pair as DPO trains on it: the shared prompt (not learned), then each reply, marked as learned."""
    opening, closing = (GREEN, RESET) if color else (OPEN, CLOSE)
    prompt = tokenizer.decode(row["prompt_ids"])
    lines = [f"── pair {n}: prompt {len(row['prompt_ids'])} tokens (not learned)", prompt]
    for side in ("chosen", "rejected"):
        ids = row[f"{side}_ids"]
        lines.append(f"── {side}: {len(ids)} tokens, learned")
        lines.append(f"{opening}{tokenizer.decode(ids)}{closing}")
    return "\n".join(lines)


def show_dpo_data(config: Config, tokenizer, options: InspectOptions, out: Optional[TextIO] = None) -> None:
    """The pairs DPO trains on (prompt, chosen and rejected, with what is learned) and the data report."""
    out = out or sys.stdout
    use_chat_template_file(tokenizer, config.data.chat_template)
    template = resolve_template(config.data.template_name, tokenizer, config.model.model_name_or_path)
    color = options.color == "always" or (options.color == "auto" and out.isatty())
    data = config.data
    built = build_preference_dataset(
        data.train_file,
        template,
        tokenizer,
        data.max_seq_length,
        data.max_prompt_length,
        data.skip_invalid_examples,
        data.empty_think_block,
    )
    for n in range(options.index, min(options.index + options.num, len(built.dataset))):
        out.write(show_pair(n, built.dataset[n], tokenizer, color) + "\n")
    out.write(f"── data report\n  {built.summary.describe()}\n")
    if options.dump:
        built.dataset.to_json(options.dump)
        out.write(f"wrote {len(built.dataset)} pairs to {options.dump}\n")


# ---------------------------------------------------------------- pretraining blocks

DOC_MARK = "¶"  # where a document starts inside a block (its first token learns nothing)


def show_block(n: int, row: dict, tokenizer) -> str:
    """One packed block, a ¶ before every document start after the first (position_ids restart there)."""
    ids, positions = list(row["input_ids"]), list(row["position_ids"])
    starts = [i for i, p in enumerate(positions) if p == 0]
    pieces = [tokenizer.decode(ids[a:b]) for a, b in zip(starts, [*starts[1:], len(ids)], strict=True)]
    return f"── block {n}: {len(ids)} tokens, {len(starts)} document piece(s)\n" + DOC_MARK.join(pieces)


def show_pretrain_data(config: Config, tokenizer, options: InspectOptions, out: Optional[TextIO] = None) -> None:
    """The packed blocks pretraining trains on, with document boundaries, and the data report."""
    out = out or sys.stdout
    data = config.data
    built = load_packed(
        data.train_file,
        tokenizer,
        data.max_seq_length,
        cache_root(config),
        data.tokenize_num_workers,
        data.skip_invalid_examples,
    )
    for n in range(options.index, min(options.index + options.num, len(built.dataset))):
        out.write(show_block(n, built.dataset[n], tokenizer) + "\n")
    out.write(f"── data report\n  {built.summary.describe()}\n")
