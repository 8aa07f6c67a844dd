"""SFT data formats (component/data/formats.py): one conversation, any format, the same tokens and mask.

The writers below turn the held-out parity conversations (tests/assets/parity_cases.json) into each
format independently of the converters; every format must then give the ids and labels the
`conversation` format gives, with a named template and with the tokenizer's own, and a `messages`
file the ids of the official chat template. Detection is per file; each bad record names its field.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train
from component.config import CONFIG_FILE_FLAG, DATA_FORMATS
from component.data.formats import FORMATS, Conversation, FileFormat, alpaca_user_text, convert
from component.data.sft import INVALID_EXAMPLES_FILE, build_sft_dataset, read_conversations
from component.data.template import Message, ToolCall
from component.data.template_registry import get_template
from component.data.tokenizer_template import resolve_template
from component.errors import USER_ERROR_EXIT_CODE, ConfigError, DataError, UserError
from script import inspect_data
from tests.conftest import TINY_SFT, base_config, write_config
from tests.runs import config_of, trainer_losses
from tests.runs import train as train_values
from tests.test_templates_parity import CASES, JINJA_FAMILIES
from tests.tiny import tiny_tokenizer

CASE_NAMES = sorted(CASES)
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


# ---------------------------------------------------------------- writers: each format, by hand


def split(msgs: list[Message]) -> tuple[Optional[str], list[tuple[str, str]]]:
    system = msgs[0].content if msgs[0].role == "system" else None
    turns = msgs[1:] if system is not None else msgs
    return system, [(turns[i].content, turns[i + 1].content) for i in range(0, len(turns), 2)]


def as_conversation(msgs):
    system, pairs = split(msgs)
    return {**({"system": system} if system else {}), "conversation": [{"human": u, "assistant": a} for u, a in pairs]}


def as_messages(msgs):
    return {"messages": [m.chat_template_dict() for m in msgs]}


def as_messages_developer_and_parts(msgs):
    """`developer` for the system prompt; every content as two text parts split mid-text."""
    out = []
    for m in msgs:
        cut = len(m.content) // 2
        parts = [{"type": "text", "text": m.content[:cut]}, {"type": "text", "text": m.content[cut:]}]
        out.append({"role": "developer" if m.role == "system" else m.role, "content": parts})
    return {"messages": out}


def as_sharegpt(msgs):
    return {"conversations": [{"from": SHAREGPT_FROM[m.role], "value": m.content} for m in msgs]}


def as_sharegpt_top_system(msgs):
    system, _ = split(msgs)
    turns = [m for m in msgs if m.role != "system"]
    return {**({"system": system} if system else {}), **as_sharegpt(turns)}


def as_alpaca(msgs):
    system, pairs = split(msgs)
    history = [[u, a] for u, a in pairs[:-1]]
    record = {"instruction": pairs[-1][0], "output": pairs[-1][1]}
    return {**({"system": system} if system else {}), **({"history": history} if history else {}), **record}


def as_prompt_completion(msgs):
    """Expressible for one turn: the prompt as messages (system included), the completion as one message."""
    system, pairs = split(msgs)
    if len(pairs) != 1:
        return None
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": pairs[0][0]}]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": pairs[0][1]}]}


def as_prompt_completion_text(msgs):
    system, pairs = split(msgs)
    return None if system or len(pairs) != 1 else {"prompt": pairs[0][0], "completion": pairs[0][1]}


WRITERS = {
    "messages": as_messages,
    "messages_developer_parts": as_messages_developer_and_parts,
    "sharegpt": as_sharegpt,
    "sharegpt_top_system": as_sharegpt_top_system,
    "alpaca": as_alpaca,
    "prompt_completion": as_prompt_completion,
    "prompt_completion_text": as_prompt_completion_text,
}
DETECTED = {
    "messages_developer_parts": "messages",
    "sharegpt_top_system": "sharegpt",
    "prompt_completion_text": "prompt_completion",
}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def tokenized(tmp_path: Path, writer, template, tok, **kwargs) -> tuple[dict, str]:
    """case -> (input_ids, labels) for every case the writer can express, and the detected format."""
    cases = [c for c in CASE_NAMES if writer(CASES[c]) is not None]
    path = write_jsonl(tmp_path / f"{writer.__name__}.jsonl", [writer(CASES[c]) for c in cases])
    data = build_sft_dataset(str(path), template, tok, max_len=4096, **kwargs)
    assert len(data.dataset) == len(cases)
    rows = {c: (row["input_ids"], row["labels"]) for c, row in zip(cases, data.dataset, strict=True)}
    return rows, data.summary.data_format


# ---------------------------------------------------------------- parity across formats


def test_the_format_table_is_the_configs():
    assert tuple(FORMATS) == DATA_FORMATS[1:]
    for fmt in FORMATS.values():  # the example every error shows is a record of that format
        assert isinstance(convert(json.loads(fmt.example), fmt), Conversation), fmt.name


@pytest.mark.parametrize("template_name", ["chatml", "auto"])
def test_every_format_gives_the_conversation_formats_ids_and_labels(tmp_path, official, template_name):
    tok = official("smollm2")
    template = resolve_template(template_name, tok)
    reference, detected = tokenized(tmp_path, as_conversation, template, tok)
    assert detected == "conversation" and len(reference) == len(CASE_NAMES)
    for name, writer in WRITERS.items():
        rows, detected = tokenized(tmp_path, writer, template, tok)
        assert detected == DETECTED.get(name, name)
        assert rows, name
        for case, row in rows.items():
            assert row == reference[case], (name, case)
    # Each format expresses single- and multi-turn cases, with and without a system prompt.
    assert {"single", "single_system"} <= set(tokenized(tmp_path, as_prompt_completion, template, tok)[0])


@pytest.mark.parametrize("use_auto", [False, True], ids=["named", "auto"])
@pytest.mark.parametrize("asset,name", JINJA_FAMILIES)
def test_messages_files_give_the_official_chat_templates_ids(tmp_path, official, asset, name, use_auto):
    tok = official(asset)
    template = resolve_template("auto", tok) if use_auto else get_template(name)
    rows, _ = tokenized(tmp_path, as_messages, template, tok)
    for case, (ids, labels) in rows.items():
        messages = [m.chat_template_dict() for m in CASES[case]]
        assert ids == list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]), case
        assert len(labels) == len(ids) and any(lab == i for lab, i in zip(labels, ids, strict=True))


def test_forcing_the_format_reads_the_same(tmp_path, official):
    tok = official("smollm2")
    template = get_template("chatml")
    for fmt, writer in [("messages", as_messages), ("sharegpt", as_sharegpt), ("alpaca", as_alpaca)]:
        assert tokenized(tmp_path, writer, template, tok, data_format=fmt) == tokenized(tmp_path, writer, template, tok)


# ---------------------------------------------------------------- converting


def test_content_parts_are_joined_and_developer_is_system():
    record = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Two plus "}, {"type": "text", "text": "two?"}]},
            {"role": "assistant", "content": "Four.", "tool_calls": None},  # a uniform schema's null: nothing dropped
        ]
    }
    assert convert(record, FORMATS["messages"]) == Conversation(
        "Be brief.", [Message("user", "Two plus two?"), Message("assistant", "Four.")]
    )


def test_alpaca_joins_instruction_and_input_with_a_blank_line():
    assert alpaca_user_text("Translate.", "Bonjour") == "Translate.\n\nBonjour"
    assert alpaca_user_text("Translate.", "  ") == "Translate."
    record = {"system": "S", "history": [["q1", "a1"]], "instruction": "Translate.", "input": "Bonjour", "output": "Hi"}
    assert convert(record, FORMATS["alpaca"]) == Conversation(
        "S",
        [
            Message("user", "q1"),
            Message("assistant", "a1"),
            Message("user", "Translate.\n\nBonjour"),
            Message("assistant", "Hi"),
        ],
    )


GOOD = {
    "conversation": {"conversation": [{"human": "q", "assistant": "a"}]},
    "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "alpaca": {"instruction": "q", "output": "a"},
    "prompt_completion": {"prompt": "q", "completion": "a"},
}
U, A, S = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))
# kind -> (format, bad record, words its problem must hold)
BAD = {
    "messages_not_list": ("messages", {"messages": "hi"}, "'messages' must be a non-empty list"),
    "messages_empty": ("messages", {"messages": []}, "'messages' must be a non-empty list"),
    "message_not_object": ("messages", {"messages": ["hi"]}, "messages[0]: expected an object, got str"),
    "missing_role": ("messages", {"messages": [{"content": "x"}, A]}, "messages[0]: missing key 'role'"),
    "bad_role": (
        "messages",
        {"messages": [{"role": "bot", "content": "x"}, A]},
        "messages[0].role: 'bot' is not one of system, developer, user, assistant",
    ),
    "missing_content": ("messages", {"messages": [{"role": "user"}, A]}, "messages[0]: missing key 'content'"),
    "assistant_without_content": (
        "messages",
        {"messages": [U, {"role": "assistant", "reasoning_content": "hmm"}]},
        "messages[1]: an assistant turn with neither content nor tool_calls; give the reply (or the calls), not only reasoning",
    ),
    "content_not_text": (
        "messages",
        {"messages": [{"role": "user", "content": 3}, A]},
        "messages[0].content: expected a string, got int",
    ),
    "empty_content": (
        "messages",
        {"messages": [U, {"role": "assistant", "content": " "}]},
        "messages[1].content: empty text",
    ),
    "lone_surrogate": (
        "messages",
        {"messages": [{"role": "user", "content": "\ud800"}, A]},
        "messages[0].content: invalid Unicode",
    ),
    "image_part": (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, A]},
        "messages[0].content[0].type: 'image_url' parts are not supported",
    ),
    "part_text_not_string": (
        "messages",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}, A]},
        "messages[0].content[0].text: expected a string, got int",
    ),
    "unknown_message_key": ("messages", {"messages": [{**U, "name": "bob"}, A]}, "messages[0]: unknown key(s) name"),
    "top_key_that_would_be_lost": (
        "messages",
        {"messages": [U, A], "system": "s"},
        "key(s) system not read by this format (their text would be lost)",
    ),
    "starts_with_assistant": ("messages", {"messages": [A, U, A]}, "messages[0]: got 'assistant' where 'user'"),
    "not_alternating": ("messages", {"messages": [U, U, A]}, "messages[1]: got 'user' where 'assistant'"),
    "ends_with_user": (
        "messages",
        {"messages": [U, A, U]},
        "messages[2]: the conversation must end with an assistant turn",
    ),
    "system_later": ("messages", {"messages": [U, A, S, U, A]}, "messages[2]: a system message is allowed only first"),
    "only_system": ("messages", {"messages": [S]}, "no user or assistant message"),
    "sharegpt_bad_from": (
        "sharegpt",
        {"conversations": [{"from": "bot", "value": "x"}]},
        "conversations[0].from: 'bot' is not one of system, human, gpt",
    ),
    "sharegpt_missing_value": (
        "sharegpt",
        {"conversations": [{"from": "human"}]},
        "conversations[0]: missing key 'value'",
    ),
    "sharegpt_two_systems": (
        "sharegpt",
        {
            "system": "s",
            "conversations": [
                {"from": "system", "value": "t"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ],
        },
        "conversations[0]: a system message and a top-level 'system' prompt",
    ),
    "alpaca_missing_output": ("alpaca", {"instruction": "q"}, "missing key 'output'"),
    "alpaca_empty_instruction": ("alpaca", {"instruction": "", "output": "a"}, "instruction: empty text"),
    "alpaca_input_not_text": (
        "alpaca",
        {"instruction": "q", "input": 3, "output": "a"},
        "'input' must be a string, got int",
    ),
    "alpaca_bad_history": (
        "alpaca",
        {"instruction": "q", "output": "a", "history": [["x"]]},
        "history[0]: expected a [user, assistant] pair",
    ),
    "completion_missing": ("prompt_completion", {"prompt": "q"}, "missing key 'completion'"),
    "assistant_in_prompt": (
        "prompt_completion",
        {"prompt": [U, A, U], "completion": "a"},
        "prompt[1]: an assistant message in the prompt would be trained on",
    ),
    "completion_not_assistant": (
        "prompt_completion",
        {"prompt": "q", "completion": [U]},
        "'completion' must hold exactly one assistant message",
    ),
    "preference_pair": (
        "prompt_completion",
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        "preference data (chosen/rejected) is for task_type 'dpo'",
    ),
    "firefly_unknown_key": (
        "conversation",
        {"conversation": [{"human": "q", "assistant": "a"}], "output": "x"},
        "key(s) output not read by this format (their text would be lost); expected conversation and optional system",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_record_names_its_field(tmp_path, kind):
    fmt, record, words = BAD[kind]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[fmt], record])
    with pytest.raises(DataError) as err:
        read_conversations(str(path))
    assert f"{path}:2: {words}" in str(err.value)
    assert "(1 problem" in str(err.value)


CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
ASK_TOOL = {"role": "assistant", "content": None, "tool_calls": [CALL]}
RESULT = {"role": "tool", "content": "3", "tool_call_id": "c1"}
# kind -> (bad record, words its problem must hold): tool and reasoning records that cannot be trained on.
BAD_TOOLS = {
    "tool_without_call": ({"messages": [U, A, RESULT, A]}, "messages[2]: a tool result with no tool call before it"),
    "tool_answers_another_id": (
        {"messages": [U, ASK_TOOL, {**RESULT, "tool_call_id": "c9"}, A]},
        "messages[2].tool_call_id: 'c9' answers none of the calls before it ('c1')",
    ),
    "more_results_than_calls": (
        {"messages": [U, ASK_TOOL, RESULT, RESULT, A]},
        "messages[3]: a tool result with no tool call before it",
    ),
    "call_without_result_then_user": ({"messages": [U, ASK_TOOL, U, A]}, "messages[2]: got 'user' where 'tool'"),
    "arguments_not_json": (
        {"messages": [U, {**ASK_TOOL, "tool_calls": [{"function": {"name": "add", "arguments": "{a:"}}]}, RESULT, A]},
        "messages[1].tool_calls[0].function.arguments: not valid JSON",
    ),
    "call_without_name": (
        {"messages": [U, {**ASK_TOOL, "tool_calls": [{"function": {"arguments": {}}}]}, A]},
        "messages[1].tool_calls[0].function.name: a call needs the function's name",
    ),
    "tools_not_a_list": ({**GOOD["messages"], "tools": {"name": "add"}}, "tools: expected a list of functions"),
    "tool_without_name": (
        {**GOOD["messages"], "tools": [{"type": "function", "function": {}}]},
        "tools[0].function: a function needs a 'name'",
    ),
    "tools_bad_json": ({**GOOD["messages"], "tools": "[{"}, "tools: not valid JSON"),
    "two_reasoning_keys": (
        {"messages": [U, {**A, "reasoning_content": "r", "thinking": "t"}]},
        "messages[1]: reasoning in both 'reasoning_content' and 'thinking'; keep one",
    ),
    "user_reasoning": (
        {"messages": [{**U, "reasoning_content": "r"}, A]},
        "messages[0]: unknown key(s) reasoning_content",
    ),
    "thinking_part": (
        {"messages": [U, {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"}]}]},
        'messages[1].content[0].type: \'thinking\' parts are not supported; only {"type": "text", "text": ...} parts '
        "(put reasoning text in the message's reasoning_content)",
    ),
    "legacy_function_call": (
        {"messages": [U, {**A, "function_call": {"name": "add"}}]},
        "messages[1].function_call: a legacy function call: write it as tool_calls",
    ),
    "legacy_function_role": (
        {"messages": [U, A, {"role": "function", "content": "3"}, A]},
        "messages[2].role: 'function' is not supported",
    ),
    "sharegpt_call_not_json": (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "add(1)"}]},
        "conversations[1].value: not valid JSON",
    ),
    "sharegpt_observation_first": (
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
                {"from": "observation", "value": "3"},
                {"from": "gpt", "value": "b"},
            ]
        },
        "conversations[2]: a tool result with no tool call before it",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOOLS))
def test_each_bad_tool_or_reasoning_record_names_its_field(tmp_path, kind):
    record, words = BAD_TOOLS[kind]
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError) as err:
        read_conversations(str(path))
    assert f"{path}:1: {words}" in str(err.value)


def test_tool_calls_results_reasoning_and_tools_convert_in_messages_and_sharegpt():
    record = {
        "messages": [U, {**ASK_TOOL, "reasoning_content": "I should add."}, RESULT, {**A, "content": "It is 3."}],
        "tools": TOOLS,
        "id": 7,
        "category": "math",
    }
    conv = convert(record, FORMATS["messages"])
    assert conv.tools == TOOLS and conv.ignored == ("category", "id")
    call = conv.messages[1]
    assert (call.role, call.content, call.reasoning) == ("assistant", "", "I should add.")
    assert call.tool_calls == (ToolCall("add", {"a": 1, "b": 2}, "c1"),)  # arguments parsed from their JSON string
    assert conv.messages[2] == Message("tool", "3", tool_call_id="c1")
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "x"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
            {"from": "observation", "value": "3"},
            {"from": "gpt", "value": "It is 3."},
        ],
        "tools": json.dumps(TOOLS),
    }
    plain = [
        m._replace(reasoning=None, tool_calls=tuple(c._replace(id=None) for c in m.tool_calls), tool_call_id=None)
        for m in conv.messages
    ]
    assert convert(sharegpt, FORMATS["sharegpt"]) == Conversation(None, plain, TOOLS)


def test_sharegpt_roles_are_remapped_per_dataset(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"conversations": [{"from": "USER", "value": "q"}, {"from": "BOT", "value": "a"}]}],
    )
    with pytest.raises(
        DataError, match="'USER' is not one of system, human, gpt.*map other names with the dataset's roles"
    ):
        read_conversations(str(path))
    from component.data.sft import read_checked
    from component.data.sources import DatasetSpec

    read = read_checked([DatasetSpec(str(path), roles={"USER": "human", "BOT": "gpt"})], False, None)[0]
    assert read.records == [
        {"system": None, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ]


def test_unknown_top_level_keys_are_ignored_and_listed_once(tmp_path):
    rows = [{**GOOD["messages"], "id": i, "category": "c", "source": "s"} for i in range(3)]
    data = build_sft_dataset(
        str(write_jsonl(tmp_path / "d.jsonl", rows)), get_template("chatml"), tiny_tokenizer(), max_len=64
    )
    assert data.summary.examples == 3 and data.summary.ignored_keys == ["category", "id", "source"]
    assert data.summary.describe().count("ignored record keys: category, id, source") == 1


def test_a_named_template_refuses_tool_calls_on_their_line(tmp_path):
    record = {"messages": [U, ASK_TOOL, RESULT, A]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["messages"], record])
    with pytest.raises(DataError) as err:
        read_conversations(str(path), template=get_template("chatml"))
    assert (
        f"{path}:2: template 'chatml' renders plain user/assistant text only, not tool calls; use template_name 'auto'"
        in str(err.value)
    )


# ---------------------------------------------------------------- detection


def test_a_record_of_another_format_names_its_line_the_files_format_and_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD["messages"], GOOD["messages"], GOOD["sharegpt"]])
    with pytest.raises(DataError) as err:
        read_conversations(str(path))
    msg = str(err.value)
    assert (
        f"{path}:3: missing key 'messages' (keys present: conversations): this line is in the 'sharegpt' format" in msg
    )
    assert "read as 'messages' (detected from its first record with a format key)" in msg
    assert FORMATS["messages"].example in msg and "use one format per file" in msg


def test_detection_uses_the_first_record_that_names_a_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["[1]", {"turns": []}, GOOD["alpaca"], GOOD["alpaca"]])
    read = read_conversations(str(path), skip_invalid=True)
    assert read.formats == {str(path): "alpaca"} and len(read.records) == 2
    assert [(p.line, p.what.split(" (")[0]) for p in read.problems] == [
        (1, "expected a JSON object, got list"),
        (2, "no known SFT data format"),
    ]
    ambiguous = FileFormat().check({"messages": [], "prompt": "q"})
    assert "keys 'messages' (messages), 'prompt' (prompt_completion) name different formats" in ambiguous


def test_data_format_forces_the_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["messages"]])
    with pytest.raises(DataError, match="read as 'sharegpt' \\(data_format is 'sharegpt'\\)"):
        read_conversations(str(path), data_format="sharegpt")
    assert read_conversations(str(path), data_format="messages").formats == {str(path): "messages"}


def test_each_file_of_a_folder_is_detected_on_its_own(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD["conversation"]])
    write_jsonl(tmp_path / "b.jsonl", [GOOD["messages"], GOOD["messages"]])
    data = build_sft_dataset(str(tmp_path), get_template("chatml"), tiny_tokenizer(), max_len=64)
    assert data.summary.data_format == "a.jsonl: conversation, b.jsonl: messages"
    assert len(data.dataset) == 3 and data.summary.describe().startswith("format a.jsonl: conversation")


def test_data_format_is_checked_with_a_suggestion(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="key 'data_format': 'sharegtp' is not one of .*did you mean 'sharegpt'"):
        config_of(base_config(tiny_llama_dir, tmp_path / "out", data_format="sharegtp"))
    assert config_of(base_config(tiny_llama_dir, tmp_path / "out", data_format="alpaca")).data.data_format == "alpaca"


# ---------------------------------------------------------------- whatever the input: a conversation or a message

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
texts = st.sampled_from(["q", "", " ", "\ud800", "a b"]) | json_values
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"]) | json_values},
    optional={
        "content": texts | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts})),
        "tool_calls": json_values,
    },
)
records = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(message, max_size=4) | json_values,
        "conversations": st.lists(
            st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system"]), "value": texts}), max_size=4
        ),
        "instruction": texts,
        "output": texts,
        "history": st.lists(st.lists(texts, max_size=3), max_size=2) | json_values,
        "prompt": texts | st.lists(message, max_size=3),
        "completion": texts | st.lists(message, max_size=2),
        "system": texts,
        "tools": json_values,
        "id": json_values,
    },
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=records | json_values, data_format=st.sampled_from(DATA_FORMATS))
def test_any_record_gives_a_checked_conversation_or_a_message(obj, data_format):
    result = FileFormat(data_format).check(obj)
    if isinstance(result, str):
        assert result
        return
    assert result.system is None or (isinstance(result.system, str) and result.system)
    roles = [m.role for m in result.messages]
    assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
    for m in result.messages:
        assert isinstance(m.content, str) and m.content.strip()
        m.content.encode("utf-8")  # no lone surrogate reaches the tokenizer


# ---------------------------------------------------------------- end to end


def stderr_of(capfd) -> str:
    return capfd.readouterr().err


def tiny_sft_as(writer, path: Path) -> Path:
    rows = [json.loads(line) for line in TINY_SFT.read_text().splitlines() if line.strip()]
    msgs = [
        ([Message("system", r["system"])] if r.get("system") else [])
        + [
            Message(role, t[key])
            for t in r["conversation"]
            for role, key in (("user", "human"), ("assistant", "assistant"))
        ]
        for r in rows
    ]
    return write_jsonl(path, [writer(m) for m in msgs])


def test_training_on_a_messages_file_lowers_the_loss(tmp_path, tiny_llama_dir):
    data = tiny_sft_as(as_messages, tmp_path / "m.jsonl")
    out = tmp_path / "out"
    trainer = train_values(base_config(tiny_llama_dir, out, train_file=str(data), max_steps=12, learning_rate=2e-2))
    curve = trainer_losses(trainer)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    assert json.loads((out / "data_summary.json").read_text())["data_format"] == "messages"


def test_a_bad_messages_file_exits_2_before_output_dir(tmp_path, tiny_llama_dir, capfd):
    data = write_jsonl(tmp_path / "m.jsonl", [GOOD["messages"], {"messages": [U, A, RESULT, A]}])
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, out, train_file=str(data)))
    assert train.main([CONFIG_FILE_FLAG, str(config)]) == USER_ERROR_EXIT_CODE
    err = stderr_of(capfd)
    assert f"{data}:2: messages[2]: a tool result with no tool call before it" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_skip_invalid_examples_trains_on_the_good_lines_of_every_format(tmp_path, tiny_llama_dir, fmt):
    other = GOOD["sharegpt" if fmt == "messages" else "messages"]  # another format: skipped too
    lines = [GOOD[fmt], "{broken", GOOD[fmt], {FORMATS[fmt].key: []}, GOOD[fmt], other]
    data = write_jsonl(tmp_path / "d.jsonl", lines)
    out = tmp_path / "out"
    values = base_config(tiny_llama_dir, out, train_file=str(data), skip_invalid_examples=True, max_steps=1)
    train_values(values)
    listed = (out / INVALID_EXAMPLES_FILE).read_text().splitlines()
    assert [ln.split(": ")[0] for ln in listed] == [f"{data}:2", f"{data}:4", f"{data}:6"]
    summary = json.loads((out / "data_summary.json").read_text())
    assert (summary["examples"], summary["invalid_lines"], summary["data_format"]) == (3, 3, fmt)


def test_inspect_data_marks_the_replies_of_any_format(tmp_path, tiny_llama_dir):
    data = tiny_sft_as(as_sharegpt, tmp_path / "s.jsonl")
    config = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out", train_file=str(data)))
    out = io.StringIO()
    assert inspect_data.main(["--train_args_file", str(config), "--num", "1"], out) == 0
    text = out.getvalue()
    assert "[[Two plus two is four.<|im_end|>]]" in text and "format:             sharegpt" in text


def test_the_shipped_messages_sample_reads_as_messages():
    from tests.conftest import ROOT

    read = read_conversations(str(ROOT / "data" / "sft_messages_sample.jsonl"))
    assert set(read.formats.values()) == {"messages"} and len(read.records) >= 10
    assert sum(len(r["messages"]) > 2 for r in read.records) >= 2 and sum(bool(r["system"]) for r in read.records) >= 2
    raw = (ROOT / "data" / "sft_messages_sample.jsonl").read_text()
    assert '"developer"' in raw and '"type": "text"' in raw


def test_a_file_in_no_known_format_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"turns": 1}])
    with pytest.raises(UserError, match="no known SFT data format"):
        read_conversations(str(path), skip_invalid=True)


def test_null_fillers_empty_tool_results_and_a_reply_before_its_sharegpt_call():
    # A uniform schema's null `system` in a messages record holds nothing to lose.
    conv = convert({**GOOD["messages"], "system": None}, FORMATS["messages"])
    assert not isinstance(conv, str) and conv.system is None
    # A function may return nothing.
    empty = {"messages": [U, ASK_TOOL, {**RESULT, "content": ""}, A]}
    assert convert(empty, FORMATS["messages"]).messages[2] == Message("tool", "", tool_call_id="c1")
    # ShareGPT writes a reply and its call as two turns: they are one assistant turn.
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "x"},
            {"from": "gpt", "value": "Let me add."},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1}}'},
            {"from": "observation", "value": "1"},
            {"from": "gpt", "value": "1."},
        ]
    }
    turns = convert(sharegpt, FORMATS["sharegpt"]).messages
    assert [m.role for m in turns] == ["user", "assistant", "tool", "assistant"]
    assert turns[1].content == "Let me add." and turns[1].tool_calls == (ToolCall("add", {"a": 1}),)
