"""SFT data: conversations, in any format formats.py reads, from any source sources.py reads,
to `input_ids` and `labels`, mixed as mixing.py says.

Each file's format is detected from its first record with a format key (or named by
`data_format` or the dataset's `format`); every record is converted to role messages and
checked, and problems are reported as `file:line` (or `path:index`). Each dataset is read,
converted and tokenized on its own before the datasets are mixed. Tokenization renders the whole
conversation with the template, labels exactly the assistant replies and
their end-of-turn tokens, and then truncates in one place (`truncate`). An
example left with no supervised token is dropped and counted.

A checked record is `{"system": str | None, "messages": [Message.to_dict(), ...], "tools"?: [...]}`
(the turns, with the system prompt apart, as the converters give it). What of each conversation is
learned, and how many examples it gives, is supervision.py's `render_examples`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from datasets import Dataset

from component.config import AUTO_DATA_FORMAT
from component.data.formats import FORMATS, Conversation, FileFormat, convert
from component.data.jsonl import Problem, raise_problems
from component.data.mixing import mix, resize
from component.data.sources import DatasetSpec, read_source
from component.data.supervision import Supervision, render_examples, supervision
from component.data.template import (
    IGNORE_INDEX,
    Encoded,
    Message,
    Template,
    TemplateError,
    encode,
    render,
    rich_parts,
    rich_refusal,
)

INVALID_EXAMPLES_FILE = "invalid_examples.txt"
SKIP_HINT = "Fix these lines, or set skip_invalid_examples: true to train without them."


def check_conversation(obj: Any) -> Union[dict, str]:
    """A clean record of our own format, `{"conversation": [...], "system": ...}` (script/evaluate.py
    reads it), or a string naming what is wrong."""
    converted = convert(obj, FORMATS["conversation"])
    if isinstance(converted, str):
        return converted
    return {"conversation": obj["conversation"], "system": converted.system}


def as_record(conversation: Conversation) -> dict:
    """A converted conversation as a record (JSON-able)."""
    record = {"system": conversation.system, "messages": [m.to_dict() for m in conversation.messages]}
    if conversation.tools:
        record["tools"] = conversation.tools
    return record


def record_messages(record: dict) -> list[Message]:
    """A checked record's messages as the templates take them: the system prompt first, when there is one."""
    turns = [Message.from_dict(m) for m in record["messages"]]
    return Conversation(record.get("system"), turns).all_messages()


def refused_rich(record: dict, template: Optional[Template]) -> Optional[str]:
    """Why a named template cannot render this record's tool calls, tool results, reasoning or tools."""
    if not isinstance(template, Template):
        return None
    rich = rich_parts(record_messages(record), record.get("tools"))
    return rich_refusal(template, rich) if rich else None


def refused_system(record: dict, template: Optional[Template]) -> Optional[str]:
    """Why `template` cannot render this record's system prompt, or None."""
    system_mode = getattr(template, "system_mode", None)  # an `auto` template renders any system prompt
    if record.get("system") is not None and system_mode == "refuse":
        return (
            f"'system': template {template.name!r} has no system role ({template.system_note}); "
            "remove the system prompt or choose a template with one"
        )
    return None


class SFTRead(NamedTuple):
    """Checked records, the lines that failed, each file's format, and the top-level keys ignored."""

    records: list[dict]
    problems: list[Problem]
    formats: dict[str, str]
    """file -> the format it was read as (files with no valid record are left out)."""
    ignored_keys: list[str] = []
    """Top-level keys no format reads (`id`, `category`, ...), ignored; listed once in the summary."""


def rendering_problem(record: dict, template, tokenizer) -> Optional[str]:
    """Why a chat template (auto) cannot render a record with tool calls, results or reasoning,
    found when the record is read, so that it names its line."""
    if tokenizer is None or isinstance(template, Template) or template is None:
        return None
    messages = record_messages(record)
    if not rich_parts(messages, record.get("tools")):
        return None
    try:
        render(template, tokenizer, messages, tools=record.get("tools"))
    except TemplateError as exc:
        return str(exc)
    return None


