"""QLoRA: 4-bit NF4 base + LoRA, trained on the CPU (bitsandbytes >= 0.49 runs 4-bit there)."""

from __future__ import annotations

import pytest
import torch
from loguru import logger
from transformers import TrainerCallback

pytest.importorskip("bitsandbytes")

import bitsandbytes as bnb  # noqa: E402

from component.model import loading as model_loading  # noqa: E402
from component.model import model_types, quantization  # noqa: E402
from component.model.loading import load_qlora_base  # noqa: E402
from component.runner import run  # noqa: E402
from component.training.setup import training_arguments  # noqa: E402
from tests.conftest import base_config, write_config  # noqa: E402
from tests.runs import load_config, trainer_losses  # noqa: E402


def _config(tmp_path, model_dir, **overrides):
    values = base_config(model_dir, tmp_path / "out", train_mode="qlora", max_prompt_length=64, **overrides)
    return load_config(["--train_args_file", str(write_config(tmp_path / "c.json", **values))])


class Snapshot(TrainerCallback):
    """The model's state as training begins (loaded, quantized and adapted; no step taken)."""

    def __init__(self):
        self.state: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_with_snapshot(config):
    snapshot = Snapshot()
    return run(config, callbacks=[snapshot]), snapshot.state


def test_qlora_loss_falls_and_only_adapter_changes(tmp_path, tiny_llama_dir, monkeypatch):
    trainer, before = _train_with_snapshot(_config(tmp_path, tiny_llama_dir, max_steps=8))
    model = trainer.model
    assert quantization.count_quantized(model) == 14  # 7 linear layers x 2 blocks; lm_head stays
    losses = trainer_losses(trainer)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)
    lora_b = {k for k in before if "lora_B" in k}
    assert lora_b and lora_b <= changed  # B starts at zero; every adapter learned
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_qlora_with_gradient_checkpointing(tmp_path, tiny_llama_dir, monkeypatch):
    config = _config(tmp_path, tiny_llama_dir, max_steps=3, gradient_checkpointing=True)
    trainer, before = _train_with_snapshot(config)
    after = trainer.model.state_dict()
    lora_b = [k for k in before if "lora_B" in k]
    assert all(not torch.equal(before[k], after[k]) for k in lora_b)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in trainer_losses(trainer))


def test_compute_dtype_follows_precision(tmp_path, tiny_llama_dir):
    model = load_qlora_base(_config(tmp_path, tiny_llama_dir, bf16=True))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == torch.bfloat16 for m in layers)
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # NF4 with double quantization


def test_quantization_skips_are_model_type_data(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(model_types.MODEL_TYPES, "llama", model_types.ModelTypeInfo(quantization_skip=("down_proj",)))
    model = load_qlora_base(_config(tmp_path, tiny_llama_dir))
    mlp = model.model.layers[0].mlp
    assert not isinstance(mlp.down_proj, bnb.nn.Linear4bit)
    assert isinstance(mlp.up_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays unquantized too


def test_misspelt_target_is_refused_on_the_4bit_model(tmp_path, tiny_llama_dir, monkeypatch):
    """apply_lora checks the loaded model too: its 4-bit layers count as the linear layers they replace."""
    from component.errors import ConfigError
    from component.model.loading import apply_lora

    monkeypatch.setattr(model_loading, "_cached_model_config", lambda values: None)  # config not on disk
    config = _config(tmp_path, tiny_llama_dir, lora_target_modules=["q_proj", "gateproj"])
    with pytest.raises(ConfigError) as err:
        apply_lora(load_qlora_base(config), config)
    assert "'gateproj' matches no module" in str(err.value) and "did you mean 'gate_proj'?" in str(err.value)
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in str(err.value)


def test_each_rank_uses_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert quantization.rank_device_map() == {"": 3}


def test_cpu_keeps_the_model_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert quantization.rank_device_map() == {"": "cpu"}


def test_paged_optimizer_falls_back_with_one_warning(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(quantization, "paged_optimizers_available", lambda: False)
    config = _config(tmp_path, tiny_llama_dir, optim="paged_adamw_8bit")
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    try:
        args = training_arguments(config)
        assert args.optim.value == "paged_adamw_8bit"  # saved as configured (train_args.json), then replaced
        quantization.apply_optimizer_fallback(args)
        quantization.apply_optimizer_fallback(args)  # already replaced: no second warning
    finally:
        logger.remove(sink)
    assert args.optim.value == "adamw_bnb_8bit"
    assert len(warnings) == 1 and "paged_adamw_8bit" in warnings[0]


def test_paged_optimizer_kept_where_supported(monkeypatch):
    monkeypatch.setattr(quantization, "paged_optimizers_available", lambda: True)
    assert quantization.fallback_optimizer("paged_adamw_32bit") is None
    monkeypatch.setattr(quantization, "paged_optimizers_available", lambda: False)
    assert quantization.fallback_optimizer("paged_adamw_32bit") == "adamw_torch"
    assert quantization.fallback_optimizer("adamw_torch") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_trains_on_gpu(tmp_path, tiny_llama_dir, monkeypatch):
    trainer, before = _train_with_snapshot(
        _config(tmp_path, tiny_llama_dir, max_steps=8, bf16=True, optim="paged_adamw_32bit")
    )
    assert next(trainer.model.parameters()).device.type == "cuda"
    losses = trainer_losses(trainer)
    assert losses[-1] < losses[0]


def test_qlora_refuses_gguf_with_a_clear_message(tmp_path):
    from component.errors import ConfigError

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"'train_mode': 'qlora' cannot load a \.gguf file"):
        _config(tmp_path, gguf)
