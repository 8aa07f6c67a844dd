"""Tool calls, tool results and reasoning, token by token against the official Qwen3 and Llama-3.1 templates.

The mask rule checked here is the issue's, computed from the official template alone: for each
assistant message k, everything after `apply_chat_template(messages[:k], add_generation_prompt=True)`
through that turn's end-of-turn token is supervised (reply, tool call, reasoning); tool results,
system and user text never are. Qwen3's template is tests/assets/tokenizers/qwen3 (the published
one); Llama-3.1's tool-calling template is tests/assets/chat_templates/llama3_1_tools.jinja (the
published one, as llama.cpp ships it), on the trimmed Llama-3.1 tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from component.data.formats import FORMATS, convert
from component.data.sft import build_sft_mixture
from component.data.sources import DatasetSpec
from component.data.supervision import render_examples, supervision
from component.data.template import IGNORE_INDEX, TemplateError, encode, render
from component.data.template import Message as Message_
from component.data.tokenizer_template import resolve_template
from component.errors import DataError

ASSETS = Path(__file__).parent / "assets"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def call(city: str, call_id: str = "c1") -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


# name -> a messages-format record (the tool, reasoning and multi-turn cases of the issue)
RECORDS = {
    "tool_call": {
        "messages": [
            {"role": "system", "content": "You check the weather."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call("Paris")]},
            {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "c1", "name": "get_weather"},
            {"role": "assistant", "content": "It is 21 °C in Paris."},
        ],
        "tools": TOOLS,
    },
    "tool_call_with_reasoning": {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "reasoning_content": "I need the tool.", "tool_calls": [call("Oslo")]},
            {"role": "tool", "content": "-3 °C, snow", "tool_call_id": "c1"},
            {"role": "assistant", "content": "Snowy, -3 °C.", "reasoning_content": "The tool said snow."},
        ],
        "tools": TOOLS,
    },
    "two_calls": {
        "messages": [
            {"role": "user", "content": "Paris and Rome?"},
            {"role": "assistant", "content": "Checking both.", "tool_calls": [call("Paris"), call("Rome", "c2")]},
            {"role": "tool", "content": "temp 21", "tool_call_id": "c1"},
            {"role": "tool", "content": "temp 25", "tool_call_id": "c2"},
            {"role": "assistant", "content": "Paris 21, Rome 25."},
        ],
        "tools": TOOLS,
    },
    "multi_turn_reasoning": {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6.", "reasoning_content": "Three and three make six."},
        ]
    },
    "tool_chain_then_user": {  # Qwen3 drops the chain's reasoning once a later user turn follows
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [call("Oslo")]},
            {"role": "tool", "content": "snow", "tool_call_id": "c1"},
            {"role": "assistant", "content": "Snowy.", "reasoning_content": "It snows."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Welcome."},
        ],
        "tools": TOOLS,
    },
    "reasoning_then_plain": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "reasoning_content": "A greeting."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."},
        ]
    },
}
QWEN3_CASES = sorted(RECORDS)
LLAMA31_CASES = ["tool_call"]


@pytest.fixture(scope="module")
def llama31():
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "llama3_1")
    tok.chat_template = (ASSETS / "chat_templates" / "llama3_1_tools.jinja").read_text()
    return tok


def conversation(name: str):
    conv = convert(RECORDS[name], FORMATS["messages"])
    assert not isinstance(conv, str), conv
    return conv.all_messages(), conv.tools


def official_dicts(record: dict) -> list[dict]:
    """The record's messages as transformers' chat templates take them (arguments as objects)."""
    out = []
    for m in record["messages"]:
        m = {**m, "content": m.get("content") or ""}  # null content (a call alone) is the empty string
        if "tool_calls" in m:
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def official_labels(tok, record: dict, stop: str, empty_think: str = "supervised") -> tuple[list[int], str]:
    """ids and labels by the issue's rule, from the official template alone."""
    msgs, tools = official_dicts(record), record.get("tools")
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(msgs[:k], tools=tools, tokenize=False, add_generation_prompt=True)
        if not text.startswith(prompt):  # history as the whole rendering shows it: reasoning dropped
            history = [{key: v for key, v in d.items() if key != "reasoning_content"} for d in msgs[:k]]
            prompt = tok.apply_chat_template(history, tools=tools, tokenize=False, add_generation_prompt=True)
        assert text.startswith(prompt)
        spans.append((len(prompt), text.index(stop, len(prompt)) + len(stop)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        i if any(s < e2 and e > s2 for s2, e2 in spans) else IGNORE_INDEX
        for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return labels, text


def supervised_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def unsupervised_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX])


