"""SFT data formats: which JSONL shapes SFT reads, and how one record becomes role messages.

Each format is data (`Format`: its name, the key that identifies it, a one-line
example) plus a converter from one record to a `Conversation`: an optional
system prompt and the user/assistant messages, the shape every template
renders. A record that cannot be converted gives a string naming the field,
what was expected, and the fix; nothing in a record is silently dropped.

- conversation (Firefly): `{"system"?, "conversation": [{"human", "assistant"}, ...]}`
- messages (OpenAI/TRL): `{"messages": [{"role", "content"}, ...]}`; `developer` is a
  system message; content is a string or a list of `{"type": "text", "text"}` parts,
  joined with nothing in between (no text is invented, and chat templates that take
  parts print them back to back).
- sharegpt: `{"system"?, "conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}`
- alpaca: `{"system"?, "history"?: [[user, assistant], ...], "instruction", "input"?, "output"}`;
  the last user turn is the instruction, followed by a blank line and the input when the
  input has any non-space text.
- prompt_completion (TRL): `{"prompt": str | messages, "completion": str | messages}`.

Every conversation is an optional system prompt, then user and assistant turns
alternating, ending with an assistant reply (what the templates render and the
loss needs). Tool calls, tool results and reasoning text are refused with "not
supported yet" until the templates render them. `id` and `source` keys are
allowed and ignored.

A file's format is detected once, from the first record that holds exactly one
format key (`FileFormat`), unless `data_format` names it; a record of another
format in the same file is reported on its line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

from component.config import AUTO_DATA_FORMAT
from component.data.template import Message

METADATA_KEYS = frozenset({"id", "source"})
LATER = "(tool calls and reasoning come in a later change)"
# Message fields that carry tool calls, tool results or reasoning: refused, never dropped.
UNSUPPORTED_MESSAGE_FIELDS = {
    "tool_calls": "tool calls",
    "function_call": "function calls",
    "tool_call_id": "tool results",
    "reasoning_content": "reasoning text",
    "reasoning": "reasoning text",
    "thinking": "reasoning text",
}
UNSUPPORTED_PART_TYPES = {"thinking": "reasoning text", "reasoning": "reasoning text", "tool_use": "tool calls"}
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED_ROLES = {"tool": "tool results", "function": "function results"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
UNSUPPORTED_SHAREGPT_ROLES = {"function_call": "function calls", "observation": "tool results"}


class Conversation(NamedTuple):
    """A converted record: the system prompt (None when there is none) and the turns, which
    alternate user/assistant, start with a user message and end with an assistant reply."""

    system: Optional[str]
    messages: list[Message]

    def all_messages(self) -> list[Message]:
        """The messages as the templates take them: the system prompt first, when there is one."""
        return ([Message("system", self.system)] if self.system else []) + self.messages


class Invalid(Exception):
    """What is wrong with a record; raised inside a converter, returned as a string by `convert`."""


@dataclass(frozen=True)
class Format:
    """One SFT data format."""

    name: str
    key: str
    """The top-level key that identifies the format in auto detection."""
    example: str
    """One record of the format (valid: tests convert it), shown in errors."""
    to_conversation: Callable[[dict], Conversation]
    """The converter: raises Invalid naming the field and the fix."""


# ---------------------------------------------------------------- shared checks


def _encodable(text: str) -> bool:
    """False for text JSON allows but UTF-8 cannot hold (lone surrogates); the tokenizer would fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{where}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise Invalid(f"{where}: empty text")
    if not _encodable(value):
        raise Invalid(f"{where}: invalid Unicode (a lone surrogate escape such as \\ud800)")
    return value


def _system(obj: dict) -> Optional[str]:
    """The optional top-level system prompt; empty means none, as it always has."""
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise Invalid(f"'system' must be a string, got {type(system).__name__}")
    if system is not None and not _encodable(system):
        raise Invalid("'system': invalid Unicode (a lone surrogate escape such as \\ud800)")
    return system or None


def _only_keys(obj: dict, allowed: set[str], expected: str, where: str = "") -> None:
    """Unknown keys are an error; the record's own (top-level) keys may add `id` and `source`."""
    extra = set(obj) - allowed - (set() if where else METADATA_KEYS)
    if extra:
        prefix = f"{where}: " if where else ""
        raise Invalid(f"{prefix}unknown key(s) {', '.join(sorted(extra))}; expected {expected}")


