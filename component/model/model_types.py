"""Per-model-type facts, looked up by `config.model_type`, never by name or path.

Each entry records what the training code must know about an architecture:
which modules LoRA should adapt, which modules must stay unquantized under
4-bit QLoRA, whether its attention keeps packed (padding-free) sequences
apart, and whether it is recurrent (no packing, right padding only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class ModelTypeInfo:
    """What the trainer needs to know about one architecture."""

    lora_targets: Optional[tuple[str, ...]] = None
    """Default LoRA targets; None means every linear layer but the output head."""
    refused_lora_targets: tuple[tuple[str, str], ...] = ()
    """(module name, reason) pairs a user may not target."""
    quantization_skip: tuple[str, ...] = ()
    """Modules kept in full precision when the model is loaded in 4 bits."""
    padding_free: bool = True
    """Attention keeps sequences apart given restarting position_ids (padding-free batches)."""
    recurrent: bool = False
    """A recurrent model: right padding only, never packed."""
    recommended_dtype: Optional[str] = None
    """Precision that is known to train well; None: whatever the config says."""
    padding_free_attention: Optional[str] = "segment_sdpa"
    """Attention for padding-free batches without flash-attention (component/model/attention.py);
    None keeps transformers' default, which masks the packed row densely (correct, slower)."""
    flash_attention: bool = True
    """flash_attention_2's varlen path may serve padding-free batches on a GPU."""
    lean_loss: bool = True
    """The output head may be applied to labelled positions only (component/training/loss.py)."""


DEFAULT_INFO = ModelTypeInfo()

# Attention models whose transformers implementation honours restarting
# position_ids with attention_mask=None (checked in tests/test_padding_free.py).
MODEL_TYPES: dict[str, ModelTypeInfo] = {
    "llama": ModelTypeInfo(),
    "mistral": ModelTypeInfo(),
    "qwen2": ModelTypeInfo(),
    "qwen3": ModelTypeInfo(),
    "gemma": ModelTypeInfo(),
    # Attention logit softcapping: sdpa cannot apply it, so keep transformers' default.
    "gemma2": ModelTypeInfo(padding_free_attention=None),
    "gemma3_text": ModelTypeInfo(),
    # Bloom uses ALiBi over an explicit mask: no position_ids, so no packing.
    "bloom": ModelTypeInfo(padding_free=False),
}