def template_problem(record: dict, template, tokenizer=None) -> Optional[str]:
    """Why the template cannot render this record (its system prompt, tool calls, reasoning), or None."""
    return (
        refused_system(record, template)
        or refused_rich(record, template)
        or rendering_problem(record, template, tokenizer)
    )


def _checker(file_format: FileFormat, template: Optional[Template], ignored: set[str], tokenizer=None):
    def check(obj: Any) -> Union[dict, str]:
        converted = file_format.check(obj)
        if isinstance(converted, str):
            return converted
        record = as_record(converted)
        problem = template_problem(record, template, tokenizer)
        if problem:
            return problem
        ignored.update(converted.ignored)
        return record

    return check


def read_dataset(spec: DatasetSpec, template: Optional[Template] = None, tokenizer=None) -> SFTRead:
    """Read and check one dataset, each file in its own format (or spec.format), against
    `template` too when given; problems are returned, not raised."""
    file_formats: list[FileFormat] = []
    ignored: set[str] = set()

    def make_check():
        file_formats.append(FileFormat(spec.format, spec.roles))  # detection starts afresh in every file
        return _checker(file_formats[-1], template, ignored, tokenizer)

    records: list[dict] = []
    problems: list[Problem] = []
    formats: dict[str, str] = {}
    for piece, file_format in zip(read_source(spec, make_check), file_formats, strict=True):
        records += piece.records
        problems += piece.problems
        if piece.records:
            formats[piece.name] = file_format.format.name
    return SFTRead(records, problems, formats, sorted(ignored))


def read_conversations(
    path: str,
    skip_invalid: bool = False,
    template: Optional[Template] = None,
    data_format: str = AUTO_DATA_FORMAT,
) -> SFTRead:
    """Read and check a file or folder (any source sources.py reads), each file in its own format,
    against `template` too when given; raise on problems unless skipping."""
    return read_checked([DatasetSpec(path, format=data_format)], skip_invalid, template)[0]


def read_checked(
    specs: Sequence[DatasetSpec], skip_invalid: bool, template: Optional[Template], tokenizer=None
) -> list[SFTRead]:
    """Every dataset read; all their problems raised at once unless skipping, and a dataset
    with no valid record raised either way. With the tokenizer, records that only a chat
    template renders (tools, reasoning) are rendered as they are read."""
    reads = [read_dataset(spec, template, tokenizer) for spec in specs]
    problems = [p for read in reads for p in read.problems]
    names = ", ".join(spec.path for spec in specs)
    if problems and not skip_invalid:
        raise_problems(names, problems, SKIP_HINT)
    for spec, read in zip(specs, reads, strict=True):
        if not read.records:
            raise_problems(spec.path, read.problems or [Problem(spec.path, 1, "no valid examples")])
    return reads


def describe_formats(formats: dict[str, str]) -> str:
    """One format name, or each file's where a folder mixes them."""
    names = sorted(set(formats.values()))
    if len(names) <= 1:
        return names[0] if names else "none"
    return ", ".join(f"{Path(file).name}: {name}" for file, name in formats.items())


def truncate(encoded: Encoded, max_len: int) -> tuple[Encoded, bool]:
    """The one place where examples are cut: keep the first `max_len` tokens."""
    if len(encoded.input_ids) <= max_len:
        return encoded, False
    return Encoded(encoded.input_ids[:max_len], encoded.labels[:max_len]), True


def tokenized_example(encoded: Encoded, max_len: int) -> dict:
    """An encoded conversation, truncated, with its counts: one row of the training set."""
    encoded, was_cut = truncate(encoded, max_len)
    supervised = sum(1 for x in encoded.labels if x != IGNORE_INDEX)
    return {
        "input_ids": encoded.input_ids,
        "labels": encoded.labels,
        "truncated": was_cut,
        "num_supervised": supervised,
    }


