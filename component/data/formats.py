"""SFT data formats: which JSONL shapes SFT reads, and how one record becomes role messages.

Each format is data (`Format`: its name, the key that identifies it, a one-line
example) plus a converter from one record to a `Conversation`: an optional
system prompt and the user/assistant messages, the shape every template
renders. A record that cannot be converted gives a string naming the field,
what was expected, and the fix; nothing in a record is silently dropped.

- conversation (Firefly): `{"system"?, "conversation": [{"human", "assistant"}, ...]}`
- messages (OpenAI/TRL): `{"messages": [{"role", "content"}, ...], "tools"?: [...]}`;
  roles system, developer (a system message), user, assistant and tool; content is a string or a
  list of `{"type": "text", "text"}` parts, joined with nothing in between (no text is invented,
  and chat templates that take parts print them back to back). Assistant turns may carry
  `tool_calls` (`{"function": {"name", "arguments"}}`, arguments an object or its JSON string)
  and reasoning as `reasoning_content` (or `reasoning`, `thinking`); tool results are `tool`
  messages with optional `tool_call_id` and `name`.
- sharegpt: `{"system"?, "tools"?, "conversations": [{"from", "value"}, ...]}` with from system,
  human, gpt, function_call (the value a JSON call, or a list of them) and observation (a tool
  result); a dataset's `roles` maps other names to these.
- alpaca: `{"system"?, "history"?: [[user, assistant], ...], "instruction", "input"?, "output"}`;
  the last user turn is the instruction, followed by a blank line and the input when the
  input has any non-space text.
- prompt_completion (TRL): `{"prompt": str | messages, "completion": str | messages}`.

Every conversation is an optional system prompt, then a user turn, and assistant replies (with
tool results after their calls) and user turns in turn, ending with an assistant turn (what the
templates render and the loss needs). `tools` is a list of functions (`{"type": "function",
"function": {"name", ...}}` or the function object itself), or its JSON string. Top-level keys a
format does not read (`id`, `source`, `category`, ...) are ignored and counted (`Conversation.ignored`);
a key that holds conversation data in some format (`system` in a messages record, say) and an
unknown key inside a turn are errors, since their text would be lost.

A file's format is detected once, from the first record that holds exactly one
format key (`FileFormat`), unless `data_format` names it; a record of another
format in the same file is reported on its line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

from component.config import AUTO_DATA_FORMAT
from component.data.template import Message, ToolCall

# Top-level keys that hold conversation data in some format: never ignored, as their text would be lost.
DATA_KEYS = frozenset(
    {"system", "tools", "conversation", "conversations", "messages", "instruction", "input", "output", "history"}
    | {"prompt", "completion", "chosen", "rejected", "text"}
)
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
OTHER_ROLES = {"function": "legacy function results: write them as role 'tool' messages"}
OTHER_MESSAGE_FIELDS = {"function_call": "a legacy function call: write it as tool_calls"}
PART_HINTS = {
    "thinking": "put reasoning text in the message's reasoning_content",
    "reasoning": "put reasoning text in the message's reasoning_content",
    "tool_use": "put tool calls in the message's tool_calls",
}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "gpt": "assistant",
    "function_call": "call",
    "observation": "tool",
}


class Conversation(NamedTuple):
    """A converted record: the system prompt (None when there is none), the turns (a user message
    first, an assistant turn last; tool results only after the calls they answer), the tool
    definitions, and the top-level keys that were ignored."""

    system: Optional[str]
    messages: list[Message]
    tools: Optional[list] = None
    ignored: tuple[str, ...] = ()

    def all_messages(self) -> list[Message]:
        """The messages as the templates take them: the system prompt first, when there is one."""
        return ([Message("system", self.system)] if self.system is not None else []) + self.messages


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


def _only_keys(obj: dict, allowed: set[str], expected: str, where: str = "") -> tuple[str, ...]:
    """Unknown keys inside a turn are an error (a typo there loses text). At the top level
    (`where` empty) they are ignored and returned, except keys that hold conversation data in
    some format, which would be lost."""
    extra = set(obj) - allowed
    if not where:
        lost = sorted(k for k in extra & DATA_KEYS if _present(obj[k]))  # a null filler holds nothing
        if lost:
            raise Invalid(
                f"key(s) {', '.join(lost)} not read by this format (their text would be lost); expected {expected}"
            )
        return tuple(sorted(extra))
    if extra:
        raise Invalid(f"{where}: unknown key(s) {', '.join(sorted(extra))}; expected {expected}")
    return ()


def _present(value: Any) -> bool:
    """A field that holds something: null, empty lists and empty strings (a uniform schema's
    fillers for records without the field) hold nothing that could be dropped."""
    return value is not None and value != [] and value != "" and value != {}


def _list(value: Any, key: str, shape: str) -> list:
    if not isinstance(value, list) or not value:
        raise Invalid(f"'{key}' must be a non-empty list of {shape}")
    return value


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise Invalid(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _turns(
    system: Optional[str], turns: Sequence[tuple[str, Message]], tools: Optional[list] = None, ignored=()
) -> Conversation:
    """Check the order the templates need: an optional system message first (from the list or the
    top-level key, not both), then a user turn; after a user turn an assistant turn; after an
    assistant turn with tool calls their results (at most one per call, answering a call by its id
    when both have ids), then an assistant turn; the last turn an assistant's."""
    rest = list(turns)
    if rest and rest[0][1].role == "system":
        where, first = rest.pop(0)
        if system is not None:
            raise Invalid(f"{where}: a system message and a top-level 'system' prompt; keep one")
        system = first.content
    if not rest:
        raise Invalid("no user or assistant message; a conversation needs a user turn and an assistant reply")
    previous: Optional[Message] = None
    open_calls: list = []
    for where, message in rest:
        role = message.role
        if role == "system":
            raise Invalid(f"{where}: a system message is allowed only first")
        if role == "tool":
            if not open_calls:
                raise Invalid(
                    f"{where}: a tool result with no tool call before it; a 'tool' message answers the "
                    "tool_calls of the assistant turn just before it"
                )
            ids = [c.id for c in open_calls]
            if message.tool_call_id is not None and any(ids) and message.tool_call_id not in ids:
                raise Invalid(
                    f"{where}.tool_call_id: {message.tool_call_id!r} answers none of the calls before it "
                    f"({', '.join(repr(i) for i in ids if i)})"
                )
            open_calls.pop(ids.index(message.tool_call_id) if message.tool_call_id in ids else 0)
        else:
            expected = (
                "user"
                if previous is None or (previous.role == "assistant" and not previous.tool_calls)
                else "assistant"
            )
            if previous is not None and previous.role == "assistant" and previous.tool_calls:
                expected = "tool"
            if role != expected:
                raise Invalid(
                    f"{where}: got {role!r} where {expected!r} was expected; a conversation starts with a user "
                    "turn, an assistant turn answers each user turn, and tool results follow the assistant "
                    "turn that called the tools"
                )
            open_calls = list(message.tool_calls)
        previous = message
    if previous.role != "assistant":
        raise Invalid(
            f"{rest[-1][0]}: the conversation must end with an assistant turn (a trailing {previous.role} turn "
            "has nothing to learn); remove it or add the reply"
        )
    return Conversation(system, [m for _, m in rest], tools, tuple(ignored))