def check_against_official(tok, name: str):
    record = RECORDS[name]
    template = resolve_template("auto", tok)
    messages, tools = conversation(name)
    ours = encode(tok, render(template, tok, messages, tools=tools))
    labels, text = official_labels(tok, record, template.stop_word)
    official_ids = tok.apply_chat_template(official_dicts(record), tools=record.get("tools"), return_dict=True)
    assert ours.input_ids == list(official_ids["input_ids"]), name
    assert ours.labels == labels, name
    return ours, text


@pytest.mark.parametrize("name", QWEN3_CASES)
def test_qwen3_tools_and_reasoning_equal_the_official_template(official, name):
    tok = official("qwen3")
    ours, text = check_against_official(tok, name)
    learned, prompt_side = supervised_text(tok, *ours), unsupervised_text(tok, *ours)
    record = RECORDS[name]
    for m in record["messages"]:  # the rule, message by message
        content = m.get("content") or ""
        if m["role"] == "tool":
            assert content in prompt_side and content not in learned
        elif m["role"] in ("user", "system"):
            assert content not in learned
        else:
            assert (content in learned) if content else m.get("tool_calls")
            for c in m.get("tool_calls", []):
                assert '{"name": "get_weather", "arguments": ' + c["function"]["arguments"] + "}" in learned
    if "tools" in record:
        assert "<tools>" in text and "get_weather" in prompt_side and "<tools>" not in learned


def test_qwen3_reasoning_is_supervised_where_the_template_renders_it(official):
    tok = official("qwen3")
    ours, text = check_against_official(tok, "tool_call_with_reasoning")
    learned = supervised_text(tok, *ours)
    assert "<think>\nI need the tool.\n</think>" in learned and "<think>\nThe tool said snow.\n</think>" in learned
    # Multi-turn reasoning: Qwen3 drops the first turn's reasoning from history, so the whole
    # rendering (the default) learns the first reply without it.
    ours, text = check_against_official(tok, "multi_turn_reasoning")
    assert "Two and two" not in text and "<think>\nThree and three make six.\n</think>" in supervised_text(tok, *ours)


def test_reasoning_history_per_turn_adds_each_turn_as_at_inference(official):
    tok = official("qwen3")
    template = resolve_template("auto", tok)
    messages, tools = conversation("multi_turn_reasoning")
    whole, first = render_examples(template, tok, messages, tools, supervision(None, reasoning_history="per_turn"))
    msgs = official_dicts(RECORDS["multi_turn_reasoning"])
    assert whole.text == tok.apply_chat_template(msgs, tokenize=False)
    assert first.text == tok.apply_chat_template(msgs[:2], tokenize=False)  # the first turn as it was generated
    a, b = (encode(tok, r) for r in (whole, first))
    assert supervised_text(tok, *a) == "<think>\nThree and three make six.\n</think>\n\n6.<|im_end|>"
    assert supervised_text(tok, *b) == "<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>"
    # Where history renders as generated (a tool chain after the last user turn), one example stays.
    messages, tools = conversation("tool_call_with_reasoning")
    assert len(render_examples(template, tok, messages, tools, supervision(None, reasoning_history="per_turn"))) == 1


@pytest.mark.parametrize("template_name", ["auto", "qwen3"])
def test_qwen3_empty_think_block_supervised_by_default_prompt_on_request(official, template_name):
    tok = official("qwen3")
    template = resolve_template(template_name, tok)
    messages, _ = conversation("reasoning_then_plain") if template_name == "auto" else (None, None)
    if template_name == "qwen3":  # a named template renders plain turns only
        from component.data.template import Message

        messages = [
            Message("user", "Hi"),
            Message("assistant", "Hello!"),
            Message("user", "Bye"),
            Message("assistant", "See you."),
        ]
    default = encode(tok, render(template, tok, messages))
    prompt = encode(tok, render(template, tok, messages, empty_think="prompt"))
    assert default.input_ids == prompt.input_ids
    assert supervised_text(tok, *default).endswith("<think>\n\n</think>\n\nSee you.<|im_end|>")
    assert supervised_text(tok, *prompt).endswith("<|im_end|>See you.<|im_end|>")  # the block joined the prompt
    assert "<think>\n\n</think>" in unsupervised_text(tok, *prompt)
    dicts = [{"role": m.role, "content": m.content} for m in messages[:3]]
    for mode, extra in (("supervised", {}), ("prompt", {"enable_thinking": False})):
        rendered = render(template, tok, messages, empty_think=mode)
        before_last = rendered.text[: rendered.spans[-1][0]]
        assert before_last == tok.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True, **extra)


