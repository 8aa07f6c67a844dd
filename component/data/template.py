"""Chat templates: how a conversation becomes text, and which text is learned.

A `Template` is data: the text around each system, user and assistant
message, the end-of-turn token, the default system prompt, how a family with
no system role treats a system prompt (and why), BOS handling, the special
tokens the format needs, and where the format comes from. Rendering produces
one string plus the character spans of the supervised text (each assistant
reply and its end-of-turn token). `encode` tokenizes the whole string at once,
exactly as inference does, and labels the tokens whose characters fall inside
those spans; everything else gets IGNORE_INDEX.

Placeholders in formats: `{content}` is the message; `{bos}` / `{eos}` are the
tokenizer's own BOS / EOS text, so a template never hard-codes a token that a
tokenizer may spell differently (GPT-NeoX's EOS is `<|endoftext|>`, not
`</s>`); `{idx}` is the 1-based round number (ChatGLM2).

The named templates are data (template_registry.py); the tokenizer's own
chat_template and resolving either kind against a tokenizer live in
tokenizer_template.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

from component.errors import DataError

IGNORE_INDEX = -100
MARK = "\u2063"  # invisible separator: a marker no chat template strips or rewrites (tests by difference)
AUTO_TEMPLATE = "auto"

SystemMode = Literal["native", "fold", "refuse"]


EMPTY_THINK_MODES = ("supervised", "prompt")
"""Where an empty think block (Qwen3's `<think>\n\n</think>\n\n` before a reply with no
reasoning) goes: supervised, as everything after the official generation prompt is (default), or
into the prompt, as the template's `enable_thinking=False` generation prompt puts it."""


class ToolCall(NamedTuple):
    """One function call of an assistant turn; `arguments` is a JSON object, parsed."""

    name: str
    arguments: dict
    id: Optional[str] = None


class Message(NamedTuple):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    """Assistant turns: the functions it calls (content may then be empty)."""
    reasoning: Optional[str] = None
    """Assistant turns: the reasoning ("thinking") text before the reply."""
    name: Optional[str] = None
    """Tool results: the function's name."""
    tool_call_id: Optional[str] = None
    """Tool results: the id of the call they answer."""

    @property
    def plain(self) -> bool:
        """A system, user or assistant text with no tool call and no reasoning: what every template renders."""
        return self.role != "tool" and not self.tool_calls and self.reasoning is None

    def to_dict(self) -> dict:
        """As a JSON-able record (the fields that hold something)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                c._asdict() if c.id else {"name": c.name, "arguments": c.arguments} for c in self.tool_calls
            ]
        for key in ("reasoning", "name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Message:
        calls = tuple(ToolCall(c["name"], c["arguments"], c.get("id")) for c in d.get("tool_calls") or ())
        return cls(d["role"], d["content"], calls, d.get("reasoning"), d.get("name"), d.get("tool_call_id"))

    def chat_template_dict(self) -> dict:
        """As the chat templates of transformers take it: OpenAI's shape (tool calls under `function`,
        arguments as an object, reasoning as `reasoning_content`). Keys are set only when they hold
        something: Llama-3.1's template tests `'tool_calls' in message`."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                    **({"id": c.id} if c.id else {}),
                }
                for c in self.tool_calls
            ]
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class Rendered(NamedTuple):
    """A rendered conversation: the text and the supervised character spans."""

    text: str
    spans: list[tuple[int, int]]


class Encoded(NamedTuple):
    input_ids: list[int]
    labels: list[int]


class TemplateError(DataError, ValueError):
    """A conversation cannot be rendered with this template (a user error: no traceback)."""