# ---------------------------------------------------------------- conversation (Firefly)


def _from_conversation(obj: dict) -> Conversation:
    ignored = _only_keys(obj, {"conversation", "system"}, "conversation and optional system")
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
    return Conversation(system, messages, ignored=ignored)


# ---------------------------------------------------------------- messages (OpenAI / TRL)


def _content(value: Any, where: str, empty_ok: bool = False) -> str:
    """A string, or a list of text parts joined with nothing in between; `empty_ok` for an
    assistant turn that calls tools (null or empty content)."""
    if empty_ok and (value is None or value == "" or value == []):
        return ""
    if not isinstance(value, list):
        return _text(value, where)
    if not value:
        raise Invalid(f"{where}: empty list of content parts")
    texts = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        _object(part, at)
        kind = part.get("type")
        if kind != "text":
            hint = PART_HINTS.get(kind) if isinstance(kind, str) else None
            raise Invalid(
                f'{at}.type: {kind!r} parts are not supported; only {{"type": "text", "text": ...}} parts '
                f"({hint or 'images and audio need a multimodal model'})"
            )
        _only_keys(part, {"type", "text"}, "type and text", at)
        if "text" not in part:
            raise Invalid(f"{at}: missing key 'text'")
        if not isinstance(part["text"], str):
            raise Invalid(f"{at}.text: expected a string, got {type(part['text']).__name__}")
        texts.append(part["text"])
    return _text("".join(texts), where)


