"""Preference pairs for DPO, ORPO and reward models: checked, rendered like SFT, tokenized and truncated.

Data, JSONL, one pair per line, in either form:
- `{"chosen": [messages], "rejected": [messages]}`: role/content lists with
  an optional leading system message, the same history, and a different
  last assistant message;
- `{"prompt": str | [messages], "chosen": str | [assistant message], "rejected": ...}`
  (TRL's forms; optional `"system"` with a string prompt): the history and two replies.
Messages follow the messages format's rules (content parts, `developer` as system); other
top-level keys (`id`, `category`, ...) are ignored.
Lines are checked (the history really shared, roles alternating, the
template able to render it) and problems reported as `file:line`.

Tokens: each side is rendered with the SFT template code and tokenized as one
string, exactly as SFT does; the completion is the assistant reply plus its
end-of-turn token, the prompt everything before it (the generation prompt).
`truncate_pair` is the one place pairs are cut: the prompt from the left,
down to `max_prompt_length`, then the replies from the right. A pair that
cannot keep a difference between its replies is dropped and counted.

"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

from datasets import Dataset

from component.data.formats import DATA_KEYS, parse_messages
from component.data.jsonl import Problem, raise_problems, read_jsonl
from component.data.sft import SKIP_HINT
from component.data.template import (
    IGNORE_INDEX,
    Message,
    Rendered,
    Template,
    TemplateError,
    encode,
    render,
)

# The keys a pair may hold; other top-level keys (id, source, category, ...) are ignored, as in SFT.
PAIR_KEYS = frozenset({"prompt", "chosen", "rejected", "system"})


class Pair(NamedTuple):
    """A checked preference pair: the shared history (ending with a user turn) and two replies."""

    history: list[Message]
    chosen: str
    rejected: str

    @property
    def reply(self) -> str:
        """The reply rendered when the pair is checked (both share the history's template)."""
        return self.chosen


# ---------------------------------------------------------------- checking


def _messages(value: Any, key: str) -> Union[list[Message], str]:
    """Plain role/content messages (the messages format's rules: content parts, developer as system)."""
    messages = parse_messages(value, key)
    if isinstance(messages, str):
        return messages
    for i, m in enumerate(messages):
        if not m.plain:
            return (
                f"{key}[{i}]: preference data takes plain system/user/assistant text, not tool calls, results "
                "or reasoning"
            )
    return messages


def _alternates(history: list[Message], key: str) -> Optional[str]:
    """The history and the reply after it alternate user/assistant from a user turn (a system message only first)."""
    roles = [m.role for m in history] + ["assistant"]
    first = 1 if roles[0] == "system" else 0
    for i in range(first, len(roles)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if roles[i] != expected:
            return (
                f"'{key}': message {i} is {roles[i]!r} where {expected!r} was expected; the turns alternate "
                "user/assistant from a user turn, and the replies answer the last user turn"
            )
    return None


def _pair_from_messages(obj: dict) -> Union[Pair, str]:
    chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
    for side in (chosen, rejected):
        if isinstance(side, str):
            return side
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1].role != "assistant":
            return f"'{key}' must end with an assistant message, got {side[-1].role!r}"
    if len(chosen) != len(rejected):
        return (
            f"'chosen' has {len(chosen)} messages and 'rejected' {len(rejected)}; they must share the history "
            "and differ only in the last assistant message"
        )
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=True)):
        if a != b:
            return (
                f"message {i} ({a.role}) differs between 'chosen' and 'rejected'; only the last assistant "
                "message may differ"
            )
    if chosen[-1].content == rejected[-1].content:
        return "the chosen and rejected replies are identical"
    return _alternates(chosen[:-1], "chosen") or Pair(chosen[:-1], chosen[-1].content, rejected[-1].content)


def reply_text(value: Any, key: str) -> Union[str, list]:
    """A reply: a string, or a list holding one assistant message (TRL's conversational form)."""
    if isinstance(value, list):
        messages = _messages(value, key)
        if isinstance(messages, str):
            return messages
        if len(messages) != 1 or messages[0].role != "assistant":
            return f"'{key}' must be a string or a list of exactly one assistant message"
        return [messages[0].content]
    if not isinstance(value, str) or not value.strip():
        return f"'{key}' must be non-empty text"
    return [value]


