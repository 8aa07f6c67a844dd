"""See what training sees: rendered SFT examples with the supervised text marked, and the data report.

    python script/inspect_data.py --train_args_file train_args/smollm2-135m-sft-lora.json [--index N] [--num 3]
                                  [--dump OUT.jsonl] [--color auto|always|never] [--key value ...]

Loads only the tokenizer (never the model) and the same template, tokenization and truncation as
train.py. Supervised text (each assistant reply and its end-of-turn token) is shown in green in a
terminal, or between [[ and ]] otherwise; where an example is cut at max_seq_length, a ✂ marks the
cut and the text after it is left out. The report gives examples, tokens, supervised tokens,
truncated and dropped examples, and a length histogram. `--dump` writes one JSON line per training example: {"input_ids", "labels"}.
Flags after the file override its values, as in train.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from component.config import load_config  # noqa: E402
from component.errors import USER_ERROR_EXIT_CODE, ConfigError, UserError  # noqa: E402
from component.model import load_tokenizer  # noqa: E402
from component.sft_data import build_sft_dataset, read_conversations, truncate  # noqa: E402
from component.template import IGNORE_INDEX, conversation_messages, encode, render, resolve_template  # noqa: E402

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "[[", "]]"
CUT = "✂"
HISTOGRAM_BINS = 8
BAR_WIDTH = 40


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_args_file", required=True, help="The training config (JSON), as for train.py.")
    p.add_argument("--index", type=int, default=0, help="First example to show (0-based line of valid examples).")
    p.add_argument("--num", type=int, default=3, help="How many examples to show.")
    p.add_argument("--dump", help="Write input_ids and labels of every training example to this JSONL file.")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return p.parse_known_args(argv)


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


def show_example(n: int, record: dict, template, tokenizer, max_len: int, color: bool) -> str:
    rendered = render(template, tokenizer, conversation_messages(record["conversation"], record.get("system")))
    full = encode(tokenizer, rendered)
    kept, was_cut = truncate(full, max_len)
    offsets = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    supervised = sum(1 for x in kept.labels if x != IGNORE_INDEX)
    status = "DROPPED: no supervised token left" if supervised == 0 else ("truncated" if was_cut else "kept whole")
    header = (
        f"── example {n}: {len(kept.input_ids)} tokens"
        f"{f' (of {len(full.input_ids)})' if was_cut else ''}, {supervised} supervised, {status}"
    )
    return header + "\n" + marked_text(rendered.text, offsets, kept.labels, len(kept.input_ids), color)


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


def report(summary, lengths: list[int], max_len: int) -> str:
    lines = [
        "── data report",
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


def run(argv: Sequence[str], out=sys.stdout) -> None:
    args, rest = parse_args(argv)
    config = load_config(["--train_args_file", args.train_args_file, *rest], runnable=False)
    if config.method.task_type != "sft":
        raise ConfigError(
            f"inspect_data shows SFT conversations; {args.train_args_file} has task_type {config.method.task_type!r}"
        )
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config.data.template_name, tokenizer, config.model.model_name_or_path)
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    data = config.data
    stop = template.stop_text(tokenizer)
    print(
        f"template {template.name!r}: stop token {stop!r} (id {tokenizer.convert_tokens_to_ids(stop)}); "
        f"source: {template.source}",
        file=out,
    )
    records = read_conversations(data.train_file, data.skip_invalid_examples, template).records
    for n in range(args.index, min(args.index + args.num, len(records))):
        print(show_example(n, records[n], template, tokenizer, data.max_seq_length, color), file=out)
    built = build_sft_dataset(
        data.train_file, template, tokenizer, data.max_seq_length, skip_invalid=data.skip_invalid_examples
    )
    lengths = [len(x) for x in built.dataset["input_ids"]]
    print(report(built.summary, lengths, data.max_seq_length), file=out)
    if args.dump:
        dump(built.dataset, args.dump)
        print(f"wrote {len(lengths)} examples to {args.dump}", file=out)


def dump(dataset, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True):
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