@dataclass(frozen=True)
class Template:
    """How one model family formats a conversation."""

    name: str
    user_format: str
    """Text of a user turn, including the assistant header that follows it."""
    assistant_format: str
    """Supervised text of an assistant turn: the reply and its end-of-turn token."""
    stop_word: str
    """The end-of-turn token generation stops at ('{eos}' for the tokenizer's EOS)."""
    system_format: Optional[str] = None
    """Text of the system message; None when the family has no system role."""
    separator: str = ""
    """Unsupervised text after each assistant turn (e.g. a newline)."""
    default_system: Optional[str] = None
    """System prompt the official template injects when a conversation has none."""
    system_mode: SystemMode = "native"
    """native: own system block; fold: merged into the first user message; refuse: error."""
    system_note: str = ""
    """Why the family folds or refuses a system prompt."""
    fold_format: str = "{system}\n\n{content}"
    """How a folded system prompt joins the first user message."""
    prefix: str = ""
    """Text at the very start of every conversation, e.g. '{bos}' (BOS once)."""
    strip_content: bool = False
    """Strip whitespace from the ends of every message, as the official template does."""
    strip_after_fold: bool = False
    """Strip the first user message after the system prompt is folded in (Llama-2), not before."""
    final_assistant_prefix: str = ""
    """Text before the last assistant reply (Qwen3's empty think block), which earlier replies in the
    history do not get; supervised unless empty_think is 'prompt', and appended to a generation prompt."""
    special_tokens: tuple[str, ...] = ()
    """Markup that must be one token in the tokenizer; a template is refused where it is not."""
    source: str = ""
    """Where the format comes from, and how it is verified (official parity or golden only)."""

    def stop_text(self, tokenizer) -> str:
        return _fill(self.stop_word, tokenizer)

    @property
    def bos_handling(self) -> str:
        """Where this template puts the tokenizer's BOS (encode never adds it)."""
        if "{bos}" in self.prefix:
            return "once, at the start of the conversation"
        if "{bos}" in self.user_format:
            return "at the start of every user turn"
        return "none"


def _fill(fmt: str, tokenizer, content: str = "", system: str = "", idx: int = 0) -> str:
    # str.replace, not str.format: user text may contain braces. Content goes in last so that
    # placeholders inside user text are never expanded.
    out = fmt.replace("{bos}", (tokenizer.bos_token or "") if tokenizer is not None else "")
    out = out.replace("{eos}", (tokenizer.eos_token or "") if tokenizer is not None else "")
    out = out.replace("{idx}", str(idx))
    out = out.replace("{system}", "\0system\0").replace("{content}", "\0content\0")
    return out.replace("\0system\0", system).replace("\0content\0", content)


# ---------------------------------------------------------------- rendering


def conversation_messages(conversation: Sequence[dict], system: Optional[str] = None) -> list[Message]:
    """Our JSONL conversation format as role/content messages."""
    messages = [Message("system", system)] if system else []
    for turn in conversation:
        messages.append(Message("user", turn["human"]))
        messages.append(Message("assistant", turn["assistant"]))
    return messages


def rich_refusal(template: Template, what: str) -> str:
    return (
        f"template {template.name!r} renders plain user/assistant text only, not {what}; use "
        "template_name 'auto' (the model's own chat_template, which renders them as at inference, or a "
        "Jinja file given as chat_template)"
    )


def rich_parts(messages: Sequence[Message], tools: Optional[list] = None) -> Optional[str]:
    """What in a conversation only a Jinja chat template can render, or None when it is plain."""
    if tools:
        return "tool definitions"
    for m in messages:
        if m.role == "tool":
            return "tool results"
        if m.tool_calls:
            return "tool calls"
        if m.reasoning is not None:
            return "reasoning text"
    return None


