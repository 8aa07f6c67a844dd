"""Loading the tokenizer and the model, and wrapping it for the train mode.

A model location is a hub id, a local folder, or a local `.gguf` file
(transformers dequantizes it on load). `load_model` returns the model ready
for training: full (all parameters), or LoRA via peft.

Requested LoRA targets are checked twice: at config time on the model built on
the meta device from its config on disk (no weights), so a misspelt target fails
before output_dir exists; and in `apply_lora` on the loaded model, for models
whose config is only known once loaded. peft itself trains the targets that
match and ignores the rest.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from loguru import logger
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from component.config import Config, ModelArguments, suggest
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


def checkpointing_on(config: Config) -> bool:
    """Activation checkpointing asked for: `activation_checkpointing`, or its old name
    `gradient_checkpointing` (transformers 5 still reads it, with a FutureWarning)."""
    return bool(config.training.get("activation_checkpointing") or config.training.get("gradient_checkpointing"))


def absolute_location(name_or_path: str) -> str:
    """A local path made absolute, a hub id as it is: what a run records must mean the same from any folder."""
    return os.path.abspath(name_or_path) if Path(name_or_path).exists() else name_or_path


def resolve_location(name_or_path: str) -> ModelLocation:
    """Absolute for a local model, so that the model's `name_or_path`, which peft writes into
    adapter_config.json as `base_model_name_or_path`, is found from any folder."""
    p = Path(name_or_path)
    if name_or_path.endswith(GGUF_SUFFIX):
        if not p.is_file():
            raise ConfigError(f"key 'model_name_or_path': GGUF file {name_or_path!r} not found")
        real = p.resolve()  # follow links: the GGUF name is the real file's
        return ModelLocation(str(real.parent), real.name)
    return ModelLocation(absolute_location(name_or_path), None)


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


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The leaf names of the model's linear layers (what LoRA can target), deduplicated and sorted."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer, which peft adapts too

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def unmatched_target_problems(model: torch.nn.Module, targets) -> list[str]:
    """Requested LoRA targets that name no module of `model`, with the linear names and a did-you-mean.

    A target matches as peft matches it: the module's full name, or a `.`-separated suffix of it.
    Without this, peft trains the targets that matched and ignores a misspelt one.
    """
    if not targets or isinstance(targets, str):
        return []
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if t != ALL_LINEAR and not any(n == t or n.endswith(f".{t}") for n in names)]
    if not missing:
        return []
    linear = linear_module_names(model)
    problems = []
    for target in missing:
        close = suggest(target.rsplit(".", 1)[-1], linear)
        hint = f" (did you mean {close!r}?)" if close else ""
        problems.append(
            f"key 'lora_target_modules': {target!r} matches no module of this "
            f"{model.config.model_type} model{hint}; its linear modules are: {', '.join(linear)}"
        )
    return problems


def check_lora_targets(model: PreTrainedModel, config: Config) -> None:
    """Refuse requested LoRA targets that would not train on this model type (model_types data) or that
    name no module of the loaded model."""
    targets = config.method.lora_target_modules
    problems = lora_target_problems(model.config.model_type, targets) + unmatched_target_problems(model, targets)
    if problems:
        raise ConfigError(format_problems(f"{config.source}: invalid LoRA targets", problems))


def _cached_model_config(values: dict):
    """The model's config from a local folder or the hub cache, never the network; None when unknown here."""
    name = values.get("model_name_or_path")
    if not name or name.endswith(GGUF_SUFFIX):
        return None
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # not available offline: apply_lora checks again once the model is loaded
        return None


def _empty_model(model_config) -> Optional[PreTrainedModel]:
    """The model's modules on the meta device: names and shapes, no weights, no memory, no time."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config)
    except Exception:  # an architecture transformers cannot build here: apply_lora checks the loaded model
        return None


def check_lora_target_values(values: dict) -> list[str]:
    """Config check, where the model's config is on disk: LoRA targets that would not train on the model's
    type, and targets that name no module of the model (built on the meta device, without weights)."""
    targets = values.get("lora_target_modules")
    if values.get("train_mode", "lora") == "full" or not targets or values.get("trust_remote_code"):
        return []  # remote code: loading a config runs none of the model's code; apply_lora checks it loaded
    model_config = _cached_model_config(values)
    if model_config is None:
        return []
    problems = lora_target_problems(model_config.model_type, targets)
    empty = _empty_model(model_config)
    return problems + (unmatched_target_problems(empty, targets) if empty is not None else [])


def apply_lora(model: PreTrainedModel, config: Config):
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, config)
    lora = LoraConfig(
        r=config.method.lora_rank,
        lora_alpha=config.method.lora_alpha,
        lora_dropout=config.method.lora_dropout,
        target_modules=lora_targets(config, model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if checkpointing_on(config):
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
    return quantization.prepare_for_training(model, checkpointing_on(config))


def warn_precision(model_type: str, dtype: torch.dtype) -> None:
    """Warn when a run's precision differs from the one its model type is known to train well in."""
    recommended = model_type_info(model_type).recommended_dtype
    if recommended and dtype != getattr(torch, recommended):
        logger.warning(
            f"{model_type} models are recommended to train in {recommended}; this run uses {dtype} "
            "(set fp16 and bf16 to false for fp32)"
        )


def describe_cpu_bf16(model: torch.nn.Module, quantized: bool = False) -> str:
    """What bf16 without CUDA runs: the weights' dtype and the trainable (master) parameters' dtype."""
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in trainable)) or "none"
    if torch.bfloat16 in trainable:
        master = (
            f"the trainable parameters are {names}: the optimizer updates these bf16 weights themselves, "
            "with no fp32 master copy (for fp32 master weights, set bf16: false)"
        )
    else:
        master = f"the trainable parameters (the master weights the optimizer updates) stay {names}"
    weights = "the weights not quantized to 4 bits load" if quantized else "the weights load"
    base = " (the frozen base)" if frozen else ""
    return (
        f"bf16 without CUDA: {weights} in bfloat16{base}; {master}; the forward and backward "
        "passes run under CPU autocast in bf16"
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
    if torch_dtype(config) == torch.bfloat16 and not torch.cuda.is_available():
        logger.info(describe_cpu_bf16(model, quantized=config.method.train_mode == "qlora"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        f"model {model.config.model_type}: {total:,} parameters, {trainable:,} trainable "
        f"({100 * trainable / max(total, 1):.2f}%), dtype {torch_dtype(config)}"
    )
    return model
