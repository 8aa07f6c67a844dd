"""SFT data: conversation JSONL to `input_ids` and `labels`.

Line format: `{"conversation": [{"human": str, "assistant": str}, ...],
"system": optional str}`. Each line is checked; problems are reported as
`file:line`. Tokenization renders the whole conversation with the template,
labels exactly the assistant replies and their end-of-turn tokens, and then
truncates in one place (`truncate`). An example left with no supervised
token is dropped and counted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from datasets import Dataset

from component.data.jsonl import Problem, ReadResult, raise_problems, read_jsonl
from component.data.template import IGNORE_INDEX, Encoded, Template, conversation_messages, encode_messages

INVALID_EXAMPLES_FILE = "invalid_examples.txt"
SKIP_HINT = "Fix these lines, or set skip_invalid_examples: true to train without them."


def _encodable(text: str) -> bool:
    """False for text JSON allows but UTF-8 cannot hold (lone surrogates); the tokenizer would fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_conversation(obj: Any) -> Union[dict, str]:
    """A clean record, or a string naming what is wrong."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if "conversation" not in obj:
        keys = ", ".join(sorted(obj)) or "none"
        return f"missing key 'conversation' (keys present: {keys})"
    extra = set(obj) - {"conversation", "system", "source", "id"}
    if extra:
        return f"unknown key(s) {', '.join(sorted(extra))}; expected conversation and optional system"
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        return f"'system' must be a string, got {type(system).__name__}"
    if system is not None and not _encodable(system):
        return "'system': invalid Unicode (a lone surrogate escape such as \\ud800)"
    conv = obj["conversation"]
    if not isinstance(conv, list) or not conv:
        return '\'conversation\' must be a non-empty list of {"human": ..., "assistant": ...} turns'
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return f"conversation[{i}]: expected an object, got {type(turn).__name__}"
        for key in ("human", "assistant"):
            if key not in turn:
                return f"conversation[{i}]: missing key '{key}'"
            if not isinstance(turn[key], str):
                return f"conversation[{i}].{key}: expected a string, got {type(turn[key]).__name__}"
            if not turn[key].strip():
                return f"conversation[{i}].{key}: empty text"
            if not _encodable(turn[key]):
                return f"conversation[{i}].{key}: invalid Unicode (a lone surrogate escape such as \\ud800)"
        extra_turn = set(turn) - {"human", "assistant"}
        if extra_turn:
            return f"conversation[{i}]: unknown key(s) {', '.join(sorted(extra_turn))}"
    return {"conversation": conv, "system": system}


def refused_system(record: dict, template: Optional[Template]) -> Optional[str]:
    """Why `template` cannot render this record's system prompt, or None."""
    system_mode = getattr(template, "system_mode", None)  # an `auto` template renders any system prompt
    if record.get("system") and system_mode == "refuse":
        return (
            f"'system': template {template.name!r} has no system role ({template.system_note}); "
            "remove the system prompt or choose a template with one"
        )
    return None


def read_conversations(path: str, skip_invalid: bool = False, template: Optional[Template] = None) -> ReadResult:
    """Read and check a conversation file (against `template` too, when given); raise on problems unless skipping."""

    def check(obj: Any) -> Union[dict, str]:
        record = check_conversation(obj)
        return (refused_system(record, template) or record) if isinstance(record, dict) else record

    result = read_jsonl(path, check)
    if result.problems and not skip_invalid:
        raise_problems(path, result.problems, SKIP_HINT)
    if not result.records:
        raise_problems(path, result.problems or [Problem(path, 1, "no valid examples")])
    return result


def truncate(encoded: Encoded, max_len: int) -> tuple[Encoded, bool]:
    """The one place where examples are cut: keep the first `max_len` tokens."""
    if len(encoded.input_ids) <= max_len:
        return encoded, False
    return Encoded(encoded.input_ids[:max_len], encoded.labels[:max_len]), True


def tokenize_conversation(record: dict, template: Template, tokenizer, max_len: int) -> dict:
    messages = conversation_messages(record["conversation"], record.get("system"))
    encoded, was_cut = truncate(encode_messages(template, tokenizer, messages), max_len)
    supervised = sum(1 for x in encoded.labels if x != IGNORE_INDEX)
    return {
        "input_ids": encoded.input_ids,
        "labels": encoded.labels,
        "truncated": was_cut,
        "num_supervised": supervised,
    }


@dataclass
class DataSummary:
    """What the data holds after tokenization; logged at start-up."""

    examples: int
    tokens: int
    supervised_tokens: int
    truncated: int
    dropped_no_supervised: int
    invalid_lines: int

    def describe(self) -> str:
        return (
            f"{self.examples} examples, {self.tokens} tokens, {self.supervised_tokens} supervised; "
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
) -> SFTData:
    read = read_conversations(path, skip_invalid, template)
    raw = Dataset.from_list(read.records)
    tokenized = raw.map(
        tokenize_conversation,
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