def _present(value: Any) -> bool:
    """A field that holds something: null, empty lists and empty strings (a uniform schema's
    fillers for records without the field) hold nothing that could be dropped."""
    return value is not None and value != [] and value != "" and value != {}


def _not_yet(where: str, what: str) -> Invalid:
    return Invalid(f"{where}: not supported yet: {what} {LATER}")


def _list(value: Any, key: str, shape: str) -> list:
    if not isinstance(value, list) or not value:
        raise Invalid(f"'{key}' must be a non-empty list of {shape}")
    return value


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise Invalid(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _turns(system: Optional[str], turns: Sequence[tuple[str, Message]]) -> Conversation:
    """Check the order the templates need: an optional system message first (from the list or
    the top-level key, not both), then user/assistant alternating, ending with the assistant."""
    rest = list(turns)
    if rest and rest[0][1].role == "system":
        where, first = rest.pop(0)
        if system is not None:
            raise Invalid(f"{where}: a system message and a top-level 'system' prompt; keep one")
        system = first.content
    if not rest:
        raise Invalid("no user or assistant message; a conversation needs a user turn and an assistant reply")
    expected = "user"
    for where, message in rest:
        if message.role == "system":
            raise Invalid(f"{where}: a system message is allowed only first")
        if message.role != expected:
            raise Invalid(
                f"{where}: roles must alternate user/assistant, starting with user; got {message.role!r} "
                f"where {expected!r} was expected"
            )
        expected = "assistant" if expected == "user" else "user"
    if rest[-1][1].role != "assistant":
        raise Invalid(
            f"{rest[-1][0]}: the conversation must end with an assistant reply (a trailing user turn "
            "has nothing to learn); remove it or add the reply"
        )
    return Conversation(system, [m for _, m in rest])


# ---------------------------------------------------------------- conversation (Firefly)


def _from_conversation(obj: dict) -> Conversation:
    _only_keys(obj, {"conversation", "system"}, "conversation and optional system")
    system = _system(obj)
    conv = _list(obj["conversation"], "conversation", '{"human": ..., "assistant": ...} turns')
    messages = []
    for i, turn in enumerate(conv):
        _object(turn, f"conversation[{i}]")
        for key, role in (("human", "user"), ("assistant", "assistant")):
            if key not in turn:
                raise Invalid(f"conversation[{i}]: missing key '{key}'")
            messages.append(Message(role, _text(turn[key], f"conversation[{i}].{key}")))
        extra = set(turn) - {"human", "assistant"}
        if extra:
            raise Invalid(f"conversation[{i}]: unknown key(s) {', '.join(sorted(extra))}")
    return Conversation(system, messages)


# ---------------------------------------------------------------- messages (OpenAI / TRL)


def _content(value: Any, where: str) -> str:
    """A string, or a list of text parts joined with nothing in between."""
    if not isinstance(value, list):
        return _text(value, where)
    if not value:
        raise Invalid(f"{where}: empty list of content parts")
    texts = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        _object(part, at)
        kind = part.get("type")
        if isinstance(kind, str) and kind in UNSUPPORTED_PART_TYPES:
            raise _not_yet(f"{at}.type", f"{kind!r} parts ({UNSUPPORTED_PART_TYPES[kind]})")
        if kind != "text":
            raise Invalid(
                f'{at}.type: {kind!r} parts are not supported; only {{"type": "text", "text": ...}} '
                "parts (images and audio need a multimodal model)"
            )
        _only_keys(part, {"type", "text"}, "type and text", at)
        if "text" not in part:
            raise Invalid(f"{at}: missing key 'text'")
        if not isinstance(part["text"], str):
            raise Invalid(f"{at}.text: expected a string, got {type(part['text']).__name__}")
        texts.append(part["text"])
    return _text("".join(texts), where)


def _role_message(m: Any, where: str) -> Message:
    """One {"role", "content"} message; developer is a system message."""
    _object(m, where)
    for key, what in UNSUPPORTED_MESSAGE_FIELDS.items():
        if key in m and _present(m[key]):
            raise _not_yet(f"{where}.{key}", what)
    if "role" not in m:
        raise Invalid(f"{where}: missing key 'role'")
    role = m["role"]
    if isinstance(role, str) and role in UNSUPPORTED_ROLES:
        raise _not_yet(f"{where}.role", f"{role!r} messages ({UNSUPPORTED_ROLES[role]})")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        raise Invalid(f"{where}.role: {role!r} is not one of {', '.join(MESSAGE_ROLES)}")
    if "content" not in m:
        raise Invalid(f"{where}: missing key 'content'")
    _only_keys(
        {k: v for k, v in m.items() if k not in UNSUPPORTED_MESSAGE_FIELDS},
        {"role", "content"},
        "role and content",
        where,
    )
    return Message(MESSAGE_ROLES[role], _content(m["content"], f"{where}.content"))


def _message_list(value: Any, key: str) -> list[tuple[str, Message]]:
    items = _list(value, key, '{"role": ..., "content": ...} messages')
    return [(f"{key}[{i}]", _role_message(m, f"{key}[{i}]")) for i, m in enumerate(items)]


def _refuse_tools(obj: dict) -> None:
    """Tool definitions are refused; a null or empty `tools` is allowed (and holds nothing)."""
    if "tools" in obj and _present(obj["tools"]):
        raise _not_yet("tools", "tool definitions")


def _from_messages(obj: dict) -> Conversation:
    _refuse_tools(obj)
    _only_keys(obj, {"messages", "tools"}, "messages (a system prompt is a first message with role system)")
    return _turns(None, _message_list(obj["messages"], "messages"))


# ---------------------------------------------------------------- sharegpt


def _sharegpt_turn(turn: Any, where: str) -> Message:
    _object(turn, where)
    for key in ("from", "value"):
        if key not in turn:
            raise Invalid(f"{where}: missing key '{key}'")
    who = turn["from"]
    if isinstance(who, str) and who in UNSUPPORTED_SHAREGPT_ROLES:
        raise _not_yet(f"{where}.from", f"{who!r} turns ({UNSUPPORTED_SHAREGPT_ROLES[who]})")
    if not isinstance(who, str) or who not in SHAREGPT_ROLES:
        raise Invalid(f"{where}.from: {who!r} is not one of {', '.join(SHAREGPT_ROLES)}")
    _only_keys(turn, {"from", "value"}, "from and value", where)
    return Message(SHAREGPT_ROLES[who], _text(turn["value"], f"{where}.value"))


def _from_sharegpt(obj: dict) -> Conversation:
    _refuse_tools(obj)
    _only_keys(obj, {"conversations", "system", "tools"}, "conversations and optional system")
    system = _system(obj)
    turns = _list(obj["conversations"], "conversations", '{"from": ..., "value": ...} turns')
    return _turns(
        system, [(f"conversations[{i}]", _sharegpt_turn(t, f"conversations[{i}]")) for i, t in enumerate(turns)]
    )


# ---------------------------------------------------------------- alpaca


def alpaca_user_text(instruction: str, input_text: str) -> str:
    """The user turn of an Alpaca record: the instruction, then a blank line and the input when
    the input has any non-space text."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def _history(value: Any) -> list[Message]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"'history' must be a list of [user, assistant] pairs, got {type(value).__name__}")
    out = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise Invalid(f"history[{i}]: expected a [user, assistant] pair of strings")
        out += [
            Message("user", _text(pair[0], f"history[{i}][0]")),
            Message("assistant", _text(pair[1], f"history[{i}][1]")),
        ]
    return out


def _from_alpaca(obj: dict) -> Conversation:
    _only_keys(
        obj,
        {"instruction", "input", "output", "system", "history"},
        "instruction, output and optional input, system, history",
    )
    system = _system(obj)
    if "output" not in obj:
        raise Invalid("missing key 'output' (the reply to learn)")
    instruction = _text(obj["instruction"], "instruction")
    input_text = obj.get("input")
    if input_text is None:
        input_text = ""
    elif not isinstance(input_text, str):
        raise Invalid(f"'input' must be a string, got {type(input_text).__name__}")
    elif not _encodable(input_text):
        raise Invalid("'input': invalid Unicode (a lone surrogate escape such as \\ud800)")
    history = _history(obj.get("history"))
    user = Message("user", alpaca_user_text(instruction, input_text))
    return Conversation(system, [*history, user, Message("assistant", _text(obj["output"], "output"))])


# ---------------------------------------------------------------- prompt / completion (TRL)


def _from_prompt_completion(obj: dict) -> Conversation:
    _refuse_tools(obj)
    _only_keys(obj, {"prompt", "completion", "tools"}, "prompt and completion")
    if "completion" not in obj:
        raise Invalid("missing key 'completion' (the reply to learn)")
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, list):
        prompt_turns = _message_list(prompt, "prompt")
    else:
        prompt_turns = [("prompt", Message("user", _text(prompt, "prompt")))]
    for where, message in prompt_turns:
        if message.role == "assistant":
            # TRL trains only the completion; here every assistant reply is learned, so a reply in
            # the prompt would be learned too. Multi-turn data belongs in the messages format.
            raise Invalid(
                f"{where}: an assistant message in the prompt would be trained on; put multi-turn "
                "conversations in the messages format"
            )
    if isinstance(completion, list):
        completion_turns = _message_list(completion, "completion")
        if len(completion_turns) != 1 or completion_turns[0][1].role != "assistant":
            raise Invalid("'completion' must hold exactly one assistant message")
    else:
        completion_turns = [("completion", Message("assistant", _text(completion, "completion")))]
    return _turns(None, [*prompt_turns, *completion_turns])


# ---------------------------------------------------------------- the table, detection, converting

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "conversation",
            "conversation",
            '{"system": "...", "conversation": [{"human": "...", "assistant": "..."}]}',
            _from_conversation,
        ),
        Format(
            "messages",
            "messages",
            '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
            _from_messages,
        ),
        Format(
            "sharegpt",
            "conversations",
            '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
            _from_sharegpt,
        ),
        Format("alpaca", "instruction", '{"instruction": "...", "input": "...", "output": "..."}', _from_alpaca),
        Format("prompt_completion", "prompt", '{"prompt": "...", "completion": "..."}', _from_prompt_completion),
    )
}


def formats_by_key(obj: dict) -> list[Format]:
    """The formats whose identifying key the record holds."""
    return [f for f in FORMATS.values() if f.key in obj]


PREFERENCE_HINT = "preference data (chosen/rejected) is for task_type 'dpo'; SFT takes one reply per turn"


def _is_preference(obj: dict) -> bool:
    return "chosen" in obj and "rejected" in obj


def _keys(obj: dict) -> str:
    return ", ".join(sorted(obj)) or "none"


def convert(obj: Any, fmt: Format, read_as: str = "") -> Union[Conversation, str]:
    """The record as a Conversation in format `fmt`, or a string naming what is wrong. `read_as`
    says why the record is read as `fmt` (shown when it holds another format's key)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if fmt.key not in obj:
        why = f" ({read_as})" if read_as else ""
        others = formats_by_key(obj)
        if others:
            return (
                f"missing key '{fmt.key}' (keys present: {_keys(obj)}): this line is in the {others[0].name!r} "
                f"format, but the file is read as {fmt.name!r}{why}, which expects records like {fmt.example}; "
                "use one format per file"
            )
        return (
            f"missing key '{fmt.key}' (keys present: {_keys(obj)}); the {fmt.name!r} format{why} expects "
            f"records like {fmt.example}"
        )
    if _is_preference(obj):
        return PREFERENCE_HINT
    try:
        return fmt.to_conversation(obj)
    except Invalid as exc:
        return str(exc)


def detect(obj: Any) -> Union[Format, str, None]:
    """The format a record's keys name; None for a record that is not an object (it cannot
    tell); a string when it names no format or several."""
    if not isinstance(obj, dict):
        return None
    if _is_preference(obj):
        return PREFERENCE_HINT
    found = formats_by_key(obj)
    if len(found) == 1:
        return found[0]
    keys = ", ".join(f"'{f.key}' ({f.name})" for f in (found or FORMATS.values()))
    if found:
        return f"keys {keys} name different formats; keep one, or set data_format"
    return f"no known SFT data format (keys present: {_keys(obj)}); expected one of the keys {keys}"


class FileFormat:
    """The format of one file: `data_format` when it names one, else detected from the first
    record that names exactly one format by its keys. `check` converts each record in turn."""

    def __init__(self, data_format: str = AUTO_DATA_FORMAT):
        forced = data_format != AUTO_DATA_FORMAT
        self.format: Optional[Format] = FORMATS[data_format] if forced else None
        self.read_as = (
            f"data_format is {data_format!r}" if forced else "detected from its first record with a format key"
        )

    def check(self, obj: Any) -> Union[Conversation, str]:
        if self.format is None:
            found = detect(obj)
            if isinstance(found, str):
                return found
            if found is None:
                return f"expected a JSON object, got {type(obj).__name__}"
            self.format = found
        return convert(obj, self.format, self.read_as)
