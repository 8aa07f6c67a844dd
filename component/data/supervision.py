"""Which text of a conversation is learned: `train_on`, the empty think block, and reasoning history.

The default follows the official template's own boundaries (template.py, tokenizer_template.py):
each assistant turn from the end of its generation prompt through its end-of-turn token, its
reasoning and tool calls included. The options here narrow or reshape that:

- `train_on` (per dataset): the parts of an assistant turn that are learned, any of `reasoning`
  (the text before the reply: a think block), `replies` (the reply text) and `tool_calls` (the
  calls' rendering), plus `last_turn` to learn only the conversation's last assistant turn (all
  of its parts, unless some are named). The parts are found by rendering the turn again with a
  marker next to the reply (or without its reasoning) and comparing. The end-of-turn token goes
  with the last part.
- `empty_think` ("supervised" or "prompt"): see template.EMPTY_THINK_MODES.
- `reasoning_history` ("whole" or "per_turn"): templates that drop reasoning from earlier turns
  (Qwen3) render history unlike what the model saw when it wrote those turns. "whole" trains on
  the official rendering of the whole conversation; "per_turn" adds one example per such turn,
  rendered as at inference (`AutoTemplate.render_turns`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from component.config.checks import choice_problems
from component.data.template import EMPTY_THINK_MODES, MARK, Message, Rendered, Template, TemplateError, render

TRAIN_ON_PARTS = ("reasoning", "replies", "tool_calls")
TRAIN_ON_CHOICES = (*TRAIN_ON_PARTS, "last_turn", "all")
REASONING_HISTORY = ("whole", "per_turn")


@dataclass(frozen=True)
class Supervision:
    """What is learned of each conversation (the options above, checked)."""

    parts: tuple[str, ...] = TRAIN_ON_PARTS
    last_turn: bool = False
    empty_think: str = "supervised"
    reasoning_history: str = "whole"

    @property
    def narrowed(self) -> bool:
        return set(self.parts) != set(TRAIN_ON_PARTS)


def train_on_problems(value: Any, where: str) -> list[str]:
    """Config check of one `train_on` value: a choice or a list of them, naming at least one part."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        return [f"key '{where}': expected one of {', '.join(TRAIN_ON_CHOICES)}, or a list of them"]
    bad = [p for x in items for p in choice_problems(where, x, TRAIN_ON_CHOICES)]
    if bad:
        return bad
    return []


def supervision(
    train_on: Union[str, list[str], None], empty_think: str = "supervised", reasoning_history: str = "whole"
) -> Supervision:
    items = [train_on] if isinstance(train_on, str) else list(train_on or ["all"])
    parts = TRAIN_ON_PARTS if "all" in items else tuple(p for p in TRAIN_ON_PARTS if p in items)
    if empty_think not in EMPTY_THINK_MODES or reasoning_history not in REASONING_HISTORY:
        raise ValueError(f"empty_think {empty_think!r} / reasoning_history {reasoning_history!r}")
    return Supervision(parts or TRAIN_ON_PARTS, "last_turn" in items, empty_think, reasoning_history)


def render_examples(
    template, tokenizer, messages: Sequence[Message], tools: Optional[list] = None, options: Supervision = Supervision()
) -> list[Rendered]:
    """The training examples of one conversation (one, or more under reasoning_history per_turn),
    each with the supervised spans the options select."""
    if options.reasoning_history == "per_turn" and not isinstance(template, Template):
        examples = template.render_turns(tokenizer, messages, tools, options.empty_think)
    else:
        examples = [
            (render(template, tokenizer, messages, tools=tools, empty_think=options.empty_think), len(messages))
        ]
    if options.last_turn:
        # The conversation's last turn is the whole rendering's last span in either mode: a
        # finished conversation renders its last turn as its own generation would.
        whole, n = examples[0]
        examples = [(Rendered(whole.text, whole.spans[-1:]), n)]
    if options.narrowed:
        examples = [
            (_narrow_one(template, tokenizer, list(messages[:n]), rendered, tools, options), n)
            for rendered, n in examples
        ]
    return [rendered for rendered, _ in examples]


