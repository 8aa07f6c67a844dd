"""Mistakes in a config that used to pass silently or fail late: a misspelt LoRA target, fp16 without
CUDA, training values out of range, a missing reporting integration or data file.

Each is refused with the key, the reason and the fix, before output_dir exists where the
model's config is on disk; bf16 on the CPU is accepted and says what precision really runs.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import get_available_reporting_integrations

from component.cli import main_train
from component.errors import ConfigError, UserError
from component.inference.generation import InferenceError, ModelSource
from component.model import loading as model_module
from component.model.loading import apply_lora
from component.runner import run
from component.training.setup import training_arguments
from tests.conftest import TINY_SFT, base_config, write_config
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


# ---------------------------------------------------------------- values that used to fail after the model loaded

# An integration transformers supports but this environment lacks (wandb in CI).
MISSING_INTEGRATION = next(
    n for n in ("wandb", "mlflow", "comet_ml") if n not in get_available_reporting_integrations()
)


def test_out_of_range_values_and_a_missing_integration_are_refused_at_once(tmp_path, tiny_llama_dir):
    """Issue 23: each of these used to end in a traceback once the model had loaded, with files written."""
    argv = _argv(tmp_path, tiny_llama_dir) + [
        "--per_device_train_batch_size",
        "0",
        "--learning_rate",
        "-1",
        "--report_to",
        MISSING_INTEGRATION,
    ]
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    text = str(err.value)
    assert str(tmp_path / "c.json") in text and "(3 problems in total)" in text
    assert "key 'per_device_train_batch_size': must be at least 1, got 0" in text
    assert "key 'learning_rate': must be greater than 0, got -1.0" in text
    assert f"key 'report_to': {MISSING_INTEGRATION!r} is not installed" in text and "'none'" in text
    assert main_train(argv) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("gradient_accumulation_steps", 0, "must be at least 1, got 0"),
        ("per_device_eval_batch_size", 0, "must be at least 1, got 0"),
        ("save_steps", 0, "must be greater than 0, got 0.0"),
        ("eval_steps", -5, "must be greater than 0, got -5.0"),
        ("weight_decay", -0.1, "must be at least 0, got -0.1"),
        ("adam_beta2", 1.0, "must be in [0, 1), got 1.0"),
        ("adam_epsilon", -1e-8, "must be at least 0, got -1e-08"),
        ("dataloader_num_workers", -1, "must be at least 0, got -1"),
        ("report_to", ["tensorboard", "tensorbord"], "'tensorbord' is not one of"),
    ],
)
def test_training_values_are_checked_with_the_config(tmp_path, tiny_llama_dir, key, value, says):
    with pytest.raises(ConfigError, match=re.escape(f"key '{key}': {says}")):
        load_config(_argv(tmp_path, tiny_llama_dir, **{key: value}))


def test_epochs_are_checked_only_when_they_count(tmp_path, tiny_llama_dir):
    load_config(_argv(tmp_path, tiny_llama_dir, num_train_epochs=0, max_steps=3))  # max_steps decides
    with pytest.raises(ConfigError, match="key 'num_train_epochs': must be greater than 0 when max_steps"):
        load_config(_argv(tmp_path, tiny_llama_dir, num_train_epochs=0, max_steps=-1))


def test_a_misspelt_choice_of_training_arguments_gets_a_did_you_mean(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError) as err:
        load_config(_argv(tmp_path, tiny_llama_dir, optim="adamw_torch_fusd", lr_scheduler_type="cosin"))
    text = str(err.value)
    assert "key 'optim': 'adamw_torch_fusd' is not one of" in text and "(did you mean 'adamw_torch_fused'?)" in text
    assert "key 'lr_scheduler_type': 'cosin' is not one of" in text and "(did you mean 'cosine'?)" in text


def test_a_refusal_of_training_arguments_names_its_key(tmp_path, tiny_llama_dir):
    """A value TrainingArguments refuses itself (the runner's first step): the key, the file, exit 2, no files."""
    argv = _argv(tmp_path, tiny_llama_dir, warmup_steps=-1)
    with pytest.raises(ConfigError) as err:
        training_arguments(load_config(argv))
    assert f"{tmp_path / 'c.json'}: key 'warmup_steps': " in str(err.value)
    assert main_train(argv) == 2
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- data files, QLoRA from GGUF, templates


def test_a_missing_data_file_names_its_key_the_config_and_the_closest_file(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train_sft.jsonl").write_text(TINY_SFT.read_text())
    argv = _argv(tmp_path, tiny_llama_dir, train_file="data/train_sf.jsonl", eval_file="elsewhere/eval.jsonl")
    with pytest.raises(UserError) as err:
        run(load_config(argv))
    text = str(err.value)
    assert str(tmp_path / "c.json") in text and "(2 problems in total)" in text
    assert "key 'train_file': data/train_sf.jsonl: data file not found (did you mean 'data/train_sft.jsonl'?)" in text
    assert "key 'eval_file': elsewhere/eval.jsonl: data file not found; there is no folder 'elsewhere'" in text
    assert not (tmp_path / "out").exists()


def test_a_missing_dataset_path_names_its_entry(tmp_path, tiny_llama_dir):
    datasets = [{"path": str(TINY_SFT)}, {"path": str(TINY_SFT.with_name("tiny_sfft.jsonl"))}, {"path": "someone/qa"}]
    with pytest.raises(UserError) as err:
        run(load_config(_argv(tmp_path, tiny_llama_dir, train_file=None, datasets=datasets)))
    text = str(err.value)
    assert f"key 'datasets[1].path': {TINY_SFT.with_name('tiny_sfft.jsonl')}: data file not found" in text
    assert f"(did you mean '{TINY_SFT}'?)" in text
    assert "datasets[0]" not in text and "datasets[2]" not in text  # an existing file, and a Hub id
    assert not (tmp_path / "out").exists()


def test_qlora_from_gguf_says_how_to_convert(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        config_of(base_config(gguf, tmp_path / "out", train_mode="qlora"))
    text = str(err.value)
    assert "dequantize it to a safetensors folder first" in text and "README" in text


def test_a_template_problem_at_inference_names_the_template_flag(tiny_llama_dir):
    """chat, serve and evaluate share --template: their template errors name it, not train.py's template_name."""
    with pytest.raises(InferenceError) as err:
        ModelSource(str(tiny_llama_dir)).load()  # no training_meta.json: nothing recorded
    assert "with --template NAME" in str(err.value)
    with pytest.raises(InferenceError) as err:
        ModelSource(str(tiny_llama_dir), template="chatlm").load()
    text = str(err.value)
    assert text.startswith("--template 'chatlm': unknown template") and "(did you mean 'chatml'?)" in text
    assert "template_name" not in text