def render(
    template,
    tokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    tools: Optional[list] = None,
    empty_think: str = "supervised",
) -> Rendered:
    """Render messages to text, recording the supervised spans: everything after the official
    generation prompt of each assistant turn, through its end-of-turn token. `tools` are the
    function definitions (only a Jinja chat template renders them); `empty_think` see EMPTY_THINK_MODES."""
    if not isinstance(template, Template):  # the tokenizer's own template renders itself
        return template.render(tokenizer, messages, add_generation_prompt, tools=tools, empty_think=empty_think)
    rich = rich_parts(messages, tools)
    if rich:
        raise TemplateError(rich_refusal(template, rich))
    system, turns = _split_system(template, messages)
    if add_generation_prompt and turns and turns[-1].role == "assistant":
        raise TemplateError("add_generation_prompt needs the conversation to end with a user message")
    parts: list[str] = [_fill(template.prefix, tokenizer)]
    spans: list[tuple[int, int]] = []
    if system is not None and template.system_mode == "native" and template.system_format:
        parts.append(_fill(template.system_format, tokenizer, _clean(template, system)))
    folded = system if template.system_mode == "fold" else None
    pos = sum(len(p) for p in parts)
    # Qwen3's think block goes before a reply that ends the conversation, not before history.
    last_assistant = len(turns) - 1 if turns and turns[-1].role == "assistant" else -1
    for i, message in enumerate(turns):
        if message.role == "user":
            text = _user_text(template, tokenizer, message.content, folded if i == 0 else None, i // 2 + 1)
        else:
            if template.final_assistant_prefix:
                _check_reply(template, message.content)
            start = pos
            if i == last_assistant and template.final_assistant_prefix:
                parts.append(template.final_assistant_prefix)
                pos += len(template.final_assistant_prefix)
                if empty_think == "prompt":  # the block joins the prompt, as enable_thinking=False puts it
                    start = pos
            text = _fill(template.assistant_format, tokenizer, _clean(template, message.content))
            spans.append((start, pos + len(text)))
            text += _fill(template.separator, tokenizer)
        parts.append(text)
        pos += len(text)
    if add_generation_prompt:
        parts.append(template.final_assistant_prefix)
    return Rendered("".join(parts), spans)


def _check_reply(template: Template, content: str) -> None:
    if "</think>" in content:
        raise TemplateError(
            f"template {template.name!r}: a reply containing '</think>' is rewritten by the official template"
        )


def _clean(template: Template, text: str) -> str:
    return text.strip() if template.strip_content else text


def _split_system(template: Template, messages: Sequence[Message]) -> tuple[Optional[str], list[Message]]:
    turns = list(messages)
    system = None
    if turns and turns[0].role == "system":
        system = turns.pop(0).content
        if template.system_mode == "refuse":
            raise TemplateError(
                f"template {template.name!r} has no system role ({template.system_note}); remove the system prompt"
            )
    if system is None:
        system = template.default_system
    expected = "user"
    for m in turns:
        if m.role != expected:
            raise TemplateError(
                f"messages must alternate user/assistant; got {m.role!r} where {expected!r} was expected"
            )
        expected = "assistant" if expected == "user" else "user"
    return system, turns


def _user_text(template: Template, tokenizer, content: str, folded_system: Optional[str], idx: int) -> str:
    if folded_system is None:
        return _fill(template.user_format, tokenizer, _clean(template, content), idx=idx)
    if not template.strip_after_fold:
        content = _clean(template, content)
    merged = _fill(template.fold_format, None, content, folded_system)
    if template.strip_after_fold:
        merged = _clean(template, merged)
    return _fill(template.user_format, tokenizer, merged, idx=idx)


# ---------------------------------------------------------------- tokenizing


def encode(tokenizer, rendered: Rendered) -> Encoded:
    """Tokenize the whole text at once; label tokens that overlap a supervised span."""
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    span_iter = iter(sorted(rendered.spans))
    span = next(span_iter, None)
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        while span is not None and start >= span[1]:
            span = next(span_iter, None)
        if span is None:
            break
        if end > start and start < span[1] and end > span[0]:
            labels[i] = ids[i]
    return Encoded(ids, labels)


def encode_messages(
    template, tokenizer, messages: Sequence[Message], tools: Optional[list] = None, empty_think: str = "supervised"
) -> Encoded:
    return encode(tokenizer, render(template, tokenizer, messages, tools=tools, empty_think=empty_think))


def generation_prompt(template, tokenizer, messages: Sequence[Message]) -> str:
    """Text to feed a model so that it writes the next assistant reply."""
    return render(template, tokenizer, messages, add_generation_prompt=True).text


def stop_token_ids(template, tokenizer) -> list[int]:
    """Token ids generation stops at: the template's end-of-turn and the tokenizer's EOS."""
    ids = set()
    stop = template.stop_text(tokenizer)
    tok_id = tokenizer.convert_tokens_to_ids(stop) if stop else None
    if isinstance(tok_id, int) and tok_id != getattr(tokenizer, "unk_token_id", None):
        ids.add(tok_id)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