def tokenize_record(
    record: dict, template: Template, tokenizer, max_len: int, options: Supervision = Supervision()
) -> list[dict]:
    """A checked record (any format, converted) as its training examples (one, or one per turn
    under reasoning_history per_turn)."""
    examples = render_examples(template, tokenizer, record_messages(record), record.get("tools"), options)
    return [tokenized_example(encode(tokenizer, rendered), max_len) for rendered in examples]


def _tokenize_batch(batch: dict, template: Template, tokenizer, max_len: int, options: Supervision) -> dict:
    """datasets.map, batched: records (as JSON, whose nested shapes Arrow cannot hold) to examples."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "num_supervised": []}
    for text in batch["record"]:
        for example in tokenize_record(json.loads(text), template, tokenizer, max_len, options):
            for key, value in example.items():
                out[key].append(value)
    return out


@dataclass
class SourceSummary:
    """One dataset of a mixture: what it holds after tokenization, and what the mixture took."""

    path: str
    data_format: str
    examples: int
    tokens: int
    supervised_tokens: int
    truncated: int
    dropped_no_supervised: int
    invalid_lines: int
    mixed_examples: int
    """Examples this dataset gave to the mixture (num_samples, or drawn by weight)."""
    share: float
    """mixed_examples over the mixture's examples: the realised share."""

    def describe(self) -> str:
        return (
            f"{self.path} (format {self.data_format}): {self.examples} examples, {self.tokens} tokens, "
            f"{self.supervised_tokens} supervised; {self.mixed_examples} in the mixture, share {self.share:.1%}"
        )


@dataclass
class DataSummary:
    """What the data holds after tokenization and mixing; logged at start-up."""

    examples: int
    tokens: int
    supervised_tokens: int
    truncated: int
    dropped_no_supervised: int
    invalid_lines: int
    data_format: str
    """The format the data was read as (formats.py), per file where a folder mixes them."""
    datasets: list[SourceSummary] = field(default_factory=list)
    """Each dataset of the list (one for train_file), with its realised share."""
    ignored_keys: list[str] = field(default_factory=list)
    """Top-level record keys no format reads (`id`, `category`, ...): ignored, listed once here."""

    @classmethod
    def from_dict(cls, d: dict) -> DataSummary:
        """As dataclasses.asdict wrote it (the data cache)."""
        return cls(**{**d, "datasets": [SourceSummary(**x) for x in d.get("datasets", [])]})

    def describe(self) -> str:
        text = (
            f"format {self.data_format}; {self.examples} examples, {self.tokens} tokens, {self.supervised_tokens} supervised; "
            f"{self.truncated} truncated, {self.dropped_no_supervised} dropped with no supervised token "
            f"after truncation, {self.invalid_lines} invalid lines skipped"
        )
        if self.ignored_keys:
            text += f"; ignored record keys: {', '.join(self.ignored_keys)}"
        if len(self.datasets) > 1:
            text += "".join(f"\n  - {d.describe()}" for d in self.datasets)
        return text


class SFTData:
    """A tokenized SFT dataset and its summary."""

    def __init__(self, dataset: Dataset, summary: DataSummary, problems: list[Problem]):
        self.dataset = dataset
        self.summary = summary
        self.problems = problems


class Tokenized(NamedTuple):
    kept: Dataset
    truncated: int
    dropped: int


def tokenize_records(
    records: list[dict],
    template: Template,
    tokenizer,
    max_len: int,
    num_workers: int,
    options: Supervision = Supervision(),
) -> Tokenized:
    raw = Dataset.from_dict({"record": [json.dumps(r, ensure_ascii=False) for r in records]})
    tokenized = raw.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"template": template, "tokenizer": tokenizer, "max_len": max_len, "options": options},
        remove_columns=raw.column_names,
        num_proc=num_workers if num_workers > 1 and len(raw) >= num_workers else None,
        desc="Tokenizing",
    )
    kept = tokenized.filter(lambda n: n > 0, input_columns="num_supervised")
    return Tokenized(kept, sum(tokenized["truncated"]), len(tokenized) - len(kept))


