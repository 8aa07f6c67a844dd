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


DEFAULT_INFO = ModelTypeInfo()

# Attention models whose transformers implementation honours restarting
# position_ids with attention_mask=None (checked in tests/test_padding_free.py).
MODEL_TYPES: dict[str, ModelTypeInfo] = {
    "llama": ModelTypeInfo(),
    "mistral": ModelTypeInfo(),
    "qwen2": ModelTypeInfo(),
    "qwen3": ModelTypeInfo(),
    "gemma": ModelTypeInfo(),
    "gemma2": ModelTypeInfo(),
    "gemma3_text": ModelTypeInfo(),
    # Bloom uses ALiBi over an explicit mask: no position_ids, so no packing.
    "bloom": ModelTypeInfo(padding_free=False),
}


def model_type_info(model_type: str) -> ModelTypeInfo:
    """Facts for a model type; unknown types get conservative defaults (no padding-free)."""
    return MODEL_TYPES.get(model_type, ModelTypeInfo(padding_free=False))
