"""Checks of a config's values that need nothing but the values themselves (and what is installed).

Each check takes the merged key/value dict and returns a list of problems,
each naming its key. Checks that need a layer above the config (templates,
model types, DeepSpeed files, a task's own keys) are handed to `load_config`
by the task registry (component/tasks/registry.py); this module imports none.
`check_data_paths` is the exception to load time: the runner calls it, since a
shipped config names data that is prepared separately.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from component.config.arguments import (
    AUTO_DATA_FORMAT,
    BASE_REWRITING_INITS,
    DATA_FORMATS,
    DATASET_ENTRY_KEYS,
    FULL_WEIGHT_MODES,
    LORA_INITS,
    LORA_VARIANTS,
    MIX_STRATEGIES,
    SECRET_KEYS,
    TRAINING_DEFAULTS,
    Config,
    training_fields,
)
from component.config.parse import suggest
from component.errors import ConfigError, format_problems

Check = Callable[[dict[str, Any]], list[str]]
TRAIN_MODES = ("full", "lora", "qlora", "freeze")
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


def check_freeze(values: dict[str, Any]) -> list[str]:
    if values.get("train_mode") != "freeze":
        return []
    layers, modules = values.get("freeze_trainable_layers", 2), values.get("freeze_trainable_modules")
    problems = []
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        problems.append(f"key 'freeze_trainable_layers': expected a number of layers >= 0, got {layers!r}")
    elif layers == 0 and not modules:
        problems.append(
            "keys 'freeze_trainable_layers' (0) and 'freeze_trainable_modules' (none): nothing would train; "
            "give a number of last layers or module names"
        )
    return problems


def check_neftune(values: dict[str, Any]) -> list[str]:
    alpha = values.get("neftune_noise_alpha")
    if alpha is None:
        return []
    if not _is_number(alpha) or alpha <= 0:
        return [f"key 'neftune_noise_alpha': must be a positive number (5 is usual), got {alpha!r}"]
    if values.get("task_type", "sft") not in ("sft", "pretrain"):
        return [
            f"key 'neftune_noise_alpha': NEFTune applies to task_type sft and pretrain, not "
            f"{values['task_type']!r}; remove it"
        ]
    return []


def check_lora(values: dict[str, Any]) -> list[str]:
    problems = []
    if values.get("train_mode", "lora") in FULL_WEIGHT_MODES:
        return problems
    for key in ("lora_rank", "lora_alpha"):
        if key in values and values[key] <= 0:
            problems.append(f"key '{key}': must be positive, got {values[key]}")
    dropout = values.get("lora_dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        problems.append(f"key 'lora_dropout': must be in [0, 1), got {dropout}")
    problems += choice_problems("lora_variant", values.get("lora_variant", "lora"), LORA_VARIANTS)
    init = values.get("lora_init", "default")
    problems += choice_problems("lora_init", init, LORA_INITS)
    if init in BASE_REWRITING_INITS and values.get("train_mode") == "qlora":
        problems.append(
            f"key 'lora_init': {init!r} rewrites the base weights from their SVD/QR (base = W - BA), which a "
            "4-bit base cannot hold; use train_mode 'lora', or lora_init 'default' with qlora"
        )
    if init in BASE_REWRITING_INITS:
        kept_apart = [
            key
            for key, on in (
                ("lora_variant: dora", values.get("lora_variant") == "dora"),
                ("modules_to_save", bool(values.get("modules_to_save"))),
                ("add_special_tokens", bool(values.get("add_special_tokens"))),
            )
            if on
        ]
        if kept_apart:
            problems.append(
                f"key 'lora_init': {init!r} with {', '.join(kept_apart)}: the adapter's conversion for the original "
                "base (peft) keeps the LoRA matrices only, so those weights would be lost from the saved adapter; "
                "use lora_init 'default' with them"
            )
    if init == "loftq" and values.get("train_mode", "lora") != "qlora":
        problems.append(
            "key 'lora_init': 'loftq' initialises the adapter against the 4-bit quantization error, so it needs "
            "train_mode 'qlora'; with lora there is no quantization error to cancel"
        )
    elif init == "loftq":
        import torch  # only here: config checks stay light

        folder = Path(str(values.get("model_name_or_path", "")))
        if not folder.is_dir() or len(list(folder.glob("*.safetensors"))) != 1:
            problems.append(
                "key 'lora_init': 'loftq' reads the unquantized weights from the base's one safetensors file, so "
                "model_name_or_path must be a local folder holding exactly one (download and merge shards first)"
            )

        if not torch.cuda.is_available():
            problems.append(
                "key 'lora_init': 'loftq' is computed by peft on CUDA only (peft.utils.loftq_utils), and there is "
                "no CUDA device here; use lora_init 'default' on this machine"
            )
    layers = values.get("lora_layers_to_transform")
    if layers is not None and not (
        isinstance(layers, list)
        and layers
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    ):
        problems.append(
            f"key 'lora_layers_to_transform': expected a non-empty list of layer numbers (0-based), got {layers!r}"
        )
    if values.get("train_mode") == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("key 'train_mode': 'qlora' needs bitsandbytes; pip install bitsandbytes, or use 'lora'")
    if values.get("train_mode") == "qlora" and str(values.get("model_name_or_path", "")).endswith(".gguf"):
        problems.append(
            "key 'train_mode': 'qlora' cannot load a .gguf file (transformers does not quantize GGUF "
            "checkpoints); use 'lora', or dequantize it to a safetensors folder first and set "
            "model_name_or_path to that folder (README, QLoRA, gives the command)"
        )
    return problems


# The task types whose examples are a prompt and a reply, cut by max_prompt_length (component/data/preference.py).
PROMPT_TASKS = ("dpo", "orpo", "simpo", "kto", "rm")


def check_lengths(values: dict[str, Any]) -> list[str]:
    problems = []
    seq = values.get("max_seq_length", 1024)
    prompt = values.get("max_prompt_length", 512)
    if seq <= 1:
        problems.append(f"key 'max_seq_length': must be at least 2, got {seq}")
    if values.get("task_type") in PROMPT_TASKS and (prompt <= 0 or prompt >= seq):
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
    roles = entry.get("roles")
    if roles is not None and not (
        isinstance(roles, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items())
    ):
        problems.append(f"key '{where}.roles': expected an object of the dataset's role name -> a ShareGPT role")
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


def check_streaming(values: dict[str, Any]) -> list[str]:
    """streaming: pretrain only; the stream has no length, so max_steps sets the run's length."""
    if not values.get("streaming"):
        return []
    problems = []
    if values.get("task_type", "sft") != "pretrain":
        problems.append("key 'streaming': only task_type 'pretrain' streams its data so far")
    steps = values.get("max_steps", -1)
    if not (isinstance(steps, int) and steps > 0):
        problems.append(
            f"key 'max_steps': streaming: true needs max_steps > 0 (got {steps}): a stream has no length, so "
            "num_train_epochs cannot set the run's length"
        )
    if values.get("dataloader_num_workers", 0):
        problems.append(
            "key 'dataloader_num_workers': must be 0 with streaming: true (each worker would read the whole "
            "stream, and the saved position is the main process's)"
        )
    return problems


