"""`template_name: "auto"`: the tokenizer's own chat_template, masked by conversation prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from component.data.template import encode, render
from component.data.template_registry import get_template
from component.data.tokenizer_template import AutoTemplate, resolve_template
from component.errors import ConfigError
from component.tasks.sft import build_data
from component.training.setup import training_arguments
from tests.conftest import base_config, write_config
from tests.runs import load_config
from tests.test_templates_parity import CASES

TOKENIZERS = Path(__file__).parent / "assets" / "tokenizers"


@pytest.fixture(scope="module")
def official():
    return lambda name: AutoTokenizer.from_pretrained(TOKENIZERS / name)


@pytest.mark.parametrize(
    "asset,name", [("smollm2", "smollm"), ("llama3_1", "llama3"), ("gemma3", "gemma"), ("qwen3", "qwen3")]
)
def test_auto_gives_the_named_templates_ids_and_mask(official, asset, name):
    tok = official(asset)
    auto = resolve_template("auto", tok)
    assert isinstance(auto, AutoTemplate) and auto.stop_text(tok) == get_template(name).stop_text(tok)
    for case, msgs in CASES.items():
        assert encode(tok, render(auto, tok, msgs)) == encode(tok, render(get_template(name), tok, msgs)), case


def test_missing_template_name_means_the_tokenizers_own(official):
    tok = official("smollm2")
    assert resolve_template(None, tok) == resolve_template("auto", tok)


@pytest.mark.parametrize("asset,suggest", [("llama3", "llama3")])
def test_unmaskable_chat_templates_fail_naming_the_template_and_a_named_one(official, asset, suggest):
    # Llama-3.0 appends an assistant header after every render, so a finished conversation does
    # not end at its last reply's end-of-turn token.
    with pytest.raises(ConfigError, match=f"template_name 'auto'.*cannot be masked by prefixes.*{suggest}"):
        resolve_template("auto", official(asset))


def test_no_template_name_and_no_chat_template_is_a_config_error(official):
    tok = official("gpt_neox")
    assert not tok.chat_template
    with pytest.raises(ConfigError, match=r"template_name \(missing\).*has no chat_template.*chatml"):
        resolve_template(None, tok, "models/neox")


def test_build_data_resolves_auto_and_missing_template_name(tmp_path, tiny_llama_dir, official):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    values = base_config(tiny_llama_dir, tmp_path / "out")
    values.pop("template_name")
    config = load_config(["--train_args_file", str(write_config(tmp_path / "c.json", **values))])
    if not tok.chat_template:
        with pytest.raises(ConfigError, match="template_name"):
            build_data(config, training_arguments(config), tok)
    tok.chat_template = official("smollm2").chat_template
    data = build_data(config, training_arguments(config), tok)
    named = load_config(
        ["--train_args_file", str(write_config(tmp_path / "n.json", **{**values, "template_name": "smollm"}))]
    )
    assert data.train["labels"] == build_data(named, training_arguments(named), tok).train["labels"]
    assert data.summary.supervised_tokens > 0


def test_auto_on_the_llama2_template_matches_the_named_one():
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer(bos="<s>", eos="</s>")
    tok.chat_template = (TOKENIZERS.parent / "chat_templates" / "llama2.jinja").read_text()
    auto = resolve_template("auto", tok)
    assert auto.stop_word == "</s>"
    for case, msgs in CASES.items():
        assert encode(tok, render(auto, tok, msgs)) == encode(tok, render(get_template("llama2"), tok, msgs)), case
