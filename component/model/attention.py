"""An attention that works sequence by sequence, for padding-free batches (component/data/collator.py).

Attention over a padding-free row must keep the examples apart without a dense
(rows x rows) block-diagonal mask, which makes sdpa on the CPU several times
slower than attending to each example alone. So:
- with flash-attention on a GPU: `flash_attention_2` (its varlen kernel);
- elsewhere: `segment_sdpa`, registered through transformers'
  AttentionInterface by `register_attention()` (model loading calls it). On a CUDA device in half precision it calls PyTorch's
  own variable-length FlashAttention (`torch.nn.attention.varlen`): one kernel
  per layer on the `cu_seq_lens` the collator gave, with no host sync. On the
  CPU (and in fp32) it runs plain causal sdpa on each example's slice, in fp32
  on the CPU whatever the model's dtype (faster there than bf16). Padded
  batches (an explicit mask) go to transformers' own sdpa unchanged.
Which model types may use which attention is data: `ModelTypeInfo`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from component.model.model_types import ModelTypeInfo, model_type_info

SEGMENT_SDPA = "segment_sdpa"
FLASH_ATTENTION = "flash_attention_2"
VARLEN_DTYPES = (torch.float16, torch.bfloat16)
"""The dtypes PyTorch's variable-length FlashAttention computes in."""


# ---------------------------------------------------------------- attention


def segment_bounds(position_ids: torch.Tensor, cu_seq_lens: Optional[torch.Tensor] = None) -> list[int]:
    """Start offsets of each example in a one-row batch, plus the row length at the end."""
    if cu_seq_lens is not None:
        return [int(x) for x in cu_seq_lens.tolist()]
    pos = position_ids.reshape(-1)
    breaks = torch.nonzero(pos[1:] - pos[:-1] != 1).reshape(-1) + 1
    return [0, *breaks.tolist(), pos.numel()]


def _band_mask(length: int, window: int, device) -> torch.Tensor:
    """Causal mask keeping only the last `window` keys for each query (sliding-window attention)."""
    idx = torch.arange(length, device=device)
    diff = idx[:, None] - idx[None, :]
    return (diff >= 0) & (diff < window)


def _attend_segments(query, key, value, bounds, scaling, dropout, sliding_window) -> torch.Tensor:
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        length = end - start
        if sliding_window is not None and length > sliding_window:
            mask = _band_mask(length, sliding_window, query.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=length > 1)
        outputs.append(out)
    return torch.cat(outputs, dim=2)


@functools.cache
def _torch_varlen():
    """PyTorch's varlen_attn and the names of its keyword parameters, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_usable(query: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    cu = kwargs.get("cu_seq_lens_q")
    return (
        query.is_cuda
        and query.dtype in VARLEN_DTYPES
        and not dropout
        and torch.is_tensor(cu)
        and cu.device == query.device
        and isinstance(kwargs.get("max_length_q"), int)
        and _torch_varlen() is not None
    )


def _attend_varlen(query, key, value, cu_seq_lens, max_length, scaling, sliding_window, groups) -> torch.Tensor:
    """All examples of a one-row batch in one varlen kernel; (1, heads, T, dim) in, (1, T, heads, dim) out."""
    varlen_attn, params = _torch_varlen()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, dim)
    extra = {}
    if groups > 1 and "enable_gqa" in params:
        extra["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if scaling is not None:
        extra["scale"] = scaling
    left = sliding_window - 1 if sliding_window else -1  # keys within `sliding_window` of the query, itself included
    if "window_size" in params:
        extra["window_size"] = (left, 0)
    elif sliding_window:
        raise ValueError("this torch's varlen_attn has no sliding window")
    else:
        extra["is_causal"] = True
    cu = cu_seq_lens.to(torch.int32)
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_length, max_length, **extra)
    return out.unsqueeze(0)


def segment_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa, one example at a time, for a one-row (padding-free) batch without a mask.

    The boundaries come from `cu_seq_lens_q` when the collator gave them, else
    from where `position_ids` stop counting up by one. Anything else (an
    explicit mask, several rows, decoding with a cache) goes to transformers' sdpa.
    """
    position_ids = kwargs.get("position_ids")
    one_row = query.shape[0] == 1 and query.shape[2] == key.shape[2] and query.shape[2] > 1
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or not one_row or position_ids is None or not causal:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{SEGMENT_SDPA} does not support attention logit softcapping; use eager for this model type")
    groups = getattr(module, "num_key_value_groups", 1)
    if query.is_cuda and query.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 q/k/v under CUDA autocast (QLoRA keeps its norms in fp32, and 4-bit layers return their input's
        # dtype): sdpa would run them in the autocast dtype; so does the varlen kernel, which takes half only.
        half = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(half), key.to(half), value.to(half)
    if _varlen_usable(query, dropout, kwargs):
        out = _attend_varlen(
            query,
            key,
            value,
            kwargs["cu_seq_lens_q"],
            kwargs["max_length_q"],
            scaling,
            kwargs.get("sliding_window"),
            groups,
        )
        return out, None
    # On the CPU, examples are attended in fp32, bf16/fp16 ones too, with autocast off (it would cast to bf16):
    # PyTorch's CPU flash kernel is 1.2-3x slower in bf16 than in fp32, its backward most (bench/cpu_bf16.py profile).
    dtype, on_cpu = query.dtype, query.device.type == "cpu"
    if on_cpu and dtype in (torch.float16, torch.bfloat16):
        query, key, value = query.float(), key.float(), value.float()
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = segment_bounds(position_ids, kwargs.get("cu_seq_lens_q"))
    with torch.autocast("cpu", enabled=False) if on_cpu else contextlib.nullcontext():
        out = _attend_segments(query, key, value, bounds, scaling, dropout, kwargs.get("sliding_window"))
    out = out.transpose(1, 2)
    return (out.contiguous() if out.dtype == dtype else out.to(dtype, memory_format=torch.contiguous_format)), None


def segment_sdpa_mask(batch_size: int, q_length: int, kv_length: int, attention_mask=None, **kwargs):
    """The mask for `segment_sdpa`: none for a one-row batch without padding, else sdpa's own.

    Returning None there stops transformers from building the dense
    block-diagonal mask that the packed position_ids would otherwise imply.
    """
    if attention_mask is None and batch_size == 1 and q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs
    )


def register_attention() -> None:
    """Make `segment_sdpa` a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention_forward)
    AttentionMaskInterface.register(SEGMENT_SDPA, segment_sdpa_mask)


# ---------------------------------------------------------------- choices


def flash_attention_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def padding_free_enabled(setting: Optional[bool], info: ModelTypeInfo) -> bool:
    """The config's `padding_free` (None: auto) resolved for one model type."""
    if info.recurrent:
        return False
    return info.padding_free if setting is None else setting


def padding_free_problem(setting: Optional[bool], model_type: str) -> Optional[str]:
    """Why `padding_free: true` cannot be honoured for this model type, or None."""
    info = model_type_info(model_type)
    if setting and (info.recurrent or not info.padding_free):
        why = "recurrent" if info.recurrent else "not verified to keep packed sequences apart"
        return f"key 'padding_free': model type {model_type!r} is {why}; use false (right padding)"
    return None


def attention_for(info: ModelTypeInfo, padding_free: bool) -> Optional[str]:
    """The attention implementation to load the model with; None keeps transformers' default."""
    if not padding_free:
        return None
    if flash_attention_usable() and info.flash_attention:
        return FLASH_ATTENTION
    return info.padding_free_attention