# ---------------------------------------------------------------- TrainingArguments values

# Values transformers' TrainingArguments accepts that fail only once the model has loaded (in the
# optimizer, the data loader or the step counter): checked here, with the rest of the config.
# TrainingArguments' own refusals (warmup_steps < 0, ...) come from building it (component/training/setup.py).
TRAINING_RANGES: tuple[tuple[tuple[str, ...], Callable[[float], bool], str], ...] = (
    (
        ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"),
        lambda v: v >= 1,
        "must be at least 1",
    ),
    (("eval_accumulation_steps",), lambda v: v >= 1, "must be at least 1 (or null)"),
    (("learning_rate", "logging_steps", "save_steps", "eval_steps"), lambda v: v > 0, "must be greater than 0"),
    (
        ("weight_decay", "adam_epsilon", "max_grad_norm", "dataloader_num_workers"),
        lambda v: v >= 0,
        "must be at least 0",
    ),
    (("adam_beta1", "adam_beta2", "label_smoothing_factor"), lambda v: 0 <= v < 1, "must be in [0, 1)"),
)
DEFAULT_EPOCHS = 3.0  # TrainingArguments' num_train_epochs
NO_REPORTING, ALL_REPORTING = "none", "all"


def check_training_ranges(values: dict[str, Any]) -> list[str]:
    problems = []
    for keys, allowed, rule in TRAINING_RANGES:
        for key in keys:
            value = values.get(key)
            if _is_number(value) and math.isfinite(value) and not allowed(value):
                problems.append(f"key '{key}': {rule}, got {value!r}")
    max_steps, epochs = values.get("max_steps", -1), values.get("num_train_epochs", DEFAULT_EPOCHS)
    if max_steps <= 0 and epochs <= 0:
        problems.append(
            f"key 'num_train_epochs': must be greater than 0 when max_steps is {max_steps} (not a step count), "
            f"got {epochs!r}"
        )
    return problems


