"""SFT data: JSONL conversations, in any format formats.py reads, to `input_ids` and `labels`.

Each file's format is detected from its first record with a format key (or named by
`data_format`); every line is converted to role messages and checked, and
problems are reported as `file:line`. Tokenization renders the whole
conversation with the template, labels exactly the assistant replies and
their end-of-turn tokens, and then truncates in one place (`truncate`). An
example left with no supervised token is dropped and counted.

A checked record is `{"system": str | None, "messages": [{"role", "content"}, ...]}`
(user and assistant turns; the system prompt apart, as the converters give it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from datasets import Dataset

from component.config import AUTO_DATA_FORMAT
from component.data.formats import FORMATS, Conversation, FileFormat, convert
from component.data.jsonl import Problem, jsonl_files, raise_problems, read_jsonl
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


def read_conversations(
    path: str,
    skip_invalid: bool = False,
    template: Optional[Template] = None,
    data_format: str = AUTO_DATA_FORMAT,
) -> SFTRead:
    """Read and check a file (or a folder of *.jsonl files), each in its own format, against
    `template` too when given; raise on problems unless skipping."""
    records: list[dict] = []
    problems: list[Problem] = []
    formats: dict[str, str] = {}
    for file in jsonl_files(path):
        file_format = FileFormat(data_format)  # detection starts afresh in every file
        result = read_jsonl(str(file), _checker(file_format, template))
        records += result.records
        problems += result.problems
        if result.records:
            formats[str(file)] = file_format.format.name
    if problems and not skip_invalid:
        raise_problems(path, problems, SKIP_HINT)
    if not records:
        raise_problems(path, problems or [Problem(path, 1, "no valid examples")])
    return SFTRead(records, problems, formats)


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
class DataSummary:
    """What the data holds after tokenization; logged at start-up."""

    examples: int
    tokens: int
    supervised_tokens: int
    truncated: int
    dropped_no_supervised: int
    invalid_lines: int
    data_format: str
    """The format the data was read as (formats.py), per file where a folder mixes them."""

    def describe(self) -> str:
        return (
            f"format {self.data_format}; {self.examples} examples, {self.tokens} tokens, {self.supervised_tokens} supervised; "
            f"{self.truncated} truncated, {self.dropped_no_supervised} dropped with no supervised token "
            f"after truncation, {self.invalid_lines} invalid lines skipped"
        )


class SFTData:
    """A tokenized SFT dataset and its summary."""

    def __init__(self, dataset: Dataset, summary: DataSummary, problems: list[Problem]):
        self.dataset = dataset
        self.summary = summary
        self.problems = problems


def build_sft_dataset(
    path: str,
    template: Template,
    tokenizer,
    max_len: int,
    num_workers: int = 1,
    skip_invalid: bool = False,
    data_format: str = AUTO_DATA_FORMAT,
) -> SFTData:
    read = read_conversations(path, skip_invalid, template, data_format)
    raw = Dataset.from_list(read.records)
    tokenized = raw.map(
        tokenize_record,
        fn_kwargs={"template": template, "tokenizer": tokenizer, "max_len": max_len},
        remove_columns=raw.column_names,
        num_proc=num_workers if num_workers > 1 and len(raw) >= num_workers else None,
        desc="Tokenizing",
    )
    truncated = sum(tokenized["truncated"])
    kept = tokenized.filter(lambda n: n > 0, input_columns="num_supervised")
    summary = DataSummary(
        examples=len(kept),
        tokens=sum(len(x) for x in kept["input_ids"]),
        supervised_tokens=sum(kept["num_supervised"]),
        truncated=truncated,
        dropped_no_supervised=len(tokenized) - len(kept),
        invalid_lines=len(read.problems),
        data_format=describe_formats(read.formats),
    )
    if len(kept) == 0:
        raise_problems(path, [Problem(path, 0, f"no example keeps a supervised token at max_seq_length={max_len}")])
    return SFTData(kept.remove_columns(["truncated", "num_supervised"]), summary, read.problems)


def save_problems(problems: list[Problem], output_dir: str) -> Optional[Path]:
    if not problems:
        return None
    path = Path(output_dir) / INVALID_EXAMPLES_FILE
    path.write_text("".join(f"{p}\n" for p in problems), encoding="utf-8")
    return path


def save_summary(summary: DataSummary, output_dir: str, name: str = "data_summary.json") -> None:
    (Path(output_dir) / name).write_text(json.dumps(asdict(summary), indent=2) + "\n")
