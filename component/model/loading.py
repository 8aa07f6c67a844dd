"""Loading the tokenizer and the model, and wrapping it for the train mode.

A model location is a hub id, a local folder, or a local `.gguf` file
(transformers dequantizes it on load). `load_model` returns the model ready
for training: full (all parameters), or LoRA via peft.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from loguru import logger
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from component.config import Config, ModelArguments
from component.errors import ConfigError, format_problems
from component.model.attention import SEGMENT_SDPA, attention_for, padding_free_enabled, register_attention
from component.model.model_types import ALL_LINEAR, lora_target_problems, model_type_info

GGUF_SUFFIX = ".gguf"


class ModelLocation(NamedTuple):
    """Where from_pretrained should look: a path or hub id, and an optional GGUF file name."""

    path: str
    gguf_file: Optional[str]

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_location(name_or_path: str) -> ModelLocation:
    p = Path(name_or_path)
    if name_or_path.endswith(GGUF_SUFFIX):
        if not p.is_file():
            raise ConfigError(f"key 'model_name_or_path': GGUF file {name_or_path!r} not found")
        real = p.resolve()  # follow links: the GGUF name is the real file's
        return ModelLocation(str(real.parent), real.name)
    return ModelLocation(name_or_path, None)


def load_tokenizer(args: ModelArguments):
    loc = resolve_location(args.tokenizer_name_or_path or args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(loc.path, trust_remote_code=args.trust_remote_code, **loc.kwargs())
    if tokenizer.pad_token is None:
        # Padding positions are masked by position (labels = IGNORE_INDEX), so
        # reusing EOS as the pad token never hides a supervised EOS.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(config: Config) -> torch.dtype:
    if config.training.get("bf16"):
        return torch.bfloat16
    if config.training.get("fp16"):
        return torch.float16
    return torch.float32


def load_base_model(args: ModelArguments, dtype: torch.dtype, **extra) -> PreTrainedModel:
    loc = resolve_location(args.model_name_or_path)
    kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code, **loc.kwargs(), **extra}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if not loc.gguf_file and not args.allow_pickle_weights:
        kwargs["use_safetensors"] = True  # a pickled .bin can run code on load (component/model/weights.py)
    model = AutoModelForCausalLM.from_pretrained(loc.path, **kwargs)
    if loc.gguf_file:
        detach_gguf_quantizer(model)
    return model


def detach_gguf_quantizer(model: PreTrainedModel) -> None:
    """Mark a model loaded from GGUF as the plain float model it now is.

    transformers dequantizes every GGUF tensor to `dtype` on load but keeps a
    GGUF quantizer attached, which makes Trainer refuse to train it and
    save_pretrained write a bogus quantization_config. The weights are
    ordinary float tensors, so the marker is dropped.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def lora_targets(config: Config, model: PreTrainedModel):
    if config.method.lora_target_modules:
        return list(config.method.lora_target_modules)
    info = model_type_info(model.config.model_type)
    return list(info.lora_targets) if info.lora_targets else ALL_LINEAR


def check_lora_targets(model_type: str, config: Config) -> None:
    """Refuse requested LoRA targets that would not train on this model type (model_types data)."""
    problems = lora_target_problems(model_type, config.method.lora_target_modules)
    if problems:
        raise ConfigError(format_problems(f"{config.source}: invalid LoRA targets", problems))


def _cached_model_type(values: dict) -> Optional[str]:
    """model_type from a local folder or the hub cache, never the network; None when unknown here."""
    name = values.get("model_name_or_path")
    if not name or name.endswith(GGUF_SUFFIX):
        return None
    try:
        config = AutoConfig.from_pretrained(
            name, local_files_only=True, trust_remote_code=bool(values.get("trust_remote_code"))
        )
    except Exception:  # not available offline: apply_lora checks again once the model is loaded
        return None
    return config.model_type


def check_lora_target_values(values: dict) -> list[str]:
    """Config check: LoRA targets that would not train on the model's type, where its config is on disk."""
    if values.get("train_mode", "lora") == "full" or not values.get("lora_target_modules"):
        return []
    model_type = _cached_model_type(values)
    return lora_target_problems(model_type, values["lora_target_modules"]) if model_type else []


def apply_lora(model: PreTrainedModel, config: Config):
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model.config.model_type, config)
    lora = LoraConfig(
        r=config.method.lora_rank,
        lora_alpha=config.method.lora_alpha,
        lora_dropout=config.method.lora_dropout,
        target_modules=lora_targets(config, model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if config.training.get("gradient_checkpointing", False):
        # Checkpointed blocks need an input that requires grad, or the frozen
        # base cuts the graph and the adapters get no gradient.
        model.enable_input_require_grads()
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"key 'lora_target_modules': {exc}") from None
    return model


@functools.lru_cache(maxsize=8)
def _model_type(name_or_path: str, trust_remote_code: bool) -> str:
    loc = resolve_location(name_or_path)
    return AutoConfig.from_pretrained(loc.path, trust_remote_code=trust_remote_code, **loc.kwargs()).model_type


def read_model_type(args: ModelArguments) -> str:
    """`config.model_type` of the model to load, read without loading weights (cached per process)."""
    return _model_type(args.model_name_or_path, args.trust_remote_code)


def attention_kwargs(config: Config) -> dict:
    """attn_implementation chosen per model type (data), when padding-free batches are on."""
    info = model_type_info(read_model_type(config.model))
    attention = attention_for(info, padding_free_enabled(config.data.padding_free, info))
    if attention == SEGMENT_SDPA:
        register_attention()
    return {"attn_implementation": attention} if attention else {}


def load_qlora_base(config: Config, **extra) -> PreTrainedModel:
    """The base model in 4-bit NF4 on this rank's device, prepared for k-bit training."""
    from component.model import quantization

    dtype = torch_dtype(config)
    kwargs = quantization.quantized_load_kwargs(read_model_type(config.model), dtype)
    model = load_base_model(config.model, dtype, **kwargs, **extra)
    quantization.keep_training_matmul(model)
    logger.info(
        f"loaded {quantization.count_quantized(model)} linear layers in 4-bit "
        f"{quantization.QUANT_TYPE}, compute dtype {dtype}"
    )
    return quantization.prepare_for_training(model, config.training.get("gradient_checkpointing", False))


def warn_precision(model_type: str, dtype: torch.dtype) -> None:
    """Warn when a run's precision differs from the one its model type is known to train well in."""
    recommended = model_type_info(model_type).recommended_dtype
    if recommended and dtype != getattr(torch, recommended):
        logger.warning(
            f"{model_type} models are recommended to train in {recommended}; this run uses {dtype} "
            "(set fp16 and bf16 to false for fp32)"
        )


def load_model(config: Config) -> PreTrainedModel:
    if config.method.train_mode == "qlora":
        model = load_qlora_base(config, **attention_kwargs(config))
    else:
        model = load_base_model(config.model, torch_dtype(config), **attention_kwargs(config))
    model.config.use_cache = False
    warn_precision(model.config.model_type, torch_dtype(config))
    if config.method.train_mode in ("lora", "qlora"):
        model = apply_lora(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        f"model {model.config.model_type}: {total:,} parameters, {trainable:,} trainable "
        f"({100 * trainable / max(total, 1):.2f}%), dtype {torch_dtype(config)}"
    )
    return model
