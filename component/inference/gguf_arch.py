"""The model types a GGUF export supports, as data: GGUF architecture, tensor layout, metadata.

One `GgufArchitecture` per transformers `model_type`, chosen from the model's config, never
from its name. Tensor names come from gguf-py's `TensorNameMap` for the architecture (the
names llama.cpp reads); a tensor it does not name is an error, never dropped. What llama.cpp
stores differently from transformers is a field here:
- `rotary_pairs`: llama.cpp's `llama` graph rotates adjacent dimension pairs, transformers'
  rotates halves, so q/k rows are permuted as llama.cpp's converter does (transformers' GGUF
  reader undoes it);
- `norm_offset`: Gemma computes `x * (1 + w)` and llama.cpp stores `1 + w`.

Metadata (`write_hparams`): context length, widths, block and head counts, head sizes, norm
epsilon, RoPE base and scaling (linear and YaRN as keys, Llama-3's as llama.cpp's `rope_freqs`
tensor), and each family's extra keys (Gemma-2's soft-capping, the sliding window).

Which of these transformers' own GGUF reader reads back is in tests/test_gguf_export.py; keys it
ignores (soft-capping, RoPE scaling) are written for llama.cpp and checked by `gguf-dump` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import gguf
import numpy as np
import torch

from component.errors import UserError


class ArchitectureError(UserError):
    """The model's architecture cannot be exported to GGUF."""


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _gemma2_keys(config, writer: gguf.GGUFWriter) -> None:
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    _sliding_keys(config, writer)


def _sliding_keys(config, writer: gguf.GGUFWriter) -> None:
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])


@dataclass(frozen=True)
class GgufArchitecture:
    """How one transformers model type is written as GGUF."""

    arch: gguf.MODEL_ARCH
    rotary_pairs: bool = False
    """llama.cpp's graph rotates adjacent pairs: permute q/k rows (the `llama` architecture)."""
    norm_offset: float = 0.0
    """Added to every `*norm.weight` (Gemma stores w, computes 1 + w; llama.cpp stores 1 + w)."""
    head_size_keys: bool = False
    """Always write attention.key_length/value_length (else only when the head size is not hidden/heads)."""
    extra_keys: Optional[Callable[[object, gguf.GGUFWriter], None]] = None
    rope_layer: str = ""
    """Where the RoPE parameters live when they are per layer type (Gemma-3: 'full_attention')."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


LLAMA = GgufArchitecture(gguf.MODEL_ARCH.LLAMA, rotary_pairs=True)
ARCHITECTURES: dict[str, GgufArchitecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,  # llama.cpp runs Mistral as `llama` (the sliding window is refused below)
    "qwen2": GgufArchitecture(gguf.MODEL_ARCH.QWEN2),
    "qwen3": GgufArchitecture(gguf.MODEL_ARCH.QWEN3, head_size_keys=True),
    "gemma": GgufArchitecture(gguf.MODEL_ARCH.GEMMA, norm_offset=1.0, head_size_keys=True),
    "gemma2": GgufArchitecture(gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, head_size_keys=True, extra_keys=_gemma2_keys),
    "gemma3_text": GgufArchitecture(
        gguf.MODEL_ARCH.GEMMA3,
        norm_offset=1.0,
        head_size_keys=True,
        extra_keys=_sliding_keys,
        rope_layer="full_attention",
    ),
}


def architecture_for(model_type: str) -> GgufArchitecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ArchitectureError(
            f"not supported yet: {model_type} (GGUF export supports {', '.join(sorted(ARCHITECTURES))})"
        ) from None


# ---------------------------------------------------------------- metadata


def _rope(config, arch: GgufArchitecture) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if arch.rope_layer:
        params = dict(params.get(arch.rope_layer) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def check_config(config, arch: GgufArchitecture) -> None:
    """What llama.cpp would silently run otherwise than transformers does, refused before any work."""
    rope_type = _rope(config, arch).get("rope_type", "default")
    if rope_type not in ("default", "linear", "yarn", "llama3"):
        raise ArchitectureError(f"not supported yet: {config.model_type} with RoPE type {rope_type!r}")
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        raise ArchitectureError(
            "not supported yet: mistral with a sliding window (llama.cpp's llama graph attends to everything)"
        )


def write_hparams(config, arch: GgufArchitecture, writer: gguf.GGUFWriter, n_vocab: int) -> None:
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    if arch.head_size_keys or head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * getattr(config, "partial_rotary_factor", 1.0)))
    rope = _rope(config, arch)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if arch.rope_layer and getattr(config, "rope_parameters", None):
        local = config.rope_parameters.get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            writer.add_rope_freq_base_swa(float(local))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings")
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
    if arch.extra_keys is not None:
        arch.extra_keys(config, writer)


# ---------------------------------------------------------------- tensors


def _permute_pairs(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: rows of each head reordered from halves to interleaved pairs."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _llama3_rope_factors(model, config) -> Optional[np.ndarray]:
    """Llama-3's RoPE scaling as llama.cpp's `rope_freqs` tensor: default frequency / scaled frequency,
    taken from the model's own rotary embedding so it matches transformers by construction."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None:
        return None
    head_dim = _head_dim(config)
    base = config.rope_parameters["rope_theta"]
    default = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (default / rotary.inv_freq.double().cpu()).float().numpy()


class GgufTensor(NamedTuple):
    """One tensor of the file: its GGUF name and shape, and a function that makes its fp32 data in
    llama.cpp's layout (only when asked for, so an export holds one converted tensor at a time)."""

    name: str
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray]


def gguf_tensors(model, arch: GgufArchitecture) -> Iterator[GgufTensor]:
    """Every tensor the file needs, named for `arch`."""
    config = model.config
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[arch.arch])
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    if _rope(config, arch).get("rope_type") == "llama3":
        factors = _llama3_rope_factors(model, config)
        if factors is None or gguf.MODEL_TENSOR.ROPE_FREQS not in allowed:
            raise ArchitectureError(f"not supported yet: {config.model_type} with Llama-3 RoPE scaling")
        yield GgufTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, lambda: factors)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reads the embedding (and transformers ties it back)
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise ArchitectureError(f"not supported yet: tensor {hf_name!r} has no name in GGUF's {arch.name}")
        kind, name = found
        permute = None
        if arch.rotary_pairs and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            permute = heads if kind == gguf.MODEL_TENSOR.ATTN_Q else kv_heads
        offset = arch.norm_offset if hf_name.endswith("norm.weight") else 0.0
        yield GgufTensor(name, tuple(tensor.shape), _converter(tensor, permute, offset))


def _converter(tensor: torch.Tensor, permute: Optional[int], offset: float) -> Callable[[], np.ndarray]:
    def convert() -> np.ndarray:
        data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        if permute is not None:
            data = _permute_pairs(data, permute)
        return data + np.float32(offset) if offset else data

    return convert