def _arguments(value: Any, where: str) -> dict:
    """A call's arguments: an object, or its JSON string (OpenAI's wire form), parsed."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise Invalid(f"{where}: not valid JSON ({exc.msg} at character {exc.pos}); give an object") from None
    if not isinstance(value, dict):
        raise Invalid(f"{where}: expected a JSON object of argument names and values, got {type(value).__name__}")
    return value


def _tool_call(call: Any, where: str) -> ToolCall:
    """`{"id"?, "type"?: "function", "function": {"name", "arguments"}}`, or `{"name", "arguments"}`."""
    _object(call, where)
    if "function" in call:
        _only_keys(call, {"id", "type", "function"}, "id, type and function", where)
        if call.get("type", "function") != "function":
            raise Invalid(f"{where}.type: {call['type']!r}; only 'function' calls are supported")
        function, at = _object(call["function"], f"{where}.function"), f"{where}.function"
    else:
        function, at = call, where
    _only_keys(
        function, {"name", "arguments"} | ({"id", "type"} if function is call else set()), "name and arguments", at
    )
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise Invalid(f"{at}.name: a call needs the function's name")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise Invalid(f"{where}.id: expected a string, got {type(call_id).__name__}")
    return ToolCall(name, _arguments(function.get("arguments", {}), f"{at}.arguments"), call_id)


def _reasoning(m: dict, where: str) -> Optional[str]:
    found = [k for k in REASONING_KEYS if k in m and _present(m[k])]
    if len(found) > 1:
        raise Invalid(f"{where}: reasoning in both {found[0]!r} and {found[1]!r}; keep one")
    if not found:
        return None
    if m.get("role") != "assistant":
        raise Invalid(f"{where}.{found[0]}: only assistant turns carry reasoning")
    return _text(m[found[0]], f"{where}.{found[0]}")


def _role_message(m: Any, where: str) -> Message:
    """One {"role", "content"} message; developer is a system message."""
    _object(m, where)
    for key, hint in OTHER_MESSAGE_FIELDS.items():
        if key in m and _present(m[key]):
            raise Invalid(f"{where}.{key}: {hint}")
    if "role" not in m:
        raise Invalid(f"{where}: missing key 'role'")
    role = m["role"]
    if isinstance(role, str) and role in OTHER_ROLES:
        raise Invalid(f"{where}.role: {role!r} is not supported ({OTHER_ROLES[role]})")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        raise Invalid(f"{where}.role: {role!r} is not one of {', '.join(MESSAGE_ROLES)}")
    role = MESSAGE_ROLES[role]
    allowed = {"role", "content", "tool_calls", *REASONING_KEYS} if role == "assistant" else {"role", "content"}
    if role == "tool":
        allowed |= {"tool_call_id", "name"}
    # Empty fillers of a uniform schema (null tool_calls on a user turn) hold nothing.
    _only_keys({k: v for k, v in m.items() if k in allowed or _present(v)}, allowed, ", ".join(sorted(allowed)), where)
    calls = m.get("tool_calls")
    tool_calls: tuple[ToolCall, ...] = ()
    if _present(calls):
        if not isinstance(calls, list):
            raise Invalid(f"{where}.tool_calls: expected a list of calls, got {type(calls).__name__}")
        tool_calls = tuple(_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls))
    reasoning = _reasoning(m, where)
    if role == "assistant" and not tool_calls and not _present(m.get("content")):
        raise Invalid(
            f"{where}: an assistant turn with neither content nor tool_calls; give the reply (or the calls)"
            + (", not only reasoning" if reasoning else "")
        )
    if "content" not in m and role != "assistant":
        raise Invalid(f"{where}: missing key 'content'")
    # An explicitly empty system message is kept: official templates render it (an empty system turn),
    # unlike no system message (a default system prompt, for some).
    empty_ok = (
        (role == "assistant" and bool(tool_calls))
        or (role == "system" and m.get("content") == "")
        or role == "tool"  # a function may return nothing
    )
    content = _content(m.get("content"), f"{where}.content", empty_ok=empty_ok)
    extra = {}
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if _present(m.get(key)):
                if not isinstance(m[key], str):
                    raise Invalid(f"{where}.{key}: expected a string, got {type(m[key]).__name__}")
                extra[key] = m[key]
    return Message(role, content, tool_calls, reasoning, **extra)


def _message_list(value: Any, key: str) -> list[tuple[str, Message]]:
    items = _list(value, key, '{"role": ..., "content": ...} messages')
    return [(f"{key}[{i}]", _role_message(m, f"{key}[{i}]")) for i, m in enumerate(items)]


def parse_messages(value: Any, key: str) -> Union[list[Message], str]:
    """A list of role/content messages as in the messages format (content parts, developer as
    system, tool calls...), or a string naming what is wrong; the order is the caller's to check."""
    try:
        return [m for _, m in _message_list(value, key)]
    except Invalid as exc:
        return str(exc)


