"""Checks of a config's values that need nothing but the values themselves.

Each check takes the merged key/value dict and returns a list of problems,
each naming its key. Checks that need a layer above the config (templates,
model types, DeepSpeed files, a task's own keys) are handed to `load_config`
by the task registry (component/tasks/registry.py); this module imports none.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from component.config.arguments import (
    AUTO_DATA_FORMAT,
    DATA_FORMATS,
    DATASET_ENTRY_KEYS,
    MIX_STRATEGIES,
    SECRET_KEYS,
)
from component.config.parse import suggest

Check = Callable[[dict[str, Any]], list[str]]
TRAIN_MODES = ("full", "lora", "qlora")
MAX_SEED = 2**32 - 1  # numpy's seed range
REQUIRED_KEYS = ("output_dir", "model_name_or_path")
# The data: one file (or folder), or a list of datasets (one of the two).
DATA_KEYS = ("train_file", "datasets")
# Each list key and the single-file key it replaces.
DATASET_LIST_KEYS = {"datasets": "train_file", "eval_datasets": "eval_file"}


def check_required(values: dict[str, Any]) -> list[str]:
    problems = [f"key '{k}' is required" for k in REQUIRED_KEYS if not values.get(k)]
    if not any(values.get(k) for k in DATA_KEYS):
        problems.append("key 'train_file' is required (or a 'datasets' list, for sft)")
    return problems


def check_train_mode(values: dict[str, Any]) -> list[str]:
    mode = values.get("train_mode", "lora")
    return choice_problems("train_mode", mode, TRAIN_MODES)


def check_precision(values: dict[str, Any]) -> list[str]:
    if values.get("fp16") and values.get("bf16"):
        return ["keys 'fp16' and 'bf16' are both true: choose one (bf16 where the hardware has it)"]
    return []


def check_lora(values: dict[str, Any]) -> list[str]:
    problems = []
    if values.get("train_mode", "lora") == "full":
        return problems
    for key in ("lora_rank", "lora_alpha"):
        if key in values and values[key] <= 0:
            problems.append(f"key '{key}': must be positive, got {values[key]}")
    dropout = values.get("lora_dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        problems.append(f"key 'lora_dropout': must be in [0, 1), got {dropout}")
    if values.get("train_mode") == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("key 'train_mode': 'qlora' needs bitsandbytes; pip install bitsandbytes, or use 'lora'")
    if values.get("train_mode") == "qlora" and str(values.get("model_name_or_path", "")).endswith(".gguf"):
        problems.append(
            "key 'train_mode': 'qlora' cannot load a .gguf file (transformers does not quantize GGUF "
            "checkpoints); use 'lora', or save the model as safetensors first (see README, QLoRA)"
        )
    return problems


def check_lengths(values: dict[str, Any]) -> list[str]:
    problems = []
    seq = values.get("max_seq_length", 1024)
    prompt = values.get("max_prompt_length", 512)
    if seq <= 1:
        problems.append(f"key 'max_seq_length': must be at least 2, got {seq}")
    if values.get("task_type") == "dpo" and (prompt <= 0 or prompt >= seq):
        problems.append(f"key 'max_prompt_length': must be between 1 and max_seq_length - 1 ({seq - 1}), got {prompt}")
    if values.get("tokenize_num_workers", 1) < 1:
        problems.append("key 'tokenize_num_workers': must be at least 1")
    return problems


def choice_problems(key: str, value: Any, choices) -> list[str]:
    """[] when `value` is one of `choices`, else the problem naming the key, the choices and the closest one."""
    if value in choices:
        return []
    hint = suggest(str(value), choices)
    return [
        f"key '{key}': {value!r} is not one of {', '.join(choices)}" + (f" (did you mean {hint!r}?)" if hint else "")
    ]


def check_data_format(values: dict[str, Any]) -> list[str]:
    return choice_problems("data_format", values.get("data_format", AUTO_DATA_FORMAT), DATA_FORMATS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry_problems(entry: dict[str, Any], where: str, strategy: str) -> list[str]:
    """One `datasets` entry: known keys, a path, and values of the right kind."""
    problems = []
    for key in entry:
        if key not in DATASET_ENTRY_KEYS:
            hint = suggest(str(key), DATASET_ENTRY_KEYS)
            problems.append(
                f"key '{where}.{key}': unknown key"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + f"; an entry takes {', '.join(DATASET_ENTRY_KEYS[:-1])}"
            )
    path = entry.get("path")
    if not isinstance(path, str) or not path.strip():
        problems.append(f"key '{where}.path': required, a local file or folder or a Hub dataset id")
    problems += choice_problems(f"{where}.format", entry.get("format", AUTO_DATA_FORMAT), DATA_FORMATS)
    for key in ("split", "subset", "revision"):
        if entry.get(key) is not None and not (isinstance(entry[key], str) and entry[key].strip()):
            problems.append(f"key '{where}.{key}': expected a non-empty string, got {entry[key]!r}")
    if "train_on" in entry:
        problems.append(f"key '{where}.train_on': not supported yet; every assistant reply is trained on")
    columns = entry.get("columns")
    if columns is not None and not (
        isinstance(columns, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())
    ):
        problems.append(f"key '{where}.columns': expected an object of source column -> format key names")
    return problems + _size_problems(entry, where, strategy)


def _size_problems(entry: dict[str, Any], where: str, strategy: str) -> list[str]:
    """weight under interleave (it sets the share), num_samples under concatenate (it sets the count)."""
    weight, samples = entry.get("weight"), entry.get("num_samples")
    if strategy == "interleave":
        if samples is not None:
            return [
                f"key '{where}.num_samples': applies with mix_strategy 'concatenate'; under 'interleave' "
                "the weights set each dataset's share"
            ]
        if not (_is_number(weight) and math.isfinite(weight) and weight > 0):
            return [f"key '{where}.weight': mix_strategy 'interleave' needs a positive weight, got {weight!r}"]
        return []
    problems = []
    if weight is not None:
        problems.append(
            f"key '{where}.weight': weights apply with mix_strategy 'interleave'; with 'concatenate' "
            "set num_samples (or set mix_strategy: interleave)"
        )
    if samples is not None and not (isinstance(samples, int) and not isinstance(samples, bool) and samples > 0):
        problems.append(f"key '{where}.num_samples': expected a positive integer, got {samples!r}")
    return problems


def check_datasets(values: dict[str, Any]) -> list[str]:
    """The `datasets` / `eval_datasets` lists, mix_strategy and mix_seed."""
    problems = []
    strategy = values.get("mix_strategy", "concatenate")
    problems += choice_problems("mix_strategy", strategy, MIX_STRATEGIES)
    seed = values.get("mix_seed")
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        problems.append(f"key 'mix_seed': must be between 0 and {MAX_SEED}, got {seed}")
    for key, single in DATASET_LIST_KEYS.items():
        entries = values.get(key)
        if entries is None:
            continue
        if values.get(single):
            problems.append(f"keys '{single}' and '{key}' are both set: choose one ('{single}' is a one-entry list)")
        if values.get("task_type", "sft") != "sft":
            problems.append(f"key '{key}': only task_type 'sft' reads a datasets list so far; use '{single}'")
        if not entries:
            problems.append(f"key '{key}': an empty list; give at least one {{\"path\": ...}} entry")
        for i, entry in enumerate(entries):
            # Eval sets are always concatenated (component/data/splits.py): no weights there.
            problems += _entry_problems(entry, f"{key}[{i}]", strategy if key == "datasets" else "concatenate")
    return problems


def check_deepspeed_file(values: dict[str, Any]) -> list[str]:
    ds = values.get("deepspeed")
    if isinstance(ds, str) and not Path(ds).is_file():
        return [f"key 'deepspeed': file {ds!r} not found"]
    return []


def _walk_numbers(value: Any):
    if isinstance(value, float):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk_numbers(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk_numbers(v)


def check_finite_numbers(values: dict[str, Any]) -> list[str]:
    return [
        f"key '{key}': must be a finite number, got {value!r}"
        for key, value in values.items()
        if any(not math.isfinite(x) for x in _walk_numbers(value))
    ]


def check_no_secrets(values: dict[str, Any]) -> list[str]:
    return [
        f"key '{key}': tokens do not belong in a config (it is saved with the outputs); "
        "set HF_TOKEN in the environment instead"
        for key in SECRET_KEYS
        if values.get(key)
    ]


def check_seed(values: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("seed", "data_seed"):
        seed = values.get(key)
        if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
            problems.append(f"key '{key}': must be between 0 and {MAX_SEED}, got {seed}")
    return problems


def check_resume_keys(values: dict[str, Any]) -> list[str]:
    problems = []
    resume = values.get("resume_from_checkpoint")
    if isinstance(resume, str) and not resume.strip():
        problems.append("key 'resume_from_checkpoint': empty; use true, a checkpoint folder, or leave it out")
    if values.get("max_nonfinite_steps", 0) < 0:
        problems.append(f"key 'max_nonfinite_steps': must be 0 or more, got {values['max_nonfinite_steps']}")
    return problems


BUILTIN_CHECKS: tuple[Check, ...] = (
    check_required,
    check_train_mode,
    check_precision,
    check_lora,
    check_lengths,
    check_data_format,
    check_datasets,
    check_deepspeed_file,
    check_finite_numbers,
    check_no_secrets,
    check_seed,
    check_resume_keys,
)
