"""Loading the tokenizer and the model, and wrapping it for the train mode.

A model location is a hub id, a local folder, or a local `.gguf` file
(transformers dequantizes it on load). `load_model` returns the model ready
for training: full (all parameters), or LoRA via peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from component.config import Config, ModelArguments
from component.errors import ConfigError
from component.model_types import ALL_LINEAR, model_type_info

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
    if config.training.bf16:
        return torch.bfloat16
    if config.training.fp16:
        return torch.float16
    return torch.float32


def load_base_model(args: ModelArguments, dtype: torch.dtype, **extra) -> PreTrainedModel:
    loc = resolve_location(args.model_name_or_path)
    kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code, **loc.kwargs(), **extra}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    return AutoModelForCausalLM.from_pretrained(loc.path, **kwargs)


def lora_targets(config: Config, model: PreTrainedModel):
    if config.method.lora_target_modules:
        return list(config.method.lora_target_modules)
    info = model_type_info(model.config.model_type)
    return list(info.lora_targets) if info.lora_targets else ALL_LINEAR


def apply_lora(model: PreTrainedModel, config: Config):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.method.lora_rank,
        lora_alpha=config.method.lora_alpha,
        lora_dropout=config.method.lora_dropout,
        target_modules=lora_targets(config, model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if config.training.gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or the frozen
        # base cuts the graph and the adapters get no gradient.
        model.enable_input_require_grads()
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"key 'lora_target_modules': {exc}") from None
    return model


def load_model(config: Config) -> PreTrainedModel:
    model = load_base_model(config.model, torch_dtype(config))
    model.config.use_cache = False
    if config.method.train_mode == "lora":
        model = apply_lora(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"model {model.config.model_type}: {total:,} parameters, {trainable:,} trainable "
                f"({100 * trainable / max(total, 1):.2f}%), dtype {torch_dtype(config)}")
    return model