def _assistant_indices(messages: Sequence[Message]) -> list[int]:
    return [k for k, m in enumerate(messages) if m.role == "assistant"]


def turn_parts(
    template, tokenizer, messages: Sequence[Message], tools: Optional[list] = None, empty_think: str = "supervised"
) -> list[tuple[int, dict[str, tuple[int, int]]]]:
    """Each assistant turn of the whole rendering, as (message index, its part -> character span);
    a named template's turn is all reply."""
    whole = render(template, tokenizer, messages, tools=tools, empty_think=empty_think)
    out = []
    for k, span in zip(_assistant_indices(messages), whole.spans, strict=True):
        if isinstance(template, Template):
            parts = {"reasoning": (span[0], span[0]), "replies": span, "tool_calls": (span[1], span[1])}
        else:
            parts = _turn_parts(template, tokenizer, list(messages), k, span, whole.text, tools, empty_think)
        out.append((k, parts))
    return out


def _narrow_one(template, tokenizer, messages: list[Message], rendered: Rendered, tools, options: Supervision):
    """The spans of `rendered` (a rendering of `messages`) cut down to the parts `options.parts` names."""
    if isinstance(template, Template):  # named templates render plain replies only: all of it is the reply
        if "replies" not in options.parts:
            raise TemplateError(
                f"train_on {list(options.parts)}: template {template.name!r} renders plain replies only, so "
                "nothing would be learned; add 'replies', or use template_name 'auto'"
            )
        return rendered
    whole = render(template, tokenizer, messages, tools=tools, empty_think=options.empty_think)
    turns = dict(zip(whole.spans, _assistant_indices(messages), strict=True))
    spans = []
    for span in rendered.spans:
        k = turns.get(span)
        if k is None:
            raise TemplateError("train_on: a supervised span does not match an assistant turn")
        parts = _turn_parts(template, tokenizer, messages, k, span, whole.text, tools, options.empty_think)
        spans += [parts[p] for p in TRAIN_ON_PARTS if p in options.parts and parts[p][1] > parts[p][0]]
    return Rendered(rendered.text, _merged(spans))


def _turn_parts(template, tokenizer, messages, k, span, text, tools, empty_think) -> dict[str, tuple[int, int]]:
    """Turn k's span split into reasoning | replies | tool_calls, in that order; the end-of-turn
    token stays with the last part the turn has. The reply's bounds are where the turn, rendered
    again with a marker before (after) the reply, first differs: never found by searching the text,
    which may occur in the markup. Everything before the reply (a think block, empty or not) is
    the reasoning part."""
    start, end = span
    turn = text[start:end]
    m = messages[k]

    def differs_at(message: Message) -> int:
        return start + _common_prefix(
            turn, _variant_turn(template, tokenizer, messages, k, message, tools, empty_think)
        )

    if m.content.strip():
        reply_start = differs_at(m._replace(content=MARK + m.content))
        reply_end = differs_at(m._replace(content=m.content + MARK)) if m.tool_calls else end
        return {"reasoning": (start, reply_start), "replies": (reply_start, reply_end), "tool_calls": (reply_end, end)}
    # Calls alone: the reasoning part runs to where the turn without its reasoning agrees again.
    reasoning_end = start
    if m.reasoning is not None:
        other = _variant_turn(template, tokenizer, messages, k, m._replace(reasoning=None), tools, empty_think)
        reasoning_end = end - _common_suffix(turn, other)
    return {
        "reasoning": (start, reasoning_end),
        "replies": (reasoning_end, reasoning_end),
        "tool_calls": (reasoning_end, end),
    }


def _variant_turn(template, tokenizer, messages, k, message: Message, tools, empty_think) -> str:
    variant = [*messages[:k], message, *messages[k + 1 :]]
    try:
        rendered = render(template, tokenizer, variant, tools=tools, empty_think=empty_think)
    except TemplateError as exc:
        raise TemplateError(
            f"train_on: cannot split assistant message {k} into parts with this template ({exc})"
        ) from None
    start, end = rendered.spans[_assistant_indices(variant).index(k)]
    return rendered.text[start:end]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