def _source_summary(spec: DatasetSpec, read: SFTRead, tok: Tokenized, mixed: int, total: int) -> SourceSummary:
    return SourceSummary(
        path=spec.path,
        data_format=describe_formats(read.formats),
        examples=len(tok.kept),
        tokens=sum(len(x) for x in tok.kept["input_ids"]),
        supervised_tokens=sum(tok.kept["num_supervised"]),
        truncated=tok.truncated,
        dropped_no_supervised=tok.dropped,
        invalid_lines=len(read.problems),
        mixed_examples=mixed,
        share=mixed / total if total else 0.0,
    )


def build_sft_mixture(
    specs: Sequence[DatasetSpec],
    template: Template,
    tokenizer,
    max_len: int,
    num_workers: int = 1,
    skip_invalid: bool = False,
    strategy: str = "concatenate",
    seed: int = 42,
    empty_think: str = "supervised",
    reasoning_history: str = "whole",
) -> SFTData:
    """Each dataset read, converted and tokenized on its own (its own format and train_on), then
    mixed (component/data/mixing.py); the summary gives each dataset's realised share."""
    reads = read_checked(specs, skip_invalid, template, tokenizer)
    parts = [
        tokenize_records(
            r.records,
            template,
            tokenizer,
            max_len,
            num_workers,
            supervision(s.train_on, empty_think, reasoning_history),
        )
        for s, r in zip(specs, reads, strict=True)
    ]
    for spec, part in zip(specs, parts, strict=True):
        if len(part.kept) == 0:
            raise_problems(
                spec.path, [Problem(spec.path, 0, f"no example keeps a supervised token at max_seq_length={max_len}")]
            )
    sized = [resize(p.kept, s.num_samples, seed) for s, p in zip(specs, parts, strict=True)]
    mixed = mix(sized, strategy, seed, [s.weight for s in specs])
    data = mixed.dataset
    sources = [
        _source_summary(s, r, p, n, len(data)) for s, r, p, n in zip(specs, reads, parts, mixed.counts, strict=True)
    ]
    formats = {file: name for r in reads for file, name in r.formats.items()}
    summary = DataSummary(
        examples=len(data),
        tokens=sum(len(x) for x in data["input_ids"]),
        supervised_tokens=sum(data["num_supervised"]),
        truncated=sum(p.truncated for p in parts),
        dropped_no_supervised=sum(p.dropped for p in parts),
        invalid_lines=sum(len(r.problems) for r in reads),
        data_format=describe_formats(formats),
        datasets=sources,
        ignored_keys=sorted({k for r in reads for k in r.ignored_keys}),
    )
    problems = [p for r in reads for p in r.problems]
    return SFTData(data.remove_columns(["truncated", "num_supervised"]), summary, problems)


def build_sft_dataset(
    path: str,
    template: Template,
    tokenizer,
    max_len: int,
    num_workers: int = 1,
    skip_invalid: bool = False,
    data_format: str = AUTO_DATA_FORMAT,
) -> SFTData:
    """One file or folder (train_file): a one-dataset mixture."""
    spec = DatasetSpec(path, format=data_format)
    return build_sft_mixture([spec], template, tokenizer, max_len, num_workers, skip_invalid)


def save_problems(problems: list[Problem], output_dir: str) -> Optional[Path]:
    if not problems:
        return None
    path = Path(output_dir) / INVALID_EXAMPLES_FILE
    path.write_text("".join(f"{p}\n" for p in problems), encoding="utf-8")
    return path


def save_summary(summary: DataSummary, output_dir: str, name: str = "data_summary.json") -> None:
    (Path(output_dir) / name).write_text(json.dumps(asdict(summary), indent=2) + "\n")
