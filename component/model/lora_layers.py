"""What runs inside peft's LoRA layers on the CPU and under bf16: a cheaper dropout, and fp32 outputs.

Dropout. PyTorch's CPU dropout draws one Bernoulli sample per element from its serial Mersenne
Twister (`bernoulli_`, about 5 ns an element here), then divides and multiplies. With LoRA on every
linear layer that is 7 masks per decoder layer: 15-20% of a SmolLM2-135M LoRA step on 2 cores, in
fp32 and bf16 alike (`python bench/cpu_bf16.py profile`). `CpuLoraDropout` cuts each 64-bit random
word into four 16-bit draws instead: an element is kept where its draw is at or above
`round(p * 65536)`, and scaled by `65536 / (65536 - round(p * 65536))`, so the expectation is kept
exactly and the drop rate is p to within 1/131072 (the scale multiplies as a float: in bf16 each
product is rounded, as in `nn.Dropout`, not the scale itself); forward and backward cost 2.5x less. The words
come from torch's default generator: a seed, and the RNG state a resumed run restores, fix the
masks as they fix `bernoulli_`'s. On a GPU (one fused kernel there) and in evaluation it is
`nn.Dropout` itself.

fp32 outputs (`lora_fp32_output`). Under bf16 autocast a LoRA layer returns
bf16(base + adapter): an adapter's contribution smaller than half of bf16's rounding step of the
output (0.2-0.4% of it) is rounded away, so early, small updates are not seen by the forward
pass and bf16 training trails fp32 (the demo's loss: 0.6% higher on average over 30 steps, 1.3% at
worst). `fp32_lora_outputs` hooks each adapted layer's base so that, under autocast only, it returns
fp32: the sum is then fp32 and so are the activations between layers (the residual stream), while
every matmul still runs in bf16. The demo's bf16 loss then stays within 0.3% of fp32's (0.03% on
average), for 6-12% of bf16's tokens/s on the CPU and about 20% more peak memory (bench/RESULTS.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

DRAW_LEVELS = 1 << 16
"""Each element's draw is one of this many values (an int16 slice of a 64-bit random word)."""


def keep_draws(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """On the CPU: where an element is kept (bool, `shape`), and the scale of a kept one, 1 / (keep rate)."""
    n = math.prod(shape)
    dropped = round(p * DRAW_LEVELS)
    # random_ over int64's whole range: each word's four int16 slices are independent uniform draws.
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    draws = words.view(torch.int16)[:n].view(shape)
    keep = draws >= dropped - DRAW_LEVELS // 2  # int16 runs from -32768: P(keep) = 1 - dropped / 65536
    return keep, DRAW_LEVELS / (DRAW_LEVELS - dropped)


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A dropout mask on the CPU: 0 where dropped, 1 / (keep rate) where kept, in `dtype`."""
    keep, scale = keep_draws(shape, p)
    return torch.where(keep, torch.tensor(scale, dtype=dtype), torch.zeros((), dtype=dtype))


class CpuLoraDropout(nn.Dropout):
    """`nn.Dropout` whose training mask, on the CPU, comes from `keep_draws` (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cheap = self.training and 0 < self.p and round(self.p * DRAW_LEVELS) < DRAW_LEVELS and x.device.type == "cpu"
        if not cheap or self.inplace:
            return super().forward(x)
        keep, scale = keep_draws(x.shape, self.p)
        # x times a Python float: in bf16 each product is rounded, not the scale itself (bf16(1 / 0.95) is 0.2% high).
        return torch.where(keep, x * scale, x.new_zeros(()))


def use_cpu_lora_dropout(model: nn.Module) -> int:
    """Swap the `nn.Dropout` of every LoRA layer (peft's `lora_dropout` dicts) for `CpuLoraDropout`; the count."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[name] = CpuLoraDropout(dropout.p).train(dropout.training)
                swapped += 1
    return swapped


HALF_DTYPES = (torch.bfloat16, torch.float16)


def _fp32_under_autocast(module: nn.Module, args, output):
    """Forward hook: a half-precision output made fp32 while autocast runs (training); else unchanged."""
    if torch.is_tensor(output) and output.dtype in HALF_DTYPES and torch.is_autocast_enabled(output.device.type):
        return output.float()
    return None


def fp32_lora_outputs(model: nn.Module) -> int:
    """Hook the base layer of every LoRA layer so that, under autocast, the layer adds its adapter's output to
    an fp32 base output and returns fp32 (see the module doc); the number of layers hooked."""
    from peft.tuners.lora import LoraLayer

    hooked = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), nn.Linear):
            module.get_base_layer().register_forward_hook(_fp32_under_autocast)
            hooked += 1
    return hooked
