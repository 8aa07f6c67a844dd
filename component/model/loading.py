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
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from loguru import logger
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from component.config import Config, ModelArguments, suggest
from component.config.arguments import BASE_REWRITING_INITS, FULL_WEIGHT_MODES
from component.errors import ConfigError, format_problems
from component.model.attention import SEGMENT_SDPA, attention_for, padding_free_enabled, register_attention
from component.model.lora_layers import fp32_lora_outputs, use_cpu_lora_dropout
from component.model.model_types import ALL_LINEAR, lora_target_problems, model_type_info
from component.ranks import is_main_process

GGUF_SUFFIX = ".gguf"


class ModelLocation(NamedTuple):
    """Where from_pretrained should look: a path or hub id, and an optional GGUF file name."""

    path: str
    gguf_file: Optional[str]

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


# lora_init -> peft's init_lora_weights
# loftq: peft's default init, then replace_lora_weights_loftq on the 4-bit model (apply_lora)
LORA_INIT_WEIGHTS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}
INITIAL_ADAPTER_DIR = "adapter_init"


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
    if args.add_special_tokens:
        tokenizer.add_tokens(list(args.add_special_tokens), special_tokens=True)
    return tokenizer


EMBEDDING_MULTIPLE = 64  # rows of a grown embedding: a multiple of 64 keeps matmuls aligned


def fit_embeddings(model: PreTrainedModel, tokenizer) -> None:
    """Grow the embedding (and an untied head) to the tokenizer, to a multiple of 64, the new rows at
    the old rows' mean (transformers' mean_resizing); a model that already fits is left alone."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE, mean_resizing=True)


def added_token_ids(config: Config, tokenizer) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(config.model.add_special_tokens or []))


def trainable_token_indices(model: PreTrainedModel, ids: list[int]) -> Optional[dict[str, list[int]]]:
    """peft's trainable_token_indices for the added tokens: the input embedding's rows, and an untied
    output head's (a tied head follows the embedding)."""
    if not ids:
        return None
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    out = {names[id(model.get_input_embeddings())]: list(ids)}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        out[names[id(head)]] = list(ids)
    return out


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
    if info.lora_targets:
        return list(info.lora_targets)
    if config.method.lora_layers_to_transform:  # peft takes layers only with named targets
        return sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)}
        )
    return ALL_LINEAR


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
    if values.get("train_mode", "lora") in FULL_WEIGHT_MODES or not targets or values.get("trust_remote_code"):
        return []  # remote code: loading a config runs none of the model's code; apply_lora checks it loaded
    model_config = _cached_model_config(values)
    if model_config is None:
        return []
    problems = lora_target_problems(model_config.model_type, targets)
    empty = _empty_model(model_config)
    return problems + (unmatched_target_problems(empty, targets) if empty is not None else [])


def bf16_on_cpu(config: Config) -> bool:
    """bf16 training on the CPU: no CUDA, or `use_cpu` set."""
    on_cpu = not torch.cuda.is_available() or bool(config.training.get("use_cpu"))
    return torch_dtype(config) == torch.bfloat16 and on_cpu


def lora_fp32_output_on(config: Config) -> bool:
    """`lora_fp32_output`, its default resolved: on for bf16 training on the CPU (component/model/lora_layers.py)."""
    setting = config.method.lora_fp32_output
    return setting if setting is not None else bf16_on_cpu(config)


def apply_lora(model: PreTrainedModel, config: Config, new_token_ids: Sequence[int] = ()):
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, config)
    method = config.method
    lora = LoraConfig(
        r=method.lora_rank,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=lora_targets(config, model),
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=method.lora_variant == "dora",
        use_rslora=method.lora_variant == "rslora",
        init_lora_weights=LORA_INIT_WEIGHTS[method.lora_init],
        modules_to_save=method.modules_to_save,
        layers_to_transform=method.lora_layers_to_transform,
        trainable_token_indices=trainable_token_indices(model, list(new_token_ids)),
    )
    if checkpointing_on(config):
        # Checkpointed blocks need an input that requires grad, or the frozen
        # base cuts the graph and the adapters get no gradient.
        model.enable_input_require_grads()
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"key 'lora_target_modules': {exc}") from None
    use_cpu_lora_dropout(model)  # the same dropout, 2.5x cheaper on the CPU (component/model/lora_layers.py)
    if lora_fp32_output_on(config):
        fp32_lora_outputs(model)
    if method.lora_init in BASE_REWRITING_INITS:
        save_initial_adapter(model, config.output_dir)
    if method.lora_init == "loftq":
        apply_loftq(model, config)
    return model


