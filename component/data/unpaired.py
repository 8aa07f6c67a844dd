"""Unpaired preference data for KTO: one prompt, one completion and a label per line.

Data, JSONL, one example per line: `{"prompt": str | [messages], "completion": str | [assistant
message], "label": true | false}` (TRL's unpaired form; optional `"system"` with a string prompt).
`label` true marks a desirable completion, false an undesirable one. The prompt and the
completion follow the rules of preference pairs (component/data/preference.py): messages as in
the messages format, turns alternating and ending with a user turn, plain text only. Other
top-level keys (`id`, `score`, ...) are ignored; a line that is a pair (`chosen`/`rejected`)
is reported, because which prompts meet which completions in a batch matters to KTO's KL
estimate, and that order is the file's.

Tokens: the completion is rendered and tokenized with the SFT template code exactly as a pair's
side is (`tokenize_side`): the prompt is everything before the reply, the completion the reply
and its end-of-turn token. `truncate_example` is the one place examples are cut, by the pairs'
rule: the prompt from the left, down to `max_prompt_length`, then the completion from the right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

from datasets import Dataset

from component.data.formats import DATA_KEYS
from component.data.jsonl import Problem, raise_problems, read_jsonl
from component.data.preference import kept_prompt, prompt_history, rendering_checker, reply_text, tokenize_side
from component.data.sft import SKIP_HINT
from component.data.template import Message, Template

UNPAIRED_KEYS = frozenset({"prompt", "completion", "label", "system"})


class Example(NamedTuple):
    """A checked unpaired example: the history (ending with a user turn), the completion and its label."""

    history: list[Message]
    completion: str
    label: bool

    @property
    def reply(self) -> str:
        return self.completion


def check_example(obj: Any) -> Union[Example, str]:
    """A clean Example, or a string naming what is wrong."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if "chosen" in obj or "rejected" in obj:
        return (
            "a preference pair ('chosen'/'rejected'); KTO reads unpaired lines "
            '{"prompt", "completion", "label": true|false}: write each reply as its own line, shuffled'
        )
    missing = [k for k in ("prompt", "completion", "label") if k not in obj]
    if missing:
        return f"missing key(s) {', '.join(missing)} (keys present: {', '.join(sorted(obj)) or 'none'})"
    lost = sorted(k for k in (set(obj) & DATA_KEYS) - UNPAIRED_KEYS if obj[k] not in (None, "", [], {}))
    if lost:
        return f"key(s) {', '.join(lost)} not read by an unpaired example (their text would be lost)"
    if not isinstance(obj["label"], bool):
        return f"'label' must be true or false, got {obj['label']!r}"
    history = prompt_history(obj)
    if isinstance(history, str):
        return history
    completion = reply_text(obj["completion"], "completion")
    if isinstance(completion, str):
        return completion
    return Example(history, completion[0], obj["label"])


def example_checker(template: Template, tokenizer):
    return rendering_checker(check_example, template, tokenizer)


class ExampleTokens(NamedTuple):
    prompt: list[int]
    completion: list[int]


def tokenize_example(example: Example, template: Template, tokenizer, empty_think: str = "supervised") -> ExampleTokens:
    """Prompt and completion as SFT tokenizes the conversation: the prompt is its unlabelled head."""
    ids, start = tokenize_side(template, tokenizer, example.history, example.completion, empty_think)
    return ExampleTokens(ids[:start], ids[start:])


def truncate_example(tokens: ExampleTokens, max_len: int, max_prompt_len: int) -> tuple[Optional[ExampleTokens], bool]:
    """The one place examples are cut. Returns (tokens or None when nothing of the completion fits, was cut)."""
    if len(tokens.prompt) + len(tokens.completion) <= max_len:
        return tokens, False
    prompt = kept_prompt(tokens.prompt, len(tokens.completion), max_len, max_prompt_len)
    completion = tokens.completion[: max_len - len(prompt)]
    return (ExampleTokens(prompt, completion) if completion else None), True


@dataclass
class KTOSummary:
    """What the unpaired data holds after tokenization; logged at start-up."""

    examples: int
    desirable: int
    undesirable: int
    prompt_tokens: int
    completion_tokens: int
    truncated: int
    dropped_after_truncation: int
    invalid_lines: int

    def describe(self) -> str:
        return (
            f"{self.examples} examples ({self.desirable} desirable, {self.undesirable} undesirable); tokens: "
            f"{self.prompt_tokens} prompt, {self.completion_tokens} completion; {self.truncated} truncated, "
            f"{self.dropped_after_truncation} dropped (no completion left after truncation), "
            f"{self.invalid_lines} invalid lines skipped"
        )


class UnpairedData(NamedTuple):
    dataset: Dataset
    summary: KTOSummary
    problems: list[Problem]


def build_unpaired_dataset(
    path: str,
    template: Template,
    tokenizer,
    max_len: int,
    max_prompt_len: int,
    skip_invalid: bool = False,
    empty_think: str = "supervised",
) -> UnpairedData:
    """Columns `prompt_ids`, `completion_ids` and `label`, in the file's order (KTO's KL estimate pairs
    each prompt with a neighbour's completion)."""
    read = read_jsonl(path, example_checker(template, tokenizer))
    if read.problems and not skip_invalid:
        raise_problems(path, read.problems, SKIP_HINT)
    rows: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "label": []}
    truncated = dropped = 0
    for example in read.records:
        tokens, cut = truncate_example(
            tokenize_example(example, template, tokenizer, empty_think), max_len, max_prompt_len
        )
        truncated += cut
        if tokens is None:
            dropped += 1
            continue
        rows["prompt_ids"].append(tokens.prompt)
        rows["completion_ids"].append(tokens.completion)
        rows["label"].append(example.label)
    if not rows["label"]:
        raise_problems(path, read.problems + [Problem(path, 0, f"no example fits max_seq_length={max_len}")])
    desirable = sum(rows["label"])
    summary = KTOSummary(
        examples=len(rows["label"]),
        desirable=desirable,
        undesirable=len(rows["label"]) - desirable,
        prompt_tokens=sum(map(len, rows["prompt_ids"])),
        completion_tokens=sum(map(len, rows["completion_ids"])),
        truncated=truncated,
        dropped_after_truncation=dropped,
        invalid_lines=len(read.problems),
    )
    return UnpairedData(Dataset.from_dict(rows), summary, read.problems)
