"""Prompts to answer: online RL (GRPO) trains on them, evaluation answers them.

A line is in any SFT format (component/data/formats.py, detected per file) and ends either with a
prompt to answer (a last user or tool message, a conversation turn with no "assistant", an Alpaca
record with no "output", a prompt with no "completion") or with a reply. For GRPO the final reply
is never trained on: it is the line's reference answer (column `reference`), which reward
functions read (the `accuracy` reward compares with it). A line that ends with a prompt may give
its reference as a top-level `reference` key instead. Every other top-level key (`answer`,
`schema`, `difficulty`, ...) becomes a column of its own, handed to the reward functions by name.

A line's own keys and its `tools` are stored as their JSON text (a dataset column holds one type, and
lines may differ: a number here, text there); the reward functions get them back as the line wrote
them (component/tasks/rewards.py decodes the columns `PromptSummary.json_columns` names). A blank
reference is no reference; a final reply that only calls tools is kept as the calls' JSON.

Tokens: the prompt is rendered with the run's template and its official generation prompt
(`render(..., add_generation_prompt=True)`) and tokenized once (`prompt_ids`); generation starts
from exactly those ids. A prompt longer than `max_prompt_length` is an error on its line, never
cut: a cut prompt asks another question.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

from datasets import Dataset

from component.config import AUTO_DATA_FORMAT
from component.data.formats import FileFormat
from component.data.jsonl import Problem, raise_problems
from component.data.sft import SKIP_HINT, as_record, template_problem
from component.data.sources import DatasetSpec, read_source
from component.data.template import Message, Rendered, TemplateError, encode, render
from component.errors import DataError

PROMPT_ONLY_PLACEHOLDER = "-"  # stands in for a missing last reply while a line is checked
REFERENCE = "reference"
# Columns the trainer and trl fill in themselves; a line's own key of the same name would be lost.
RESERVED_COLUMNS = frozenset(
    {"prompt", "prompt_ids", "tools", "completion", "completions", "completion_ids", "prompts", "trainer_state"}
    | {"log_extra", "log_metric", "environments"}
)


def prompt_only(obj: dict) -> Optional[dict]:
    """The record with a placeholder reply where it ends with a prompt (per format: how a record
    says "no reply yet"), so the converter can check the rest of it; None where it ends with a reply."""
    placeholder = PROMPT_ONLY_PLACEHOLDER
    conv, msgs, turns = obj.get("conversation"), obj.get("messages"), obj.get("conversations")
    if isinstance(conv, list) and conv and isinstance(conv[-1], dict) and "assistant" not in conv[-1]:
        return {**obj, "conversation": [*conv[:-1], {**conv[-1], "assistant": placeholder}]}
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") in ("user", "tool"):
        return {**obj, "messages": [*msgs, {"role": "assistant", "content": placeholder}]}
    if (
        isinstance(turns, list)
        and turns
        and isinstance(turns[-1], dict)
        and turns[-1].get("from") in ("human", "observation")
    ):
        return {**obj, "conversations": [*turns, {"from": "gpt", "value": placeholder}]}
    if "instruction" in obj and "output" not in obj:
        return {**obj, "output": placeholder}
    if "prompt" in obj and "completion" not in obj:
        return {**obj, "completion": placeholder}
    return None


class PromptLine(NamedTuple):
    """One line: the messages up to the prompt (system first), its tools, its final reply when it has
    one, and the top-level keys no format reads, with their values."""

    messages: list[Message]
    tools: Optional[list]
    reply: Optional[Message]
    extra: dict[str, Any]


def prompt_line_checker(data_format: str = AUTO_DATA_FORMAT, template=None, tokenizer=None, roles=None):
    """Checks one line: any SFT format, ending with a prompt or a reply. With the template and
    tokenizer, a line with tool calls or reasoning is rendered too, so a template that cannot names it."""
    file_format = FileFormat(data_format, roles)

    def check(obj: Any) -> Union[PromptLine, str]:
        filled = prompt_only(obj) if isinstance(obj, dict) else None
        converted = file_format.check(filled or obj)
        if isinstance(converted, str):
            return converted
        problem = template_problem(as_record(converted), template, tokenizer) if template else None
        if problem:
            return problem
        messages = converted.all_messages()
        extra = {k: obj[k] for k in converted.ignored}
        return PromptLine(messages[:-1], converted.tools, None if filled else messages[-1], extra)

    return check


@dataclass(frozen=True)
class PromptSummary:
    prompts: int
    with_reference: int
    longest_prompt: int
    columns: tuple[str, ...]
    """The lines' own top-level keys, each a column."""
    json_columns: tuple[str, ...] = ()
    """Columns holding JSON text: `tools` and the lines' own keys."""

    def describe(self) -> str:
        extra = f"; extra columns: {', '.join(self.columns)}" if self.columns else ""
        return (
            f"{self.prompts} prompts ({self.with_reference} with a reference answer), "
            f"longest {self.longest_prompt} tokens{extra}"
        )


class PromptData(NamedTuple):
    dataset: Dataset
    summary: PromptSummary
    problems: list[Problem]