@pytest.mark.parametrize("name", LLAMA31_CASES)
def test_llama31_tool_calls_equal_the_official_template(llama31, name):
    ours, text = check_against_official(llama31, name)
    learned, prompt_side = supervised_text(llama31, *ours), unsupervised_text(llama31, *ours)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in learned
    assert "<|start_header_id|>ipython<|end_header_id|>" in prompt_side and "temp_c" not in learned
    assert "Environment: ipython" in prompt_side and '"name": "get_weather",\n' in prompt_side  # tools, in the prompt


@pytest.mark.parametrize(
    "name,words",
    [
        ("two_calls", "only supports single tool-calls"),  # the official template's own refusal
        ("multi_turn_reasoning", "does not render reasoning text"),  # Llama-3.1 has no reasoning
    ],
)
def test_llama31_refuses_what_it_cannot_render(llama31, name, words):
    messages, tools = conversation(name)
    with pytest.raises(TemplateError, match=words):
        render(resolve_template("auto", llama31), llama31, messages, tools=tools)


def test_a_reply_beside_a_tool_call_that_llama31_drops_is_refused_not_lost(llama31):
    record = json.loads(json.dumps(RECORDS["tool_call"]))
    record["messages"][2]["content"] = "Let me check."
    conv = convert(record, FORMATS["messages"])
    with pytest.raises(TemplateError, match="does not render this assistant turn.*would be lost"):
        render(resolve_template("auto", llama31), llama31, conv.all_messages(), tools=conv.tools)


