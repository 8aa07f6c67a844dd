"""LoRA training on the CPU, in fp32 and bf16: what runs in which dtype, and that the cheaper paths change nothing.

- LoRA's dropout (`CpuLoraDropout`, component/model/lora_layers.py): the drop rate and scale of
  `nn.Dropout`, its masks fixed by torch's seed and RNG state, and it is what `apply_lora` installs;
- `lora_fp32_output`: under autocast an adapted layer returns base + adapter in fp32, so an update
  smaller than bf16's rounding step still reaches the forward pass; outside autocast nothing changes;
- segment attention (component/model/attention.py) attends bf16 examples in fp32 on the CPU;
- under `bf16: true` on the CPU the frozen base is bf16, the adapters (the optimizer's master
  weights) fp32, and LoRA's input is not cast to fp32 only to be cast back by autocast;
- the bf16 loss curve stays within 1% of fp32's.
Speed is measured in bench/cpu_bf16.py, not here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from component.model.attention import segment_sdpa_attention_forward
from component.model.lora_layers import DRAW_LEVELS, CpuLoraDropout, fp32_lora_outputs, keep_mask
from tests.conftest import base_config
from tests.runs import train, trainer_losses

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 on the CPU: the behaviour without CUDA")


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_mask_has_nn_dropouts_rate_and_scale(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([500, 2000]), p, torch.float32)
    dropped = (mask == 0).float().mean().item()
    sigma = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(dropped - p) < 5 * sigma  # an off-by-one threshold or a biased draw shows here
    zero, scale = mask.unique().tolist()
    assert zero == 0.0 and scale == pytest.approx(DRAW_LEVELS / (DRAW_LEVELS - round(p * DRAW_LEVELS)))
    assert mask.mean().item() == pytest.approx(1.0, abs=5 * sigma / (1 - p))  # the expectation is kept


def test_bf16_dropout_keeps_the_expectation():
    """In bf16 the scale is not rounded first: bf16(1 / 0.95) = 1.0547 would make every kept input 0.2% large."""
    torch.manual_seed(0)
    x = (1 + torch.rand(2_000_000)).to(torch.bfloat16)  # varied values: each product rounds its own way
    out = CpuLoraDropout(0.05).train()(x)
    assert out.dtype == torch.bfloat16
    ratio = out.double().sum().item() / x.double().sum().item()
    assert ratio == pytest.approx(1.0, abs=1e-3)  # 5 sigma of the drawn mask's mean; a rounded scale gives 1.0019


def test_dropout_masks_follow_torchs_rng_state_and_gradient_is_the_mask():
    dropout = CpuLoraDropout(0.1)
    x = torch.randn(3, 64, 48, requires_grad=True)
    state = torch.get_rng_state()
    first = dropout(x)
    second = dropout(x)
    assert not torch.equal(first, second)  # the generator advanced
    torch.set_rng_state(state)  # what a resumed run restores
    again = dropout(x)
    assert torch.equal(first, again)
    again.sum().backward()
    zero, scale = x.grad.unique().tolist()  # the gradient is the mask: 0 where dropped, the scale where kept
    assert zero == 0.0 and scale == pytest.approx(1 / (1 - 0.1), rel=1e-4)
    assert torch.equal(x.grad == 0, again == 0)
    assert torch.equal(dropout.eval()(x), x)


def test_dropout_in_bf16_keeps_the_dtype():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert CpuLoraDropout(0.2)(x).dtype == torch.bfloat16


def test_lora_layers_get_the_cpu_dropout(tmp_path, tiny_llama_dir):
    from component.model.loading import load_model
    from tests.runs import config_of

    model = load_model(config_of(base_config(tiny_llama_dir, tmp_path / "out", lora_dropout=0.1)))
    dropouts = [
        d
        for m in model.modules()
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
        for d in m.lora_dropout.values()
    ]
    assert dropouts and all(type(d) is CpuLoraDropout and d.p == 0.1 for d in dropouts)
    model = load_model(config_of(base_config(tiny_llama_dir, tmp_path / "out", lora_dropout=0.0)))
    assert not any(isinstance(m, CpuLoraDropout) for m in model.modules())  # peft's Identity stays


# ---------------------------------------------------------------- attention


class _Attention(nn.Module):
    num_key_value_groups = 2
    is_causal = True


def test_segment_attention_on_the_cpu_attends_bf16_in_fp32():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 10, 8, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 10, 8, dtype=torch.bfloat16) for _ in range(2))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = segment_sdpa_attention_forward(_Attention(), q, k, v, None, position_ids=positions)
    expected = []
    for start, end in ((0, 4), (4, 7), (7, 10)):
        qs, ks, vs = q[:, :, start:end].float(), k[:, :, start:end].float(), v[:, :, start:end].float()
        ks, vs = ks.repeat_interleave(2, dim=1), vs.repeat_interleave(2, dim=1)
        expected.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    expected = torch.cat(expected, dim=2).transpose(1, 2).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out, expected)  # bf16 attention would differ in the last bits


# ---------------------------------------------------------------- a bf16 run on the CPU


class _LoraDtypes(TrainerCallback):
    """Records, during training steps, the dtypes of what reaches LoRA's A matrices and of what q_proj returns."""

    def __init__(self):
        self.inputs: set[torch.dtype] = set()
        self.outputs: set[torch.dtype] = set()
        self.handles = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for name, module in model.named_modules():
            if name.endswith("lora_A.default"):
                self.handles.append(module.register_forward_pre_hook(lambda m, i: self.inputs.add(i[0].dtype)))
            if name.endswith("q_proj"):
                self.handles.append(module.register_forward_hook(lambda m, i, o: self.outputs.add(o.dtype)))

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()


