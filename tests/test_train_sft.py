"""SFT training end to end on tiny models: the loss falls, the right weights change, outputs reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from component.training.outputs import read_meta
from tests.conftest import base_config
from tests.runs import train as train_values
from tests.runs import trainer_losses


def train(tmp_path, model_dir, name="out", **overrides):
    out = tmp_path / name
    return train_values(base_config(model_dir, out, **overrides)), out


def base_weights(model_dir):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


def test_lora_trains_only_the_adapter_and_reloads(tmp_path, tiny_llama_dir):
    from peft import PeftModel

    before = base_weights(tiny_llama_dir)
    trainer, out = train(tmp_path, tiny_llama_dir, max_steps=12, learning_rate=2e-2)
    curve = trainer_losses(trainer)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve

    model = trainer.model
    changed_adapter = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            changed_adapter += 1
    assert changed_adapter > 0
    # Base weights are untouched.
    merged_names = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in model.named_parameters()
        if "lora_" not in n
    }
    for name, value in before.items():
        if name in merged_names:
            assert torch.equal(merged_names[name].detach(), value), name

    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b), "lora_B never moved from zero"

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello there", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    meta = read_meta(str(out))
    assert meta["template_name"] == "chatml" and meta["finished"] and meta["train_mode"] == "lora"
    saved = json.loads((out / "train_args.json").read_text())
    assert saved["lora_rank"] == 8 and saved["learning_rate"] == 2e-2
    assert (out / "train.log").read_text().count("loss=") >= 12


def test_full_training_changes_weights_and_saves_model(tmp_path, tiny_llama_dir):
    before = base_weights(tiny_llama_dir)
    trainer, out = train(tmp_path, tiny_llama_dir, train_mode="full", max_steps=12, learning_rate=3e-3)
    curve = trainer_losses(trainer)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    after = reloaded.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) - 1  # every weight trains (rotary buffers aside)
    assert any(p.suffix == ".safetensors" for p in out.iterdir())


@pytest.mark.parametrize("fixture, template", [("tiny_gemma_dir", "gemma"), ("tiny_bloom_dir", "default")])
def test_lora_on_other_architectures(tmp_path, request, fixture, template):
    model_dir = request.getfixturevalue(fixture)
    trainer, out = train(tmp_path, model_dir, template_name=template, max_steps=12, learning_rate=2e-2)
    curve = trainer_losses(trainer)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_accumulation_invariance(tmp_path, tiny_llama_dir, mode):
    """Batch 4 x accumulation 1 and batch 1 x accumulation 4 give the same loss and update."""
    common = dict(
        train_mode=mode, max_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0, optim="sgd"
    )
    a, _ = train(tmp_path, tiny_llama_dir, "a", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common)
    b, _ = train(tmp_path, tiny_llama_dir, "b", per_device_train_batch_size=1, gradient_accumulation_steps=4, **common)
    assert trainer_losses(a)[0] == pytest.approx(trainer_losses(b)[0], rel=1e-5)
    wa = {k: v for k, v in a.model.named_parameters() if v.requires_grad}
    wb = {k: v for k, v in b.model.named_parameters() if v.requires_grad}
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_with_lora_trains(tmp_path, tiny_llama_dir):
    trainer, _ = train(tmp_path, tiny_llama_dir, gradient_checkpointing=True, max_steps=8, learning_rate=2e-2)
    curve = trainer_losses(trainer)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve


@pytest.mark.parametrize("key", ["activation_checkpointing", "gradient_checkpointing"])
def test_reentrant_activation_checkpointing_trains_lora_under_either_key(tmp_path, tiny_llama_dir, key):
    """transformers 5 renamed the key; under either name checkpointing is on (reentrant, which needs
    inputs that require grad while the embeddings are frozen) and the adapter learns."""
    values = base_config(
        tiny_llama_dir,
        tmp_path / "out",
        max_steps=6,
        **{key: True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
    )
    trainer = train_values(values)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules())
    curve = trainer_losses(trainer)
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2, curve