OWN_COLUMNS = ("prompt", "prompt_ids", REFERENCE)  # every other column holds JSON text


def json_columns(*datasets: Optional[Dataset]) -> tuple[str, ...]:
    """The columns stored as JSON text in any of these prompt datasets (train and eval alike)."""
    return tuple(sorted({c for d in datasets if d is not None for c in d.column_names} - set(OWN_COLUMNS)))


def _text(value: Any) -> Optional[str]:
    """A reference given as a value: its text (a number as written), None where it is missing or blank."""
    if value is None or isinstance(value, (dict, list)):
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    return text if text.strip() else None


def reply_reference(reply: Message) -> Optional[str]:
    """A final reply as the line's reference answer: its text; for a reply that only calls tools, the calls as
    JSON (`[{"name": ..., "arguments": {...}}]`); None where it is blank."""
    if reply.content and reply.content.strip():
        return reply.content
    if reply.tool_calls:
        return json.dumps([{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls])
    return None


def _row(
    line: PromptLine,
    template,
    tokenizer,
    max_prompt_len: int,
    empty_think: str,
    required: Optional[str],
    check_required: Optional[Callable[[str], Optional[str]]],
) -> Union[dict, str]:
    reserved = sorted(RESERVED_COLUMNS & set(line.extra))
    if reserved:
        return f"key(s) {', '.join(reserved)}: reserved for the trainer's own columns; rename them"
    if line.reply is not None and REFERENCE in line.extra:
        return f"two reference answers: the final reply and the key '{REFERENCE}'; keep one"
    try:
        rendered = render(
            template, tokenizer, line.messages, add_generation_prompt=True, tools=line.tools, empty_think=empty_think
        )
    except TemplateError as exc:
        return str(exc)
    prefix = getattr(template, "final_assistant_prefix", "")
    if prefix and empty_think != "prompt" and rendered.text.endswith(prefix):
        # Qwen3's empty think block: the model writes it (or its reasoning) itself after the official generation
        # prompt, unless empty_think_block is 'prompt' (as enable_thinking=False puts it in the prompt).
        rendered = Rendered(rendered.text[: -len(prefix)], [])
    ids = encode(tokenizer, rendered).input_ids
    if len(ids) > max_prompt_len:
        return (
            f"the prompt is {len(ids)} tokens, longer than max_prompt_length {max_prompt_len}; a prompt is "
            "never cut (it would ask another question): shorten it or raise max_prompt_length"
        )
    reference = reply_reference(line.reply) if line.reply is not None else _text(line.extra.get(REFERENCE))
    if required is not None:
        value = reference if required == REFERENCE else _text(line.extra.get(required))
        if value is None:
            return (
                "no reference answer, which the accuracy reward compares with: end the line with the expected "
                f"reply, or give it as a top-level '{REFERENCE}' key"
                if required == REFERENCE
                else f"no '{required}' key (or an empty one), which the accuracy reward compares with (its reference_key)"
            )
        problem = check_required(value) if check_required else None
        if problem:
            return problem
    return {
        **line.extra,
        "prompt": rendered.text,
        "prompt_ids": ids,
        REFERENCE: reference,
        "tools": line.tools or None,
    }


def build_prompt_dataset(
    path: str,
    template,
    tokenizer,
    max_prompt_len: int,
    skip_invalid: bool = False,
    data_format: str = AUTO_DATA_FORMAT,
    empty_think: str = "supervised",
    required: Optional[str] = None,
    check_required: Optional[Callable[[str], Optional[str]]] = None,
) -> PromptData:
    """The prompts of a file or folder (any source sources.py reads), rendered and tokenized; `required`
    names a column every line must fill (the accuracy reward's reference), and `check_required` checks its
    text (a message naming what is wrong, or None)."""
    spec = DatasetSpec(path, format=data_format)
    rows: list[dict] = []
    problems: list[Problem] = []

    def make_check():
        lines = prompt_line_checker(spec.format, template, tokenizer, spec.roles)

        def check(obj: Any) -> Union[dict, str]:
            line = lines(obj)
            return (
                line
                if isinstance(line, str)
                else _row(line, template, tokenizer, max_prompt_len, empty_think, required, check_required)
            )

        return check

    for piece in read_source(spec, make_check):
        rows += piece.records
        problems += piece.problems
    if problems and not skip_invalid:
        raise_problems(path, problems, SKIP_HINT)
    if not rows:
        raise DataError(f"{path}: no valid prompts")
    columns = tuple(sorted({k for row in rows for k in row} - {*OWN_COLUMNS, "tools"}))
    json_columns = {"tools", *columns}
    for row in rows:  # every row has every column, each column one type: datasets needs one schema
        for column in columns:
            row.setdefault(column, None)
        for column in json_columns:
            row[column] = json.dumps(row[column]) if row[column] is not None else None
    dataset = Dataset.from_list(rows)
    summary = PromptSummary(
        len(rows),
        sum(row[REFERENCE] is not None for row in rows),
        max(len(r["prompt_ids"]) for r in rows),
        columns,
        tuple(sorted(json_columns)),
    )
    return PromptData(dataset, summary, problems)