def prompt_history(obj: dict) -> Union[list[Message], str]:
    """The history a `prompt` stands for: a string (with an optional `system`), or a message list
    ending with a user turn. Shared by pairs and KTO's unpaired examples (component/data/unpaired.py)."""
    prompt, system = obj["prompt"], obj.get("system")
    if system is not None and not isinstance(system, str):
        return f"'system' must be a string, got {type(system).__name__}"
    if isinstance(prompt, list):
        if system is not None:
            return "'system' with a message-list prompt: put the system message first in 'prompt'"
        history = _messages(prompt, "prompt")
        if isinstance(history, str):
            return history
        return _alternates(history, "prompt") or history
    if isinstance(prompt, str) and prompt.strip():
        return ([Message("system", system)] if system else []) + [Message("user", prompt)]
    return "'prompt' must be non-empty text or a list of messages"


def _pair_from_prompt(obj: dict) -> Union[Pair, str]:
    """`prompt` a string (with an optional `system`) or a message list; each reply a string or one
    assistant message."""
    history = prompt_history(obj)
    if isinstance(history, str):
        return history
    chosen, rejected = reply_text(obj["chosen"], "chosen"), reply_text(obj["rejected"], "rejected")
    for side in (chosen, rejected):
        if isinstance(side, str):
            return side
    if chosen == rejected:
        return "the chosen and rejected replies are identical"
    return Pair(history, chosen[0], rejected[0])


def check_pair(obj: Any) -> Union[Pair, str]:
    """A clean Pair, or a string naming what is wrong. Forms: `{"prompt", "chosen", "rejected"}`
    (strings or message lists) and `{"chosen": [messages], "rejected": [messages]}`."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        return f"missing key(s) {', '.join(missing)} (keys present: {', '.join(sorted(obj)) or 'none'})"
    lost = sorted(k for k in (set(obj) & DATA_KEYS) - PAIR_KEYS if obj[k] not in (None, "", [], {}))
    if lost:
        return f"key(s) {', '.join(lost)} not read by a preference pair (their text would be lost)"
    if "prompt" in obj:
        return _pair_from_prompt(obj)
    if "system" in obj:
        return "'system' belongs in the message lists of 'chosen' and 'rejected' (or use a 'prompt')"
    return _pair_from_messages(obj)


def rendering_checker(check: Callable[[Any], Any], template: Template, tokenizer):
    """`check` (a record -> something with `history` and a `reply`, or a problem string), plus a render
    of history + reply with the template, so that template errors also name their line."""

    def checked(obj: Any):
        record = check(obj)
        if isinstance(record, str):
            return record
        try:
            render(template, tokenizer, [*record.history, Message("assistant", record.reply)])
        except TemplateError as exc:
            return str(exc)
        return record

    return checked


def pair_checker(template: Template, tokenizer):
    return rendering_checker(check_pair, template, tokenizer)


# ---------------------------------------------------------------- tokenizing


class Tokens(NamedTuple):
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_side(
    template: Template, tokenizer, history: list[Message], reply: str, empty_think: str = "supervised"
) -> tuple[list[int], int]:
    """Token ids of history + reply up to its end-of-turn, and where the reply's tokens start (as SFT tokenizes it)."""
    rendered = render(template, tokenizer, [*history, Message("assistant", reply)], empty_think=empty_think)
    start, end = rendered.spans[-1]
    # The text after the end-of-turn token (the separator) is not generated, so not part of the reply.
    ids, labels = encode(tokenizer, Rendered(rendered.text[:end], [(start, end)]))
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids, first


def tokenize_pair(pair: Pair, template: Template, tokenizer, empty_think: str = "supervised") -> Tokens:
    """Prompt and completions as SFT tokenizes them; the prompt is the tokens both sides share."""
    ids_c, start_c = tokenize_side(template, tokenizer, pair.history, pair.chosen, empty_think)
    ids_r, start_r = tokenize_side(template, tokenizer, pair.history, pair.rejected, empty_think)
    # Both sides render the same prompt text; a token merging across the prompt/reply boundary can
    # still split it differently, so the prompt is the longest common token prefix.
    shared = 0
    limit = min(start_c, start_r)
    while shared < limit and ids_c[shared] == ids_r[shared]:
        shared += 1
    return Tokens(ids_c[:shared], ids_c[shared:], ids_r[shared:])


