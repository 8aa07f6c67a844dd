"""Mistakes in a config that used to pass silently: a misspelt LoRA target, fp16 without CUDA.

Each is refused with the key, the reason and the fix, before output_dir exists where the
model's config is on disk; bf16 on the CPU is accepted and says what precision really runs.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from component.cli import main_train
from component.errors import ConfigError
from component.model import loading as model_module
from component.model.loading import apply_lora
from component.training.setup import training_arguments
from tests.conftest import base_config, write_config
from tests.runs import config_of, load_config

TINY_LLAMA_LINEAR = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def _argv(tmp_path, model_dir, **overrides) -> list[str]:
    values = base_config(model_dir, tmp_path / "out", max_prompt_length=64, **overrides)
    return ["--train_args_file", str(write_config(tmp_path / "c.json", **values))]


# ---------------------------------------------------------------- LoRA targets


def test_misspelt_lora_target_is_a_config_error_before_output_dir(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError) as err:
        load_config(_argv(tmp_path, tiny_llama_dir, lora_target_modules=["q_proj", "vproj"]))
    text = str(err.value)
    assert "key 'lora_target_modules': 'vproj' matches no module" in text
    assert "did you mean 'v_proj'?" in text and f"its linear modules are: {TINY_LLAMA_LINEAR}" in text
    assert "'q_proj' matches" not in text  # only the typo is reported
    assert not (tmp_path / "out").exists()


def test_targets_match_as_peft_matches_them(tmp_path, tiny_llama_dir):
    """A leaf name or a full module path is a target; a misspelt path is reported by its leaf."""
    load_config(_argv(tmp_path, tiny_llama_dir, lora_target_modules=["model.layers.0.self_attn.q_proj", "up_proj"]))
    with pytest.raises(ConfigError, match="'model.layers.0.self_attn.qproj' matches no module.*'q_proj'"):
        load_config(_argv(tmp_path, tiny_llama_dir, lora_target_modules=["model.layers.0.self_attn.qproj"]))


def test_misspelt_target_checked_again_when_lora_is_applied(tmp_path, tiny_llama_dir, monkeypatch):
    """A model whose config is not on disk (a hub model not cached) is checked once loaded, before peft."""
    monkeypatch.setattr(model_module, "_cached_model_config", lambda values: None)
    config = config_of(base_config(tiny_llama_dir, tmp_path / "out", lora_target_modules=["q_proj", "vproj"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ConfigError) as err:
        apply_lora(model, config)
    assert "'vproj' matches no module" in str(err.value) and "did you mean 'v_proj'?" in str(err.value)
    assert TINY_LLAMA_LINEAR in str(err.value)


def test_a_target_far_from_every_name_gets_the_list_without_a_guess(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError) as err:
        load_config(_argv(tmp_path, tiny_llama_dir, lora_target_modules=["attention"]))
    assert "'attention' matches no module" in str(err.value) and "did you mean" not in str(err.value)
    assert TINY_LLAMA_LINEAR in str(err.value)


# ---------------------------------------------------------------- precision without CUDA


@NO_CUDA
def test_fp16_without_cuda_is_refused_before_output_dir(tmp_path, tiny_llama_dir):
    argv = _argv(tmp_path, tiny_llama_dir, fp16=True)
    with pytest.raises(ConfigError) as err:
        training_arguments(load_config(argv))
    text = str(err.value)
    assert "key 'fp16'" in text and "no CUDA GPU" in text and "bf16: true" in text and "fp32" in text
    assert main_train(argv) == 2  # train.py: a user error, exit status 2
    assert not (tmp_path / "out").exists()


@NO_CUDA
@pytest.mark.parametrize(
    "mode, says",
    [
        ("full", "the optimizer updates these bf16 weights themselves, with no fp32 master copy"),
        ("lora", "the trainable parameters (the master weights the optimizer updates) stay float32"),
    ],
)
def test_bf16_on_the_cpu_says_what_precision_runs(tmp_path, tiny_llama_dir, mode, says):
    assert main_train(_argv(tmp_path, tiny_llama_dir, bf16=True, train_mode=mode, max_steps=1)) == 0
    said = [m for m in (tmp_path / "out" / "train.log").read_text().splitlines() if "bf16 without CUDA" in m]
    assert len(said) == 1 and "the weights load in bfloat16" in said[0] and says in said[0]
    assert ("(the frozen base)" in said[0]) == (mode == "lora")
