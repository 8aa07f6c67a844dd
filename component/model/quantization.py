"""4-bit loading for QLoRA, and what merging and inference need from it.

QLoRA keeps the base model frozen in bitsandbytes NF4 with double
quantization and trains LoRA adapters on top, in the compute dtype the config
chooses (fp32, fp16 or bf16). Modules that must stay unquantized are data in
`component/model/model_types.py` (`quantization_skip`), never a branch on a name.

Under torchrun each rank loads its own copy on its own GPU (`LOCAL_RANK`);
on the CPU the model stays on the CPU, where bitsandbytes >= 0.49 runs 4-bit.

Merging dequantizes with transformers' `PreTrainedModel.dequantize()`, which
calls the same bitsandbytes `dequantize_4bit` the 4-bit layers compute with.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from loguru import logger
from transformers import BitsAndBytesConfig, PreTrainedModel

from component.model.model_types import model_type_info

QUANT_TYPE = "nf4"
DOUBLE_QUANT = True
# Name of the output head in transformers' causal LMs. bitsandbytes loading
# skips it by default, but only when no skip list is given, so we add it back.
OUTPUT_HEAD = "lm_head"
PAGED_PREFIX = "paged_"
# What a paged optimizer becomes on a device without paged (CUDA unified) memory.
PAGED_FALLBACK = {
    "paged_adamw_32bit": "adamw_torch",
    "paged_adamw_8bit": "adamw_bnb_8bit",
    "paged_lion_32bit": "lion_32bit",
    "paged_lion_8bit": "lion_8bit",
    "paged_ademamix_32bit": "ademamix",
    "paged_ademamix_8bit": "ademamix_8bit",
}
DEFAULT_FALLBACK = "adamw_torch"


def skip_modules(model_type: str) -> Optional[list[str]]:
    """Modules kept in full precision; None lets transformers skip only the output head."""
    skips = model_type_info(model_type).quantization_skip
    return [*skips, OUTPUT_HEAD] if skips else None


def bnb_config(model_type: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPE,
        bnb_4bit_use_double_quant=DOUBLE_QUANT,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip_modules(model_type),
    )


def rank_device_map() -> dict[str, object]:
    """Every module on this rank's device: its own GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def quantized_load_kwargs(model_type: str, compute_dtype: torch.dtype) -> dict:
    """Extra from_pretrained arguments that load a model in 4 bits on this rank's device."""
    return {"quantization_config": bnb_config(model_type, compute_dtype), "device_map": rank_device_map()}


def prepare_for_training(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """peft's k-bit preparation: frozen base, fp32 norms/embeddings, input grads for checkpointing."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen inputs and with DDP.
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def paged_optimizers_available() -> bool:
    return torch.cuda.is_available()


def fallback_optimizer(optim: str) -> Optional[str]:
    """The optimizer to use instead of a paged one on this device; None to keep `optim`."""
    if not optim.startswith(PAGED_PREFIX) or paged_optimizers_available():
        return None
    return PAGED_FALLBACK.get(optim, DEFAULT_FALLBACK)


def apply_optimizer_fallback(training_args) -> None:
    """Swap a paged optimizer for its unpaged twin where the device has no paged memory; warn once."""
    from transformers.training_args import OptimizerNames

    current = getattr(training_args.optim, "value", training_args.optim)
    replacement = fallback_optimizer(str(current))
    if replacement is None:
        return
    logger.warning(
        f"key 'optim': {current!r} needs paged GPU memory, which this device lacks; using {replacement!r} instead"
    )
    training_args.optim = OptimizerNames(replacement)


def is_quantized_linear(module: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def keep_training_matmul(model: torch.nn.Module) -> None:
    """Make 4-bit layers compute on the CPU exactly as in training.

    In eval mode without grad, bitsandbytes repacks CPU weights in place for a
    faster kernel; that path fails on layers narrower than a quantization
    block and changes the numerics, so merge checks and chat would no longer
    see the model that was trained.
    """
    for module in model.modules():
        if is_quantized_linear(module):
            module.support_avx512bf16_for_cpu = False


def count_quantized(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if is_quantized_linear(m))