def test_a_template_without_tools_refuses_tool_calls_naming_the_line(official, tmp_path):
    """SmolLM2's template ignores tool_calls: the record is refused on its line, never trained silently."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS["tool_call"]) + "\n")
    tok = official("smollm2")
    with pytest.raises(DataError) as err:
        build_sft_mixture([DatasetSpec(str(path))], resolve_template("auto", tok), tok, 512)
    assert f"{path}:1: template_name 'auto': the chat_template does not render" in str(err.value)


@pytest.mark.parametrize(
    "train_on,learned,not_learned",
    [
        (["replies", "tool_calls"], ["Snowy, -3 °C.", "<tool_call>"], ["I need the tool.", "The tool said snow."]),
        (["reasoning"], ["I need the tool.", "The tool said snow."], ["Snowy", "<tool_call>"]),
        (["tool_calls"], ["<tool_call>", '"Oslo"'], ["Snowy", "I need the tool."]),
        ("last_turn", ["Snowy, -3 °C.", "The tool said snow."], ["I need the tool.", "<tool_call>"]),
    ],
)
def test_train_on_selects_the_parts_learned(official, train_on, learned, not_learned):
    tok = official("qwen3")
    template = resolve_template("auto", tok)
    messages, tools = conversation("tool_call_with_reasoning")
    (example,) = render_examples(template, tok, messages, tools, supervision(train_on))
    encoded = encode(tok, example)
    text = supervised_text(tok, *encoded)
    assert encoded.input_ids == encode(tok, render(template, tok, messages, tools=tools)).input_ids
    for piece in learned:
        assert piece in text, (train_on, text)
    for piece in not_learned:
        assert piece not in text, (train_on, text)


def test_a_messages_file_with_tools_trains_through_the_pipeline(official, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(RECORDS[n]) + "\n" for n in QWEN3_CASES))
    tok = official("qwen3")
    template = resolve_template("auto", tok)
    data = build_sft_mixture([DatasetSpec(str(path))], template, tok, 1024)
    assert data.summary.examples == len(QWEN3_CASES)
    for row, name in zip(data.dataset, QWEN3_CASES, strict=True):
        labels, _ = official_labels(tok, RECORDS[name], template.stop_word)
        assert row["labels"] == labels, name


# ---------------------------------------------------------------- the demo's chat template and sample

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEMPLATE = ROOT / "data" / "chat_templates" / "chatml_tools.jinja"


def test_the_demo_chat_template_renders_plain_turns_as_smollm2_does(official):
    from tests.test_templates_parity import CASES

    tok = official("smollm2")
    ours = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "smollm2")
    ours.chat_template = DEMO_TEMPLATE.read_text()
    for case, msgs in CASES.items():
        dicts = [m.chat_template_dict() for m in msgs]
        assert ours.apply_chat_template(dicts, tokenize=False) == tok.apply_chat_template(dicts, tokenize=False), case


def test_the_shipped_messages_sample_has_tool_calls_and_trains_with_the_demo_template(official, tmp_path):
    from component.data.sft import read_conversations

    sample = ROOT / "data" / "sft_messages_sample.jsonl"
    read = read_conversations(str(sample))
    assert sum(any(m.get("tool_calls") for m in r["messages"]) for r in read.records) >= 2
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "smollm2")
    tok.chat_template = DEMO_TEMPLATE.read_text()
    data = build_sft_mixture(
        [DatasetSpec(str(sample))], resolve_template("auto", tok), tok, 4096
    )  # trimmed vocab: long
    assert data.summary.examples == len(read.records)
    row = next(r for r, rec in zip(data.dataset, read.records, strict=True) if rec.get("tools"))
    learned = supervised_text(tok, row["input_ids"], row["labels"])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Lisbon"}}</tool_call><|im_end|>' in learned
    assert "temp_c" not in learned and "<tools>" not in learned


# ---------------------------------------------------------------- through train.py: exit 2, nothing written


def _exits_2_naming(tmp_path, tiny_llama_dir, capfd, rows, words, **overrides):
    import train
    from component.config import CONFIG_FILE_FLAG
    from component.errors import USER_ERROR_EXIT_CODE
    from tests.conftest import base_config, write_config

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.json", **base_config(tiny_llama_dir, out, train_file=str(data), **overrides))
    assert train.main([CONFIG_FILE_FLAG, str(config)]) == USER_ERROR_EXIT_CODE
    err = capfd.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert not out.exists()


GOOD_RECORD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
BAD_RECORDS = {
    "unknown_role": ({"messages": [{"role": "bot", "content": "q"}, A]}, "messages[0].role: 'bot' is not one of"),
    "tool_without_call": (
        {"messages": [U, A, {"role": "tool", "content": "3"}, A]},
        "messages[2]: a tool result with no tool call before it",
    ),
    "assistant_empty": (
        {"messages": [U, {"role": "assistant", "content": None}]},
        "messages[1]: an assistant turn with neither content nor tool_calls",
    ),
    "tools_not_functions": ({**GOOD_RECORD, "tools": [3]}, "tools[0]: expected a list of functions"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_each_bad_tool_record_exits_2_naming_its_line_before_output_dir(tmp_path, tiny_llama_dir, capfd, kind):
    record, words = BAD_RECORDS[kind]
    _exits_2_naming(tmp_path, tiny_llama_dir, capfd, [GOOD_RECORD, record], f"d.jsonl:2: {words}")


def test_reasoning_on_a_template_that_cannot_render_it_exits_2_naming_its_line(
    tmp_path, tiny_llama_dir, capfd, official
):
    template_file = tmp_path / "smollm2.jinja"
    template_file.write_text(official("smollm2").chat_template)
    record = {"messages": [U, {**A, "reasoning_content": "because"}]}
    _exits_2_naming(
        tmp_path,
        tiny_llama_dir,
        capfd,
        [GOOD_RECORD, record],
        "d.jsonl:2: template_name 'auto': the chat_template does not render reasoning text",
        template_name="auto",
        chat_template=str(template_file),
    )


def test_options_are_checked_with_their_key(tmp_path, tiny_llama_dir):
    from component.errors import ConfigError
    from tests.conftest import base_config
    from tests.runs import config_of

    values = base_config(
        tiny_llama_dir,
        tmp_path / "out",
        empty_think_block="promt",
        reasoning_history="each",
        chat_template=str(tmp_path / "missing.jinja"),
        datasets=[{"path": "x.jsonl", "train_on": ["replies", "thinking"]}],
        train_file=None,
    )
    with pytest.raises(ConfigError) as err:
        config_of(values)
    text = str(err.value)
    for words in (
        "key 'empty_think_block': 'promt' is not one of supervised, prompt (did you mean 'prompt'?)",
        "key 'reasoning_history': 'each' is not one of whole, per_turn",
        "key 'chat_template': ",
        "is not a file",
        "keys 'chat_template' and 'template_name' ('chatml') are both set",
        "key 'datasets[0].train_on': 'thinking' is not one of",
    ):
        assert words in text, (words, text)


def test_inspect_data_shows_each_messages_parts(tmp_path, tiny_llama_dir, official):
    import io

    from script import inspect_data
    from tests.conftest import base_config, write_config

    template_file = tmp_path / "qwen3.jinja"
    template_file.write_text(official("qwen3").chat_template)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(RECORDS["tool_call_with_reasoning"]) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    if "<|im_end|>" not in tok.get_vocab():
        pytest.skip("the tiny tokenizer has no ChatML tokens")
    values = base_config(
        tiny_llama_dir, tmp_path / "out", train_file=str(data), template_name="auto", chat_template=str(template_file)
    )
    values["max_seq_length"] = 4096
    out = io.StringIO()
    assert (
        inspect_data.main(
            ["--train_args_file", str(write_config(tmp_path / "c.json", **values)), "--color", "never"], out
        )
        == 0
    )
    text = out.getvalue()
    assert "[1] assistant, tokens learned: reasoning" in text and "tool_calls" in text
    assert "[2] tool: not learned" in text


def test_per_turn_splits_only_turns_whose_reasoning_history_drops(official):
    tok = official("qwen3")
    template = resolve_template("auto", tok)
    messages, tools = conversation("reasoning_then_plain")  # the first turn has reasoning: split
    assert len(render_examples(template, tok, messages, tools, supervision(None, reasoning_history="per_turn"))) == 2
    plain = [m._replace(reasoning=None) for m in messages]  # no reasoning anywhere: one example
    assert len(render_examples(template, tok, plain, None, supervision(None, reasoning_history="per_turn"))) == 1


def test_train_on_finds_the_reply_even_inside_the_markup_text(official):
    """A reply that also occurs in the think markup ('think') is found by difference, not by search."""
    tok = official("qwen3")
    template = resolve_template("auto", tok)
    record = {
        "messages": [
            {"role": "user", "content": "Say think"},
            {"role": "assistant", "content": "think", "reasoning_content": "x"},
        ]
    }
    conv = convert(record, FORMATS["messages"])
    for parts, expected in ((["replies"], ["think<|im_end|>"]), (["reasoning"], ["<think>\nx\n</think>\n\n"])):
        (example,) = render_examples(template, tok, conv.all_messages(), None, supervision(parts))
        assert [example.text[s:e] for s, e in example.spans] == expected


def _edited(tok, old: str, new: str):
    """The demo chat template with a piece cut out: a template that drops something."""
    template = DEMO_TEMPLATE.read_text()
    assert old in template
    edited = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "smollm2")
    edited.chat_template = template.replace(old, new)
    return edited


@pytest.mark.parametrize(
    "cut,words",
    [
        ("{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}", "does not render tool definitions"),
        (
            "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}",
            "does not render tool results",
        ),
    ],
)
def test_a_template_that_drops_tools_or_results_is_refused_by_difference(official, cut, words):
    record = json.loads(json.dumps(RECORDS["tool_call"]))
    record["messages"][3]["content"] = "21 °C in Paris."  # the result equals the reply: still caught
    record["messages"][4]["content"] = "21 °C in Paris."
    conv = convert(record, FORMATS["messages"])
    tok = _edited(
        official("smollm2"),
        cut,
        "{%- if message.role != 'tool' -%}" + cut + "{%- endif -%}" if "tool results" in words else "",
    )
    with pytest.raises(TemplateError, match=words):
        render(resolve_template("auto", tok), tok, conv.all_messages(), tools=conv.tools)


def test_reasoning_a_template_ignores_is_refused_even_when_its_text_is_elsewhere(official):
    """SmolLM2's template renders no reasoning; reasoning text that happens to be in the system
    prompt ('helpful') must not pass for rendered."""
    tok = official("smollm2")
    messages = [Message_("user", "Hi"), Message_("assistant", "Hello!", reasoning="helpful")]
    with pytest.raises(TemplateError, match="does not render reasoning text"):
        render(resolve_template("auto", tok), tok, messages)