def apply_loftq(model, config: Config) -> None:
    """LoftQ on the 4-bit base: each adapter starts as the best rank-r correction of its layer's
    quantization error, computed from the unquantized weights in the base's safetensors file (peft's
    replace_lora_weights_loftq; the adapter is then plain LoRA: it applies to the base as loaded)."""
    from peft import replace_lora_weights_loftq

    files = sorted(Path(resolve_location(config.model.model_name_or_path).path).glob("*.safetensors"))
    if len(files) != 1:
        raise ConfigError(
            f"key 'lora_init': 'loftq' reads the unquantized weights from one safetensors file in "
            f"{config.model.model_name_or_path}; found {len(files)}"
        )
    replace_lora_weights_loftq(model, model_path=str(files[0]))


def save_initial_adapter(model, output_dir: str) -> None:
    """PiSSA/OLoRA: keep the adapter as initialised, from which the trained one is converted at the
    end to a plain LoRA adapter for the original base (peft's path_initial_model_for_weight_conversion).
    Saved as a plain initialisation (init_lora_weights true), as peft requires; the live config keeps
    pissa/olora, so a checkpoint loaded on the original base decomposes it again, as training did."""
    if not is_main_process():
        return
    peft_config = model.peft_config["default"]
    init = peft_config.init_lora_weights
    peft_config.init_lora_weights = True
    try:
        model.save_pretrained(str(Path(output_dir) / INITIAL_ADAPTER_DIR))
    finally:
        peft_config.init_lora_weights = init


def save_converted_adapter(model, config: Config, output_dir: str) -> None:
    """PiSSA/OLoRA: the trained adapter rewritten as a plain LoRA adapter (rank doubled) that applies to
    the original base, replacing the saved one; the initial adapter is then removed."""
    if config.method.train_mode in FULL_WEIGHT_MODES or config.method.lora_init not in BASE_REWRITING_INITS:
        return
    initial = Path(output_dir) / INITIAL_ADAPTER_DIR
    model.save_pretrained(output_dir, path_initial_model_for_weight_conversion=str(initial))
    shutil.rmtree(initial, ignore_errors=True)
    logger.info(f"{config.method.lora_init} adapter converted to a plain LoRA adapter for the original base")


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


def freeze(model: PreTrainedModel, last_layers: int, modules: list[str]) -> None:
    """Freeze-tuning: only the last `last_layers` decoder layers and the parameters whose names contain
    one of `modules` train; a module name that matches nothing is refused."""
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if ".layers." in n})
    if last_layers > len(layers):
        raise ConfigError(
            f"key 'freeze_trainable_layers': {last_layers}, but the model has {len(layers)} decoder layers"
        )
    trained = {f".layers.{i}." for i in layers[len(layers) - last_layers :]} if last_layers else set()
    unmatched = [m for m in modules if not any(m in n for n, _ in model.named_parameters())]
    if unmatched:
        raise ConfigError(
            f"key 'freeze_trainable_modules': {', '.join(map(repr, unmatched))} match no parameter; the model's "
            f"top-level modules: {', '.join(sorted({n.split('.')[0] for n, _ in model.named_modules() if n}))}"
        )
    for name, param in model.named_parameters():
        param.requires_grad = any(t in name for t in trained) or any(m in name for m in modules)


def load_model(config: Config, tokenizer=None) -> PreTrainedModel:
    """The model to train; with the tokenizer, its embedding grown to added tokens (add_special_tokens)."""
    if config.method.train_mode == "qlora":
        model = load_qlora_base(config, **attention_kwargs(config))
    else:
        model = load_base_model(config.model, torch_dtype(config), **attention_kwargs(config))
    model.config.use_cache = False
    warn_precision(model.config.model_type, torch_dtype(config))
    new_ids = added_token_ids(config, tokenizer) if tokenizer is not None else []
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    if config.method.train_mode in ("lora", "qlora"):
        model = apply_lora(model, config, new_ids)
    if config.method.train_mode == "freeze":
        freeze(model, config.method.freeze_trainable_layers, config.method.freeze_trainable_modules or [])
    if bf16_on_cpu(config):
        logger.info(describe_cpu_bf16(model, quantized=config.method.train_mode == "qlora"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        f"model {model.config.model_type}: {total:,} parameters, {trainable:,} trainable "
        f"({100 * trainable / max(total, 1):.2f}%), dtype {torch_dtype(config)}"
    )
    return model
