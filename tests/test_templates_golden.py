"""Every template pinned: text, ids and mask on one conversation, plus the template contract.

Golden values: tests/assets/golden_templates.json (rebuilt by tests/assets/build_golden.py, the
strings reviewed against the sources in each template's `source`). For the families with an
official template offline, tests/test_templates_parity.py proves the format itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from component.data.template import (
    IGNORE_INDEX,
    Message,
    TemplateError,
    conversation_messages,
    encode,
    generation_prompt,
    render,
    stop_token_ids,
)
from component.data.template_registry import TEMPLATES, get_template
from component.data.tokenizer_template import pad_eos_note, resolve_template, template_token_problems
from component.errors import ConfigError
from tests.assets.build_golden import golden, golden_tokenizer
from tests.tiny import tiny_tokenizer

GOLDEN = json.loads((Path(__file__).parent / "assets" / "golden_templates.json").read_text())
REQUIRED = {
    "default",
    "internlm",
    "internlm2",
    "qwen",
    "yi",
    "orion",
    "deepseek",
    "chatglm2",
    "chatglm3",
    "ziya2",
    "xverse",
    "minicpm",
    "minicpm3",
    "zephyr",
    "mistral",
    "mixtral",
    "baichuan",
    "baichuan2",
    "vicuna",
    "llama2",
    "llama3",
    "gemma",
    "phi3",
    "mamba",
    "chatml",
    "smollm",
    "qwen2",
    "qwen3",
}


def test_library_is_complete_and_every_template_is_pinned():
    assert REQUIRED <= set(TEMPLATES)
    assert set(GOLDEN) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_golden(name):
    assert golden(TEMPLATES[name]) == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_records_its_facts(name):
    t = TEMPLATES[name]
    assert t.source and t.stop_word and t.bos_handling
    assert t.system_mode in ("native", "fold", "refuse")
    if t.system_mode != "native":
        assert t.system_note, "a family that folds or refuses a system prompt says why"
    assert (t.system_format is not None) == (t.system_mode == "native")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_mask_is_each_reply_and_its_end_of_turn(name):
    t = TEMPLATES[name]
    tok = golden_tokenizer(t)
    assert template_token_problems(t, tok) == []
    g = GOLDEN[name]
    stop_id = tok.convert_tokens_to_ids(t.stop_text(tok))
    runs, cur = [], []
    for i, lab in zip(g["input_ids"], g["labels"], strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert len(runs) == 2 and all(r[-1] == stop_id for r in runs)
    assert [tok.decode(r, skip_special_tokens=True).strip() for r in runs] == ["Four.", "Braces stay."]
    assert stop_id in stop_token_ids(t, tok)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt_is_the_training_text_before_the_reply(name):
    t = TEMPLATES[name]
    tok = golden_tokenizer(t)
    msgs = conversation_messages([{"human": "hi", "assistant": "yo"}])
    # Qwen3's generation prompt ends with the empty think block (enable_thinking=False); by default
    # that block is supervised, and with empty_think 'prompt' it is the prompt's end, as here.
    full = render(t, tok, msgs, empty_think="prompt")
    assert full.text[: full.spans[0][0]] == generation_prompt(t, tok, msgs[:1])


def test_refusing_families_refuse_a_system_prompt_and_say_why():
    msgs = [Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "yo")]
    for name in ("orion", "chatglm2", "ziya2", "xverse", "minicpm"):
        with pytest.raises(TemplateError, match=f"template '{name}' has no system role .*no system slot"):
            render(get_template(name), tiny_tokenizer(), msgs)


def test_folding_families_put_the_system_prompt_in_the_first_user_turn_only():
    tok = tiny_tokenizer()
    msgs = conversation_messages([{"human": "Q1", "assistant": "A1"}, {"human": "Q2", "assistant": "A2"}], "Be brief")
    for name in ("gemma", "mistral", "llama2"):
        text = render(get_template(name), tok, msgs).text
        assert text.count("Be brief") == 1 and text.index("Be brief") < text.index("Q1")


def test_user_text_with_placeholders_is_not_expanded():
    tok = tiny_tokenizer()
    msgs = conversation_messages([{"human": "{bos}{eos}{system}{idx}", "assistant": "{content}"}])
    text = render(get_template("chatglm2"), tok, msgs).text
    assert "问：{bos}{eos}{system}{idx}\n\n答：{content}</s>" in text


def test_named_template_refused_when_its_tokens_are_missing():
    neox = tiny_tokenizer(bos="<|endoftext|>", eos="<|endoftext|>")
    with pytest.raises(ConfigError, match=r"(?s)template 'phi3' does not fit .*<\|user\|>, <\|assistant\|>, <\|end\|>"):
        resolve_template("phi3", neox)
    with pytest.raises(ConfigError, match=r"unknown template 'chatlm' \(did you mean 'chatml'\?\)"):
        resolve_template("chatlm", neox)
    assert resolve_template("mamba", neox).name == "mamba"


def test_pad_equal_to_eos_is_noted_and_warned_only_when_labels_lose_the_eos():
    tok = tiny_tokenizer(pad="</s>")
    t = get_template("zephyr")
    enc = encode(tok, render(t, tok, conversation_messages([{"human": "hi", "assistant": "yo"}])))
    level, msg = pad_eos_note(t, tok, enc.labels)
    assert level == "info" and "by position" in msg
    level, msg = pad_eos_note(t, tok, [IGNORE_INDEX] * 3)
    assert level == "warning" and "will not learn to stop" in msg
    assert pad_eos_note(get_template("chatml"), tok, enc.labels) is None


def test_qwen3_refuses_replies_its_official_template_would_rewrite():
    tok = golden_tokenizer(get_template("qwen3"))
    msgs = conversation_messages([{"human": "hi", "assistant": "<think>x</think>yo"}, {"human": "a", "assistant": "b"}])
    with pytest.raises(TemplateError, match="'</think>' is rewritten"):
        render(get_template("qwen3"), tok, msgs)


def test_template_errors_are_user_errors():
    from component.errors import UserError

    assert issubclass(TemplateError, UserError) and issubclass(TemplateError, ValueError)
