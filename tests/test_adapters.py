"""Adapter variants (issue 19's first slice): DoRA, rsLoRA, PiSSA/OLoRA/gaussian init, modules_to_save,
layers to transform. Each trains, saves, reloads on the original base with the trained logits,
merges within 1e-4, and resumes after kill -9 as the uninterrupted run."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from component.errors import ConfigError
from component.model.loading import INITIAL_ADAPTER_DIR
from component.training.checkpoints import newest_complete
from tests.conftest import TINY_SFT, base_config
from tests.runs import (
    SAVE_STEPS,
    assert_same_run,
    config_of,
    run_config,
    run_with_fault,
    train_in_process,
    trainer_losses,
)
from tests.runs import train as train_values

VARIANTS = {
    "dora": {"lora_variant": "dora"},
    "rslora": {"lora_variant": "rslora"},
    "pissa": {"lora_init": "pissa"},
    "olora": {"lora_init": "olora"},
    "gaussian": {"lora_init": "gaussian"},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "layers": {"lora_layers_to_transform": [1]},
}


def batch_of(tokenizer) -> dict:
    rows = [json.loads(line) for line in TINY_SFT.read_text().splitlines()[:2]]
    texts = [r["conversation"][0]["human"] + " " + r["conversation"][0]["assistant"] for r in rows]
    return tokenizer(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_learns_reloads_on_the_original_base_and_merges(tmp_path, tiny_llama_dir, name):
    out = tmp_path / "out"
    values = base_config(tiny_llama_dir, out, max_steps=10, lora_dropout=0.0, **VARIANTS[name])
    trainer = train_values(values)
    curve = trainer_losses(trainer)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, (name, curve)
    assert not (out / INITIAL_ADAPTER_DIR).exists()  # PiSSA/OLoRA: used for the conversion, then removed

    tokenizer = trainer.processing_class
    batch = batch_of(tokenizer)
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**batch).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # the original weights, whatever the init did
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-4)

    adapter = json.loads((out / "adapter_config.json").read_text())
    if name == "dora":
        assert adapter["use_dora"] is True
    if name in ("pissa", "olora"):  # converted: a plain LoRA of twice the rank
        assert adapter["init_lora_weights"] is True and adapter["r"] == 2 * values["lora_rank"]
    if name == "layers":
        adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in trainer.model.named_parameters() if "lora_" in n}
        assert adapted == {"1"}
    if name == "modules_to_save":
        assert any("modules_to_save" in n for n, p in trainer.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "name", ["dora", *[pytest.param(n, marks=pytest.mark.slow) for n in ("pissa", "rslora", "modules_to_save")]]
)
def test_kill9_then_resume_matches_the_uninterrupted_run(tmp_path, tiny_llama_dir, name):
    reference = tmp_path / "reference"
    train_in_process(run_config(tmp_path, tiny_llama_dir, reference, name="ref.json", **VARIANTS[name]))
    out = tmp_path / "out"
    config = run_config(tmp_path, tiny_llama_dir, out, **VARIANTS[name])
    killed = run_with_fault("kill", SAVE_STEPS + 2, config)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert newest_complete(out).path.name == f"checkpoint-{SAVE_STEPS}"
    train_in_process(config, "--resume_from_checkpoint", "true")
    assert_same_run(reference, out, resumed_from=SAVE_STEPS)


def test_adapter_keys_are_checked_with_their_reason(tmp_path, tiny_llama_dir):
    values = base_config(
        tiny_llama_dir,
        tmp_path / "out",
        train_mode="qlora",
        lora_variant="droa",
        lora_init="pissa",
        lora_layers_to_transform=[-1],
    )
    with pytest.raises(ConfigError) as err:
        config_of(values)
    text = str(err.value)
    assert "key 'lora_variant': 'droa' is not one of lora, dora, rslora (did you mean 'dora'?)" in text
    assert "key 'lora_init': 'pissa' rewrites the base weights" in text and "use train_mode 'lora'" in text
    assert "key 'lora_layers_to_transform': expected a non-empty list of layer numbers" in text


# ---------------------------------------------------------------- freeze-tuning


def test_freeze_trains_only_the_last_layers_and_named_modules(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    values = base_config(
        tiny_llama_dir, out, train_mode="freeze", freeze_trainable_layers=1, freeze_trainable_modules=["lm_head"]
    )
    trainer = train_values(values)
    curve = trainer_losses(trainer)
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2, curve
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    saved = load_file(out / "model.safetensors")
    last = max(int(k.split(".layers.")[1].split(".")[0]) for k in saved if ".layers." in k)
    changed = {k for k in saved if not torch.equal(saved[k], base[k])}
    assert changed, "nothing trained"
    for key in saved:
        should_train = f".layers.{last}." in key or "lm_head" in key
        assert (key in changed) == should_train, key


def test_freeze_keys_are_checked(tmp_path, tiny_llama_dir):
    values = base_config(tiny_llama_dir, tmp_path / "out", train_mode="freeze", freeze_trainable_layers=0)
    with pytest.raises(ConfigError, match="nothing would train"):
        config_of(values)
    values = base_config(
        tiny_llama_dir, tmp_path / "out", train_mode="freeze", freeze_trainable_modules=["lm_haed"], max_steps=1
    )
    with pytest.raises(ConfigError, match="'lm_haed' match no parameter"):
        train_values(values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peft computes LoftQ on CUDA only")
def test_loftq_starts_qlora_closer_to_the_unquantized_model(tmp_path, tiny_llama_dir):
    """LoftQ's adapter cancels part of the 4-bit error: at step 0 the QLoRA model's logits are closer
    to the full-precision base than with the default (zero) adapter."""
    from component.model.loading import load_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    errors = {}
    for init in ("default", "loftq"):
        config = config_of(base_config(tiny_llama_dir, tmp_path / init, train_mode="qlora", lora_init=init))
        model = load_model(config).eval()
        with torch.no_grad():
            out = model(input_ids=ids.to(model.device)).logits.float().cpu()
        errors[init] = float((out - reference).norm() / reference.norm())
    assert errors["loftq"] < errors["default"], errors


def test_loftq_is_refused_with_its_reason(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="'loftq' .* needs train_mode 'qlora'"):
        config_of(base_config(tiny_llama_dir, tmp_path / "x", lora_init="loftq"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'loftq' is computed by peft on CUDA only"):
            config_of(base_config(tiny_llama_dir, tmp_path / "y", train_mode="qlora", lora_init="loftq"))


@pytest.mark.parametrize("name", ["dora", "rslora", "gaussian", "modules_to_save", "layers"])
def test_each_variant_trains_under_qlora(tmp_path, tiny_llama_dir, name):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    trainer = train_values(base_config(tiny_llama_dir, out, train_mode="qlora", max_steps=4, **VARIANTS[name]))
    curve = trainer_losses(trainer)
    assert all(torch.isfinite(torch.tensor(curve))) and curve[-1] < curve[0], curve
    assert (out / "adapter_model.safetensors").is_file()


def test_pissa_is_refused_with_weights_its_conversion_would_lose(tmp_path, tiny_llama_dir):
    for extra in ({"lora_variant": "dora"}, {"modules_to_save": ["lm_head"]}, {"add_special_tokens": ["<x>"]}):
        values = base_config(tiny_llama_dir, tmp_path / "o", lora_init="pissa", **extra)
        with pytest.raises(ConfigError, match="keeps the LoRA matrices only"):
            config_of(values)