@functools.cache
def _training_choices() -> dict[str, tuple[str, ...]]:
    """TrainingArguments keys whose value names one member of an enum: optim, lr_scheduler_type, the strategies."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    choices = {}
    for name in sorted(training_fields()):
        enums = [t for t in typing.get_args(hints[name]) if isinstance(t, type) and issubclass(t, enum.Enum)]
        if len(enums) == 1:
            choices[name] = tuple(str(m.value) for m in enums[0])
    return choices


def check_training_choices(values: dict[str, Any]) -> list[str]:
    return [
        p
        for key, choices in _training_choices().items()
        if isinstance(values.get(key), str)
        for p in choice_problems(key, values[key], choices)
    ]


def _installed_integrations() -> tuple[set[str], set[str]]:
    """(every integration name report_to takes, those installed here), from transformers' own tables."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations import integration_utils as integrations

    # Not in the available list: azure_ml when mlflow is installed too, flyte, kubeflow (a Kubeflow job).
    unlisted = {
        "azure_ml": integrations.is_azureml_available,
        "flyte": integrations.is_flytekit_available,
        "kubeflow": integrations.is_kubeflow_available,
    }
    installed = set(get_available_reporting_integrations()) | {n for n, available in unlisted.items() if available()}
    return set(integrations.INTEGRATION_TO_CALLBACK), installed


def check_report_to(values: dict[str, Any]) -> list[str]:
    """Each integration named exists and is installed; else the Trainer fails once the model has loaded."""
    given = "report_to" in values
    value = values["report_to"] if given else TRAINING_DEFAULTS["report_to"]
    if value is None:
        return [f"key 'report_to': null; use '{NO_REPORTING}' to report to no integration"]
    names = [value] if isinstance(value, str) else list(value)
    if names in ([NO_REPORTING], [ALL_REPORTING]):
        return []
    supported, installed = _installed_integrations()
    problems = []
    for name in names:
        if name not in supported:
            problems += choice_problems("report_to", name, sorted(supported))
        elif name not in installed:
            problems.append(
                f"key 'report_to': {name!r}{'' if given else ' (our default)'} is not installed here: install it, "
                f"or set report_to to '{NO_REPORTING}' or to installed ones ({', '.join(sorted(installed)) or 'none'})"
            )
    return problems


# ---------------------------------------------------------------- data files (checked as a run starts)

# Suffixes component/data/sources.py reads as files; with its `is_local`, they tell a path from a Hub id.
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


def _written_as_path(path: str) -> bool:
    """sft reads what is not written like a local path as a Hub dataset id (component/data/sources.py)."""
    p = Path(path)
    return p.is_absolute() or path.startswith(".") or p.suffix in DATA_FILE_SUFFIXES or path.count("/") > 1


def _not_found(key: str, path: str) -> str:
    """The problem naming the key and, from the folder's listing, the closest existing name."""
    said = f"key '{key}': {path}: data file not found"
    folder = Path(path).parent
    if not folder.is_dir():
        return f"{said}; there is no folder '{folder}'"
    close = suggest(Path(path).name, [entry.name for entry in folder.iterdir()])
    return said + (f" (did you mean '{folder / close}'?)" if close else "")


def data_path_problems(values: dict[str, Any]) -> list[str]:
    """Local data files and folders the config names that do not exist (Hub ids are left to datasets)."""
    sft = values.get("task_type", "sft") == "sft"  # pretrain and dpo read local files only
    named = [(key, values.get(key), not sft) for key in DATASET_LIST_KEYS.values()]
    for key in DATASET_LIST_KEYS:
        for i, entry in enumerate(values.get(key) or []):
            named.append((f"{key}[{i}].path", entry.get("path") if isinstance(entry, dict) else None, False))
    return [
        _not_found(key, path)
        for key, path, always_local in named
        if isinstance(path, str)
        and path.strip()
        and (always_local or _written_as_path(path))
        and not Path(path).exists()
    ]


def check_data_paths(config: Config) -> None:
    """Raise one ConfigError naming every missing data file. Not a load-time check: a shipped config
    validates without its data (LIMA is prepared separately); a run checks before it reads or writes."""
    values = {"task_type": config.method.task_type, **vars(config.data)}
    problems = data_path_problems(values)
    if problems:
        raise ConfigError(format_problems(f"{config.source}: data not found", problems))


BUILTIN_CHECKS: tuple[Check, ...] = (
    check_required,
    check_train_mode,
    check_freeze,
    check_neftune,
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
    check_streaming,
    check_training_ranges,
    check_training_choices,
    check_report_to,
)
