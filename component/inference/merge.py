"""Merging a LoRA or QLoRA adapter into a full-precision copy of its base model.

The merge always happens in fp32 on the CPU and is cast to the output dtype
at the end; it never goes into 4-bit weights.

A QLoRA adapter was trained against the *dequantized* 4-bit weights, not the
original ones. Merging into the original weights adds the adapter to weights
it never saw and leaves the 4-bit rounding error between the merged model and
the trained one. Merging into the dequantized weights (`dequantized`, the
default) reproduces what the trained model computed. `measure_merge` checks
both against the trained model's logits (quantized base + adapter), so every
merge reports how exact it is.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import torch
from loguru import logger
from transformers import PreTrainedModel

from component.config import RESOLVED_CONFIG_NAME, ModelArguments
from component.data.template import Message, TemplateError, render
from component.errors import UserError
from component.inference.generation import DTYPES, adapter_base_model, is_adapter_dir, load_base, load_tokenizer_from
from component.training.outputs import META_FILE, read_meta

MERGE_BASES = ("dequantized", "original")
# Relative logit error against the trained 4-bit + adapter model (script/merge_lora.py):
#   tiny Llama, fp32:         dequantized 1.6e-07, original 8.8e-02 (tests/test_merge.py)
#   tiny Llama, bf16:         dequantized 8.4e-04, original 8.9e-02 (bf16 compute noise; 1.9e-03 when the
#                             unquantized modules came from the fp32 checkpoint instead of the bf16 load)
#   SmolLM2-135M, fp32, 8 st: dequantized 1.7e-06, original 3.3e-01
DEFAULT_QLORA_MERGE_BASE = "dequantized"
QUANTIZED_MODES = ("qlora",)
# Files that would make a stale output folder load the wrong weights.
STALE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "adapter_config.json")
PROBE_MESSAGES = [
    Message("user", "What is two plus two?"),
    Message("assistant", "Two plus two is four."),
    Message("user", "Write a short poem about the sea."),
]
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"


class MergeError(UserError):
    """The adapter, base model or output folder cannot be used for a merge."""


@dataclass
class AdapterInfo:
    """What a merge needs to know about an adapter, read from its folder."""

    adapter_dir: str
    base_model: str
    train_mode: str
    train_dtype: str
    """Precision it was trained in (fp32/fp16/bf16): the 4-bit compute dtype under QLoRA."""
    meta: dict = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.train_mode in QUANTIZED_MODES


def adapter_info(adapter_dir: str, base_model: Optional[str] = None) -> AdapterInfo:
    if not is_adapter_dir(adapter_dir):
        raise MergeError(f"--adapter_dir {adapter_dir!r}: not a LoRA adapter folder (no adapter_config.json)")
    meta = read_meta(adapter_dir) or {}
    config_path = Path(adapter_dir) / RESOLVED_CONFIG_NAME
    resolved = json.loads(config_path.read_text()) if config_path.is_file() else {}
    dtype = "bf16" if resolved.get("bf16") else "fp16" if resolved.get("fp16") else "fp32"
    return AdapterInfo(
        adapter_dir=adapter_dir,
        base_model=base_model or adapter_base_model(adapter_dir),
        train_mode=meta.get("train_mode", resolved.get("train_mode", "lora")),
        train_dtype=dtype,
        meta=meta,
    )


def check_output_dir(output_dir: str, force: bool, *inputs: str) -> None:
    out = Path(output_dir).resolve()
    if any(out == Path(p).resolve() for p in inputs if p and Path(p).exists()):
        raise MergeError(f"--output_dir {output_dir!r} is one of the inputs; choose another folder")
    if out.is_file():
        raise MergeError(f"--output_dir {output_dir!r} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MergeError(f"--output_dir {output_dir!r} is not empty; choose another folder or pass --force")


def clear_stale_weights(output_dir: str) -> None:
    """Remove weight files a previous save left, so the new model is the only one there."""
    for pattern in STALE_PATTERNS:
        for path in Path(output_dir).glob(pattern):
            path.unlink()


# ---------------------------------------------------------------- models


def _cpu_base(base_model: str) -> PreTrainedModel:
    from component.model.loading import load_base_model

    try:
        return load_base_model(ModelArguments(model_name_or_path=base_model), torch.float32)
    except (OSError, ValueError) as exc:
        raise MergeError(f"cannot load base model {base_model!r}: {exc}") from None


def _with_adapter(model: PreTrainedModel, adapter_dir: str):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from component.model.loading import fit_embeddings

    if (Path(adapter_dir) / "tokenizer_config.json").is_file():  # tokens the run added: grow the base to them
        fit_embeddings(model, AutoTokenizer.from_pretrained(adapter_dir))
    return PeftModel.from_pretrained(model, adapter_dir)


def trained_quantized_model(info: AdapterInfo):
    """The model as trained: 4-bit base (same dtype and preparation as training) + adapter."""
    from component.model.quantization import prepare_for_training

    model = load_base(info.base_model, DTYPES[info.train_dtype], load_in_4bit=True)
    model = prepare_for_training(model, gradient_checkpointing=False)  # fp32 norms, as in training
    return model


def dequantized_base(info: AdapterInfo) -> PreTrainedModel:
    """The base as trained (4-bit, in the training dtype), dequantized by transformers, in fp32 on the CPU.

    Every other module keeps the training dtype's values too, as the trained model did.
    """
    quantized = load_base(info.base_model, DTYPES[info.train_dtype], load_in_4bit=True)
    return quantized.dequantize(dtype=torch.float32).to(device="cpu", dtype=torch.float32)


def merged_model(info: AdapterInfo, merge_base: str) -> PreTrainedModel:
    """Base (original or dequantized) + adapter, merged in fp32."""
    base = dequantized_base(info) if merge_base == "dequantized" else _cpu_base(info.base_model)
    return _with_adapter(base, info.adapter_dir).merge_and_unload()


# ---------------------------------------------------------------- measuring


def probe_ids(tokenizer, template_name: Optional[str]) -> torch.Tensor:
    """A fixed probe: a rendered conversation (when the template is known) and plain text."""
    from component.data.tokenizer_template import resolve_template

    text = PROBE_TEXT
    if template_name:
        try:
            text = render(resolve_template(template_name, tokenizer), tokenizer, PROBE_MESSAGES).text + text
        except (TemplateError, UserError):
            pass  # the plain text alone still probes the merge
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).norm() / reference.norm())


@dataclass
class MergeResult:
    model: PreTrainedModel
    merge_base: Optional[str]
    errors: dict[str, float]
    """Relative logit error against the trained model, per merge base (LoRA: 'merged')."""


def merge_lora(info: AdapterInfo, probe: torch.Tensor) -> MergeResult:
    """LoRA: merge into the base in fp32 and measure against the unmerged base + adapter."""
    model = _with_adapter(_cpu_base(info.base_model), info.adapter_dir)
    reference = logits(model, probe)
    merged = model.merge_and_unload()
    return MergeResult(merged, None, {"merged": relative_error(logits(merged, probe), reference)})


def merge_qlora(info: AdapterInfo, probe: torch.Tensor, merge_base: str, measure_all: bool = True) -> MergeResult:
    """QLoRA: merge into `merge_base`, measuring each candidate against the trained 4-bit model."""
    trained = _with_adapter(trained_quantized_model(info), info.adapter_dir)
    reference = logits(trained, probe)
    del trained
    errors: dict[str, float] = {}
    chosen = None
    for candidate in MERGE_BASES if measure_all else (merge_base,):
        model = merged_model(info, candidate)
        errors[candidate] = relative_error(logits(model, probe), reference)
        logger.info(f"merge into {candidate} weights: relative logit error {errors[candidate]:.3e}")
        if candidate == merge_base:
            chosen = model
        else:
            del model
    return MergeResult(chosen, merge_base, errors)


def merge(info: AdapterInfo, tokenizer, merge_base: Optional[str] = None, measure_all: bool = True) -> MergeResult:
    probe = probe_ids(tokenizer, info.meta.get("template_name"))
    if info.quantized:
        return merge_qlora(info, probe, merge_base or DEFAULT_QLORA_MERGE_BASE, measure_all)
    return merge_lora(info, probe)


# ---------------------------------------------------------------- saving


def save_merged(result: MergeResult, info: AdapterInfo, tokenizer, output_dir: str, dtype: str) -> Path:
    """Safetensors in `dtype`, the tokenizer, and training_meta.json (template, provenance; absolute paths,
    so the merged folder works from any directory)."""
    from component.model.loading import absolute_location

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_stale_weights(output_dir)
    model = result.model.to(DTYPES[dtype])
    model.config.use_cache = True  # training turned it off; inference wants it
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        **info.meta,
        "base_model": absolute_location(info.base_model),
        "merged_from": absolute_location(info.adapter_dir),
        "merge_base": result.merge_base,
        "merge_logit_errors": result.errors,
        "dtype": dtype,
        "finished": True,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_merge_tokenizer(info: AdapterInfo):
    try:
        return load_tokenizer_from(info.adapter_dir, info.base_model)
    except UserError as exc:
        raise MergeError(str(exc)) from None


# ---------------------------------------------------------------- the command (script/merge_lora.py)


def merge_adapter(
    adapter_dir: str,
    output_dir: str,
    base_model: Optional[str] = None,
    dtype: Optional[str] = None,
    force: bool = False,
    merge_base: str = DEFAULT_QLORA_MERGE_BASE,
    measure_all: bool = True,
    out: Optional[TextIO] = None,
) -> None:
    """Check, merge, save in `dtype` (default: the training precision), and print each measured error."""
    info = adapter_info(adapter_dir, base_model)
    check_output_dir(output_dir, force, adapter_dir, info.base_model)
    tokenizer = load_merge_tokenizer(info)
    logger.info(f"merging {info.train_mode} adapter {info.adapter_dir} into {info.base_model}")
    result = merge(info, tokenizer, merge_base, measure_all=measure_all)
    saved = save_merged(result, info, tokenizer, output_dir, dtype or info.train_dtype)
    out = out or sys.stdout
    for name, error in result.errors.items():
        if result.merge_base is None:
            out.write(f"relative logit error, merged model vs base + adapter: {error:.3e}\n")
        else:
            chosen = " (saved)" if name == result.merge_base else ""
            out.write(f"relative logit error, merged into {name} weights vs trained 4-bit model: {error:.3e}{chosen}\n")
    out.write(f"merged model saved to {saved}\n")