def _bf16_run(tmp_path, model_dir, **overrides):
    seen = _LoraDtypes()
    values = base_config(model_dir, tmp_path / "out", bf16=True, max_steps=2, lora_dropout=0.1, **overrides)
    return train(values, callbacks=[seen]), seen


@NO_CUDA
def test_bf16_on_the_cpu_bf16_base_fp32_adapters_and_no_cast_of_their_input(tmp_path, tiny_llama_dir):
    trainer, seen = _bf16_run(tmp_path, tiny_llama_dir, lora_fp32_output=False)
    params = dict(trainer.model.named_parameters())
    assert {p.dtype for p in params.values() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}
    assert seen.inputs == {torch.bfloat16}  # peft's cast to the adapter's fp32 is off under autocast
    assert seen.outputs == {torch.bfloat16}
    layer = next(m for n, m in trainer.model.named_modules() if n.endswith("q_proj"))
    assert layer.cast_input_dtype_enabled  # outside training (no autocast) peft casts again


@NO_CUDA
def test_bf16_on_the_cpu_lora_layers_return_fp32_by_default(tmp_path, tiny_llama_dir):
    trainer, seen = _bf16_run(tmp_path, tiny_llama_dir)
    assert seen.outputs == {torch.float32}
    q_proj = next(m for n, m in trainer.model.named_modules() if n.endswith("q_proj"))
    x = torch.randn(1, 3, q_proj.in_features, dtype=torch.bfloat16)
    assert q_proj(x).dtype == torch.bfloat16  # no autocast (generation, evaluation): the model's own dtype


@pytest.mark.parametrize(
    "cuda,values,on",
    [
        (False, {"bf16": True}, True),
        (True, {"bf16": True}, False),  # a GPU run: off
        (True, {"bf16": True, "use_cpu": True}, True),  # a CUDA machine told to train on the CPU: on
        (False, {"bf16": False}, False),
        (False, {"bf16": True, "lora_fp32_output": False}, False),
        (True, {"bf16": True, "lora_fp32_output": True}, True),
    ],
)
def test_lora_fp32_output_default_follows_the_training_device(tmp_path, tiny_llama_dir, monkeypatch, cuda, values, on):
    from component.model.loading import lora_fp32_output_on
    from tests.runs import config_of

    config = config_of(base_config(tiny_llama_dir, tmp_path / "o", **values))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert lora_fp32_output_on(config) is on


def test_fp32_output_keeps_an_update_smaller_than_bf16s_rounding_step():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    nn.init.zeros_(base.weight)
    nn.init.ones_(base.bias)  # every output 1.0: bf16's step there is 2**-7
    model = nn.Sequential(base).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["0"], init_lora_weights=True))
    layer = model.base_model.model[0]
    nn.init.constant_(layer.lora_B["default"].weight, 0.0)
    x = torch.randn(8, 64, dtype=torch.bfloat16)

    def forward():  # a fresh autocast each time: autocast caches its bf16 copy of the weights within one
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    def delta():
        before = forward()
        with torch.no_grad():
            layer.lora_B["default"].weight.fill_(1e-5)  # a change of about 1e-4: below half a step
        after = forward()
        with torch.no_grad():
            layer.lora_B["default"].weight.zero_()
        return (after - before).abs().max().item()

    assert delta() == 0.0  # bf16 output: the update is rounded away
    assert fp32_lora_outputs(model) == 1
    assert delta() > 0.0


@NO_CUDA
def test_bf16_loss_curve_within_one_percent_of_fp32(tmp_path, tiny_llama_dir):
    common = dict(max_steps=12, lora_dropout=0.1, learning_rate=2e-3)
    fp32 = trainer_losses(train(base_config(tiny_llama_dir, tmp_path / "fp32", **common)))
    bf16 = trainer_losses(train(base_config(tiny_llama_dir, tmp_path / "bf16", bf16=True, **common)))
    assert len(fp32) == len(bf16) == 12
    assert max(abs(b - f) / f for f, b in zip(fp32, bf16, strict=True)) < 0.01
    assert bf16 != fp32  # bf16 really ran