def parse_tools(value: Any, where: str = "tools") -> Optional[list]:
    """Tool definitions as chat templates take them (`{"type": "function", "function": {...}}`):
    a list of functions or their JSON string; null or empty is none."""
    if not _present(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise Invalid(f"{where}: not valid JSON ({exc.msg} at character {exc.pos})") from None
    shape = 'a list of functions, each {"type": "function", "function": {"name": ..., "parameters": {...}}}'
    if not isinstance(value, list):
        raise Invalid(f"{where}: expected {shape}, got {type(value).__name__}")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise Invalid(f"{where}[{i}]: expected {shape}, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise Invalid(f"{where}[{i}].type: {tool['type']!r}; only 'function' tools are supported")
        function = tool.get("function", tool)
        at = f"{where}[{i}]" + (".function" if "function" in tool else "")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise Invalid(f"{at}: a function needs a 'name'; expected {shape}")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise Invalid(
                f"{at}.parameters: expected a JSON schema object, got {type(function['parameters']).__name__}"
            )
        tools.append({"type": "function", "function": function})
    return tools


def _from_messages(obj: dict) -> Conversation:
    ignored = _only_keys(
        obj, {"messages", "tools"}, "messages and optional tools (a system prompt is a first message with role system)"
    )
    tools = parse_tools(obj.get("tools"))
    return _turns(None, _message_list(obj["messages"], "messages"), tools, ignored)


# ---------------------------------------------------------------- sharegpt


def _sharegpt_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    """A function_call turn's value: a JSON call `{"name", "arguments"}`, or a list of them."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise Invalid(f'{where}: not valid JSON ({exc.msg}); expected {{"name": ..., "arguments": {{...}}}}') from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    return tuple(_tool_call(c, f"{where}[{j}]" if isinstance(parsed, list) else where) for j, c in enumerate(calls))


def _sharegpt_turn(turn: Any, where: str, roles: dict[str, str]) -> Message:
    _object(turn, where)
    for key in ("from", "value"):
        if key not in turn:
            raise Invalid(f"{where}: missing key '{key}'")
    who = roles.get(turn["from"], turn["from"]) if isinstance(turn["from"], str) else turn["from"]
    if not isinstance(who, str) or who not in SHAREGPT_ROLES:
        mapped = f" (mapped by the dataset's roles to {who!r})" if who != turn["from"] else ""
        raise Invalid(
            f"{where}.from: {turn['from']!r}{mapped} is not one of {', '.join(SHAREGPT_ROLES)}; "
            "map other names with the dataset's roles"
        )
    _only_keys(turn, {"from", "value"}, "from and value", where)
    role = SHAREGPT_ROLES[who]
    value = "" if role == "system" and turn["value"] == "" else _text(turn["value"], f"{where}.value")
    if role == "call":
        return Message("assistant", "", _sharegpt_calls(value, f"{where}.value"))
    return Message(role, value)


def _from_sharegpt(obj: dict, roles: Optional[dict[str, str]] = None) -> Conversation:
    ignored = _only_keys(obj, {"conversations", "system", "tools"}, "conversations and optional system, tools")
    system = _system(obj)
    tools = parse_tools(obj.get("tools"))
    turns = _list(obj["conversations"], "conversations", '{"from": ..., "value": ...} turns')
    located = [
        (f"conversations[{i}]", _sharegpt_turn(t, f"conversations[{i}]", roles or {})) for i, t in enumerate(turns)
    ]
    return _turns(system, _merge_calls(located), tools, ignored)


def _merge_calls(located: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
    """A gpt text turn followed by a function_call turn is one assistant turn: the reply, then its calls."""
    out: list[tuple[str, Message]] = []
    for where, m in located:
        prev = out[-1][1] if out else None
        if (
            m.role == "assistant"
            and m.tool_calls
            and prev is not None
            and prev.role == "assistant"
            and not prev.tool_calls
        ):
            out[-1] = (out[-1][0], prev._replace(tool_calls=m.tool_calls))
        else:
            out.append((where, m))
    return out


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
    ignored = _only_keys(
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
    return Conversation(system, [*history, user, Message("assistant", _text(obj["output"], "output"))], ignored=ignored)


# ---------------------------------------------------------------- prompt / completion (TRL)


def _from_prompt_completion(obj: dict) -> Conversation:
    ignored = _only_keys(obj, {"prompt", "completion", "tools"}, "prompt and completion, optional tools")
    tools = parse_tools(obj.get("tools"))
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
    return _turns(None, [*prompt_turns, *completion_turns], tools, ignored)


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


def convert(
    obj: Any, fmt: Format, read_as: str = "", roles: Optional[dict[str, str]] = None
) -> Union[Conversation, str]:
    """The record as a Conversation in format `fmt`, or a string naming what is wrong. `read_as`
    says why the record is read as `fmt` (shown when it holds another format's key); `roles`
    maps a ShareGPT dataset's own role names to sharegpt's."""
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
        return fmt.to_conversation(obj, roles) if fmt.name == "sharegpt" else fmt.to_conversation(obj)
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

    def __init__(self, data_format: str = AUTO_DATA_FORMAT, roles: Optional[dict[str, str]] = None):
        self.roles = roles
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
        return convert(obj, self.format, self.read_as, self.roles)