def kept_prompt(prompt: list[int], reply_len: int, max_len: int, max_prompt_len: int) -> list[int]:
    """The prompt cut from the left to leave room for a reply of `reply_len`, never below `max_prompt_len`
    tokens (pairs here, KTO's examples in component/data/unpaired.py)."""
    keep = min(len(prompt), max(max_prompt_len, max_len - reply_len))
    return prompt[len(prompt) - keep :]


def truncate_pair(tokens: Tokens, max_len: int, max_prompt_len: int) -> tuple[Optional[Tokens], bool]:
    """The one place pairs are cut. Returns (tokens or None when the pair must be dropped, was cut)."""
    prompt, chosen, rejected = tokens
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer <= max_len:
        return tokens, False
    prompt = kept_prompt(prompt, longer, max_len, max_prompt_len)
    budget = max_len - len(prompt)
    chosen, rejected = chosen[:budget], rejected[:budget]
    if budget < 1 or chosen == rejected:
        return None, True
    return Tokens(prompt, chosen, rejected), True


@dataclass
class DPOSummary:
    """What the preference data holds after tokenization; logged at start-up."""

    pairs: int
    prompt_tokens: int
    chosen_tokens: int
    rejected_tokens: int
    truncated: int
    dropped_after_truncation: int
    invalid_lines: int

    def describe(self) -> str:
        return (
            f"{self.pairs} pairs; tokens: {self.prompt_tokens} prompt, {self.chosen_tokens} chosen, "
            f"{self.rejected_tokens} rejected; {self.truncated} truncated, {self.dropped_after_truncation} dropped "
            f"(no difference left after truncation), {self.invalid_lines} invalid lines skipped"
        )


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """datasets' progress bars off (a `map` over data already tokenized takes no time worth a bar), then as before."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    shown = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            enable_progress_bar()


def mapped(dataset: Dataset, fn, **kwargs) -> Dataset:
    """`dataset.map(fn)` in memory and quietly: the source may be a memory-mapped cache entry that every rank
    reads (component/data/cache.py), so nothing is written next to it. ORPO's, KTO's and rm's trainer columns."""
    with no_progress_bars():
        return dataset.map(fn, keep_in_memory=True, **kwargs)


class PreferenceData(NamedTuple):
    dataset: Dataset
    summary: DPOSummary
    problems: list[Problem]


def build_preference_dataset(
    path: str,
    template: Template,
    tokenizer,
    max_len: int,
    max_prompt_len: int,
    skip_invalid: bool = False,
    empty_think: str = "supervised",
) -> PreferenceData:
    """`empty_think` 'prompt' puts Qwen3's empty think block in the prompt, shared by both replies;
    'supervised' (default) in each reply, as SFT learns it."""
    read = read_jsonl(path, pair_checker(template, tokenizer))
    if read.problems and not skip_invalid:
        raise_problems(path, read.problems, SKIP_HINT)
    rows: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    truncated = dropped = 0
    for pair in read.records:
        tokens, cut = truncate_pair(tokenize_pair(pair, template, tokenizer, empty_think), max_len, max_prompt_len)
        truncated += cut
        if tokens is None:
            dropped += 1
            continue
        for key, value in zip(rows, tokens, strict=True):
            rows[key].append(value)
    if not rows["prompt_ids"]:
        raise_problems(path, read.problems + [Problem(path, 0, f"no pair fits max_seq_length={max_len}")])
    summary = DPOSummary(
        pairs=len(rows["prompt_ids"]),
        prompt_tokens=sum(map(len, rows["prompt_ids"])),
        chosen_tokens=sum(map(len, rows["chosen_ids"])),
        rejected_tokens=sum(map(len, rows["rejected_ids"])),
        truncated=truncated,
        dropped_after_truncation=dropped,
        invalid_lines=len(read.problems),
    )
    return PreferenceData(Dataset.from_dict(rows), summary, read.problems)