# ---------------------------------------------------------------- Mamba
# Which Mamba modules can LoRA train? Read from transformers 5.24's
# modeling_mamba.py (MambaMixer.forward) and checked in tests/test_mamba.py.
# Training runs one of two paths:
# - fast path (CUDA, mamba_ssm + causal_conv1d installed, model.training and no
#   cache): `mamba_inner_fn(self.in_proj(x), self.conv1d.weight, ...,
#   self.x_proj.weight, self.dt_proj.weight, self.out_proj.weight, ...)`. Only
#   in_proj runs as a module; the kernel gets the raw weights of conv1d,
#   x_proj, dt_proj and out_proj, so a LoRA wrapper around them never runs:
#   its adapter is saved, but receives no gradient and never changes.
# - slow path (PyTorch, e.g. the CPU): in_proj, x_proj and out_proj run as
#   modules, but conv1d (`causal_conv1d_fn(x, self.conv1d.weight, ...)`) and
#   dt_proj (`self.dt_proj.weight @ time_step`) are read raw here too.
# So in_proj is the only mixer module whose adapter trains on both paths.
# embeddings (and lm_head) run as modules on both paths, but the
# state-spaces/mamba-*-hf checkpoints tie them to one matrix: merging an
# adapter on either rewrites both, so the merged model is not base+adapter
# (measured in tests/test_mamba.py). peft 0.21 refuses out_proj and
# conv1d on Mamba models outright (tuners_utils._check_lora_target_modules_mamba).
# The fast path also ignores attention_mask, so only right padding is exact.
# 4-bit QLoRA: dt_proj and lm_head must stay unquantized for the PyTorch path
# to run at all (measured on the CPU: `dt_proj.weight @ x` on a packed 4-bit
# tensor fails, as does the tied head); the fast path would also read x_proj's
# and out_proj's packed weights raw, so they stay unquantized too.
_KERNEL_BYPASS = (
    "the CUDA fast path (mamba_ssm's mamba_inner_fn) reads {0}.weight directly, "
    "so its adapter is saved but never trained"
)
_TIED = (
    "it shares one matrix with {0} in Mamba checkpoints (tied weights), so merging its adapter also "
    "changes {0}: the merged model's logits would not be base+adapter"
)
MAMBA_REFUSED_LORA_TARGETS = (
    ("x_proj", _KERNEL_BYPASS.format("x_proj")),
    ("dt_proj", _KERNEL_BYPASS.format("dt_proj") + "; the PyTorch path reads it raw too (dt_proj.weight @ x)"),
    ("out_proj", "peft refuses it on Mamba models, and " + _KERNEL_BYPASS.format("out_proj")),
    ("conv1d", "peft refuses it on Mamba models, and both paths read conv1d.weight directly"),
    ("embeddings", _TIED.format("lm_head")),
    ("lm_head", _TIED.format("embeddings")),
)
MODEL_TYPES["mamba"] = ModelTypeInfo(
    lora_targets=("in_proj",),
    refused_lora_targets=MAMBA_REFUSED_LORA_TARGETS,
    quantization_skip=("x_proj", "dt_proj", "out_proj", "lm_head"),
    padding_free=False,
    recurrent=True,
    recommended_dtype="float32",
)
# Mamba2 (modeling_mamba2.py, Mamba2Mixer.forward): the fast path
# `mamba2_split_conv1d_scan_combined(self.in_proj(x), self.conv1d.weight, ...,
# outproj_weight=self.out_proj.weight)` runs only in_proj as a module; the
# PyTorch path runs in_proj and out_proj as modules and reads conv1d raw.
# Its checkpoints do not tie embeddings to lm_head by default, and it has no
# x_proj/dt_proj (dt is a slice of in_proj's output).
MODEL_TYPES["mamba2"] = ModelTypeInfo(
    lora_targets=("in_proj",),
    refused_lora_targets=(
        (
            "out_proj",
            "peft refuses it on Mamba models, and the CUDA fast path "
            "(mamba2_split_conv1d_scan_combined) reads out_proj.weight directly",
        ),
        ("conv1d", "peft refuses it on Mamba models, and both paths read conv1d.weight directly"),
    ),
    quantization_skip=("out_proj", "lm_head"),
    padding_free=False,
    recurrent=True,
    recommended_dtype="float32",
)


def lora_target_problems(model_type: str, targets) -> list[str]:
    """Problems with user-requested LoRA targets on this model type: each refused module, named with why.

    `targets` is a list of module names (peft matches each as a name suffix),
    or ALL_LINEAR, which on a model with refused modules would include them.
    """
    refused = dict(model_type_info(model_type).refused_lora_targets)
    if not refused or not targets:
        return []
    names = [targets] if isinstance(targets, str) else list(targets)
    problems = []
    for name in names:
        if name == ALL_LINEAR:
            default = ", ".join(model_type_info(model_type).lora_targets or ())
            problems.append(
                f"key 'lora_target_modules': {ALL_LINEAR!r} would include modules that cannot be "
                f"LoRA targets on {model_type} models (refused: {', '.join(sorted(refused))}); "
                f"leave the key unset for the default ({default})"
            )
            continue
        module = name.rsplit(".", 1)[-1]
        if module in refused:
            problems.append(
                f"key 'lora_target_modules': module {module!r} cannot be a LoRA target on "
                f"{model_type} models: {refused[module]}"
            )
    return problems


def model_type_info(model_type: str) -> ModelTypeInfo:
    """Facts for a model type; unknown types get conservative defaults (no padding-free)."""
    return MODEL_TYPES.get(model_type, ModelTypeInfo(padding_free=False, lean_loss=False))
