"""SFT data: conversations, in any format formats.py reads, from any source sources.py reads,
to `input_ids` and `labels`, mixed as mixing.py says.

Each file's format is detected from its first record with a format key (or named by
`data_format` or the dataset's `format`); every record is converted to role messages and
checked, and problems are reported as `file:line` (or `path:index`). Each dataset is read,
converted and tokenized on its own before the datasets are mixed. Tokenization renders the whole
conversation with the template, labels exactly the assistant replies and
their end-of-turn tokens, and then truncates in one place (`truncate`). An
example left with no supervised token is dropped and counted.

A checked record is `{"system": str | None, "messages": [{"role", "content"}, ...]}`
(user and assistant turns; the system prompt apart, as the converters give it).
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
from component.data.template import (
    IGNORE_INDEX,
    Encoded,
    Message,
    Template,
    conversation_messages,
    encode_messages,
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
    """A converted conversation as a dataset row."""
    return {"system": conversation.system, "messages": [m._asdict() for m in conversation.messages]}


def record_messages(record: dict) -> list[Message]:
    """A checked record's messages as the templates take them: the system prompt first, when there is one."""
    turns = [Message(m["role"], m["content"]) for m in record["messages"]]
    return Conversation(record.get("system"), turns).all_messages()


def refused_system(record: dict, template: Optional[Template]) -> Optional[str]:
    """Why `template` cannot render this record's system prompt, or None."""
    system_mode = getattr(template, "system_mode", None)  # an `auto` template renders any system prompt
    if record.get("system") and system_mode == "refuse":
        return (
            f"'system': template {template.name!r} has no system role ({template.system_note}); "
            "remove the system prompt or choose a template with one"
        )
    return None


class SFTRead(NamedTuple):
    """Checked records, the lines that failed, and each file's format."""

    records: list[dict]
    problems: list[Problem]
    formats: dict[str, str]
    """file -> the format it was read as (files with no valid record are left out)."""


def _checker(file_format: FileFormat, template: Optional[Template]):
    def check(obj: Any) -> Union[dict, str]:
        converted = file_format.check(obj)
        if isinstance(converted, str):
            return converted
        record = as_record(converted)
        return refused_system(record, template) or record

    return check


def read_dataset(spec: DatasetSpec, template: Optional[Template] = None) -> SFTRead:
    """Read and check one dataset, each file in its own format (or spec.format), against
    `template` too when given; problems are returned, not raised."""
    file_formats: list[FileFormat] = []

    def make_check():
        file_formats.append(FileFormat(spec.format))  # detection starts afresh in every file
        return _checker(file_formats[-1], template)

    records: list[dict] = []
    problems: list[Problem] = []
    formats: dict[str, str] = {}
    for piece, file_format in zip(read_source(spec, make_check), file_formats, strict=True):
        records += piece.records
        problems += piece.problems
        if piece.records:
            formats[piece.name] = file_format.format.name
    return SFTRead(records, problems, formats)


def read_conversations(
    path: str,
    skip_invalid: bool = False,
    template: Optional[Template] = None,
    data_format: str = AUTO_DATA_FORMAT,
) -> SFTRead:
    """Read and check a file or folder (any source sources.py reads), each file in its own format,
    against `template` too when given; raise on problems unless skipping."""
    return read_checked([DatasetSpec(path, format=data_format)], skip_invalid, template)[0]


def read_checked(specs: Sequence[DatasetSpec], skip_invalid: bool, template: Optional[Template]) -> list[SFTRead]:
    """Every dataset read; all their problems raised at once unless skipping, and a dataset
    with no valid record raised either way."""
    reads = [read_dataset(spec, template) for spec in specs]
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


def tokenize_messages(messages: Sequence[Message], template: Template, tokenizer, max_len: int) -> dict:
    encoded, was_cut = truncate(encode_messages(template, tokenizer, messages), max_len)
    supervised = sum(1 for x in encoded.labels if x != IGNORE_INDEX)
    return {
        "input_ids": encoded.input_ids,
        "labels": encoded.labels,
        "truncated": was_cut,
        "num_supervised": supervised,
    }


def tokenize_record(record: dict, template: Template, tokenizer, max_len: int) -> dict:
    """A checked record (any format, converted) as a training example."""
    return tokenize_messages(record_messages(record), template, tokenizer, max_len)


def tokenize_conversation(record: dict, template: Template, tokenizer, max_len: int) -> dict:
    """A record of our own format, `{"conversation", "system"}`, as a training example (evaluation)."""
    messages = conversation_messages(record["conversation"], record.get("system"))
    return tokenize_messages(messages, template, tokenizer, max_len)


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

    def describe(self) -> str:
        text = (
            f"format {self.data_format}; {self.examples} examples, {self.tokens} tokens, {self.supervised_tokens} supervised; "
            f"{self.truncated} truncated, {self.dropped_no_supervised} dropped with no supervised token "
            f"after truncation, {self.invalid_lines} invalid lines skipped"
        )
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


def tokenize_records(records: list[dict], template: Template, tokenizer, max_len: int, num_workers: int) -> Tokenized:
    raw = Dataset.from_list(records)
    tokenized = raw.map(
        tokenize_record,
        fn_kwargs={"template": template, "tokenizer": tokenizer, "max_len": max_len},
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
) -> SFTData:
    """Each dataset read, converted and tokenized on its own (its own format), then mixed
    (component/data/mixing.py); the summary gives each dataset's realised share."""
    reads = read_checked(specs, skip_invalid, template)
    parts = [tokenize_records(r.records, template, tokenizer, max_len, num_workers) for r in reads]
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
