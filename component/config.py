"""Typed, strict configuration: a JSON file plus command-line overrides.

`load_config(argv)` reads `--train_args_file FILE.json`, applies any
`--key value` flags given after it, checks every key and value, and returns a
`Config` of typed dataclasses (ours plus transformers' `TrainingArguments`).
Every problem is collected and reported in one `ConfigError` that names the
file and the keys, before anything is written to disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from transformers import TrainingArguments

from component import distributed, safety
from component.errors import ConfigError, format_problems

TASK_TYPES = ("sft", "pretrain", "dpo")
TRAIN_MODES = ("full", "lora", "qlora")
# Task types whose training path exists. Other values validate as config
# files but are refused before a run starts.
IMPLEMENTED_TASK_TYPES = {"sft", "pretrain", "dpo"}
CONFIG_FILE_FLAG = "--train_args_file"
RESOLVED_CONFIG_NAME = "train_args.json"
# TrainingArguments fields that may hold secrets; never logged or saved.
SECRET_KEYS = ("hub_token", "push_to_hub_token")


@dataclass
class ModelArguments:
    """Which model to fine-tune and how to load it."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A hub id, a local folder, or a local .gguf file (dequantized on load)."},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer location, when it differs from the model's."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped with the model. Only for models you trust."},
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "Attention backend (sdpa, eager, flash_attention_2); None: our choice."}
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Load .bin/.pt/.pth weight files (Python pickles, which can run code when loaded) "
            "from the model folder or a checkpoint. Default: safetensors only."
        },
    )


@dataclass
class DataArguments:
    """Where the data is and how it becomes tokens."""

    train_file: Optional[str] = field(default=None, metadata={"help": "Training data, JSONL."})
    eval_file: Optional[str] = field(
        default=None, metadata={"help": "Optional evaluation data, JSONL; eval loss is logged every eval_steps."}
    )
    template_name: Optional[str] = field(
        default=None,
        metadata={"help": "Chat template (see component/template.py), or 'auto' for the tokenizer's own."},
    )
    max_seq_length: int = field(default=1024, metadata={"help": "Longest tokenized example; longer ones are cut."})
    max_prompt_length: int = field(
        default=512, metadata={"help": "DPO: the prompt is never cut below this many tokens."}
    )
    tokenize_num_workers: int = field(default=1, metadata={"help": "Processes used to tokenize the data."})
    skip_invalid_examples: bool = field(
        default=False,
        metadata={"help": "Skip malformed data lines (listed in output_dir) instead of stopping."},
    )
    padding_free: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Concatenate each batch into one row without padding; None: on where the model "
            "type is verified for it (component/model_types.py), off for recurrent models."
        },
    )
    data_cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Pretrain: folder for the tokenized, packed data cache; default: data_cache/ next to "
            "output_dir. Reused only while the files, tokenizer and max_seq_length are unchanged."
        },
    )


@dataclass
class MethodArguments:
    """What kind of training: task, mode and the LoRA adapter's shape."""

    task_type: str = field(default="sft", metadata={"help": "One of: sft, pretrain, dpo."})
    train_mode: str = field(default="lora", metadata={"help": "One of: full, lora, qlora."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Module names to adapt; default: every linear layer but the output head."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that holds a finished run."}
    )
    resume_from_checkpoint: Optional[Union[bool, str]] = field(
        default=None,
        metadata={
            "help": "true: resume from the newest complete checkpoint in output_dir; a path: from that "
            "checkpoint. Absent while output_dir holds checkpoints: an error saying how to go on."
        },
    )
    max_nonfinite_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps with a NaN/inf loss or gradient to skip before the run stops; 0: stop "
            "at the first."
        },
    )
    lean_loss: bool = field(
        default=True,
        metadata={
            "help": "Apply the output head only where labels are set, in chunks (component/loss.py); "
            "false: the model's own full-logits loss."
        },
    )
    dpo_beta: float = field(
        default=0.1, metadata={"help": "DPO: strength of the pull towards the reference model (trl's beta)."}
    )
    dpo_loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "DPO: trl loss type(s): sigmoid (DPO), ipo, hinge, robust, sft (adds an NLL term), ..."},
    )
    dpo_loss_weights: Optional[list[float]] = field(
        default=None, metadata={"help": "DPO: one weight per dpo_loss_type entry; default: all 1."}
    )
    dpo_label_smoothing: float = field(
        default=0.0, metadata={"help": "DPO: probability a preference label is flipped (robust/cDPO), in [0, 0.5)."}
    )
    dpo_precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "DPO: score the data with the reference model once before training; full mode then "
            "holds no second model copy."
        },
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, MethodArguments, TrainingArguments)


@dataclass
class Config:
    """A validated configuration."""

    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    training: TrainingArguments
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Every resolved value, secrets removed, ready to be saved as JSON."""
        out: dict[str, Any] = {"config_file": self.source}
        for part in (self.model, self.data, self.method):
            out.update(dataclasses.asdict(part))
        training = self.training.to_dict()
        for key in SECRET_KEYS:
            training.pop(key, None)
        out.update(training)
        return out


# Extra checks other components register: each takes the merged key/value
# dict and returns a list of problems (strings naming the key).
VALIDATORS: list[Callable[[dict[str, Any]], list[str]]] = []


def _field_table() -> dict[str, tuple[type, dataclasses.Field]]:
    table: dict[str, tuple[type, dataclasses.Field]] = {}
    for cls in ARGUMENT_CLASSES:
        for f in dataclasses.fields(cls):
            if f.init:
                table.setdefault(f.name, (cls, f))
    return table


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ---------------------------------------------------------------- coercion


class _CoerceError(ValueError):
    pass


def _describe(tp: Any) -> str:
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return "one of " + ", ".join(repr(m.value) for m in tp)
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, from_cli: bool) -> Any:
    """Return `value` as type `tp`, or raise _CoerceError with what was expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (from_cli and value in ("None", "null") and type(None) in options):
            if type(None) in options:
                return None
        # Try the most specific types first so "3" becomes 3, not "3".
        ordered = sorted(options, key=lambda t: t is str)
        for option in ordered:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, from_cli)
            except _CoerceError:
                continue
        raise _CoerceError(" or ".join(_describe(o) for o in options if o is not type(None)))
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if from_cli and isinstance(value, str):
            value = _cli_json(value, "a JSON list") if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise _CoerceError(f"a list of {_describe(item_tp)}")
        return [_coerce(v, item_tp, from_cli) for v in value]
    if origin is dict or tp is dict:
        if from_cli and isinstance(value, str):
            value = _cli_json(value, "a JSON object")
        if not isinstance(value, dict):
            raise _CoerceError("a JSON object")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise _CoerceError("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_cli and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _CoerceError("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _CoerceError("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _CoerceError("a string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if value in values:
            return value
        if isinstance(value, tp):
            return value.value
        raise _CoerceError(_describe(tp))
    return value


def _cli_json(text: str, expected: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # also too deep, or an integer too long to convert
        raise _CoerceError(expected) from None


def _type_error_text(value: Any, expected: str) -> str:
    return f"expected {expected}, got {json.dumps(value) if not isinstance(value, str) else repr(value)}"


# ---------------------------------------------------------------- reading


def _split_cli(argv: list[str]) -> tuple[Optional[str], list[tuple[str, Any]], list[str]]:
    """Split argv into (config file, [(key, raw value)], problems)."""
    path: Optional[str] = None
    pairs: list[tuple[str, Any]] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            problems.append(f"command line: unexpected argument {arg!r}; flags look like --key value")
            i += 1
            continue
        key, eq, inline = arg[2:].partition("=")
        if eq:
            value: Any = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag switches a boolean on
            i += 1
        if "--" + key == CONFIG_FILE_FLAG:
            path = value
        else:
            pairs.append((key, value))
    return path, pairs, problems


def _read_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found. Pass an existing file with {CONFIG_FILE_FLAG}.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}.") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}.") from None
    except (ValueError, RecursionError) as exc:  # nested too deep, or an integer too long to convert
        raise ConfigError(f"{path}: invalid JSON: {str(exc).split(';')[0]}.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the config must be a JSON object of key/value pairs.")
    return values


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def merge_sources(
    file_values: dict[str, Any], cli_pairs: list[tuple[str, Any]], source: str
) -> tuple[dict[str, Any], list[str]]:
    """Type-check and merge file values and CLI overrides; returns (values, problems)."""
    table = _field_table()
    hints = {cls: _type_hints(cls) for cls in ARGUMENT_CLASSES}
    known = sorted(table)
    merged: dict[str, Any] = {}
    problems: list[str] = []
    sources = [(k, v, False, f"{source}: key '{k}'") for k, v in file_values.items()]
    sources += [(k, v, True, f"command line: --{k}") for k, v in cli_pairs]
    for key, value, from_cli, where in sources:
        if key not in table:
            problems.append(f"{where}: unknown key{_suggest(key, known)}")
            continue
        cls, f = table[key]
        try:
            merged[key] = _coerce(value, hints[cls][f.name], from_cli)
        except _CoerceError as exc:
            problems.append(f"{where}: {_type_error_text(value, str(exc))}")
        except json.JSONDecodeError:
            problems.append(f"{where}: {_type_error_text(value, 'a JSON list')}")
    return merged, problems


# ---------------------------------------------------------------- checks


def _check_required(values: dict[str, Any]) -> list[str]:
    return [f"key '{k}' is required" for k in ("output_dir", "model_name_or_path", "train_file") if not values.get(k)]


def _check_choices(values: dict[str, Any]) -> list[str]:
    problems = []
    task = values.get("task_type", "sft")
    mode = values.get("train_mode", "lora")
    if task not in TASK_TYPES:
        problems.append(f"key 'task_type': {task!r} is not one of {', '.join(TASK_TYPES)}")
    if mode not in TRAIN_MODES:
        problems.append(f"key 'train_mode': {mode!r} is not one of {', '.join(TRAIN_MODES)}")
    return problems


def _check_precision(values: dict[str, Any]) -> list[str]:
    if values.get("fp16") and values.get("bf16"):
        return ["keys 'fp16' and 'bf16' are both true: choose one (bf16 where the hardware has it)"]
    return []


def _check_lora(values: dict[str, Any]) -> list[str]:
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


def _check_lengths(values: dict[str, Any]) -> list[str]:
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


def _check_template(values: dict[str, Any]) -> list[str]:
    from component.template import AUTO_TEMPLATE, TEMPLATES, suggest_template

    name = values.get("template_name")
    task = values.get("task_type", "sft")
    if name is None:
        if task in ("pretrain", "sft"):  # sft: the tokenizer's chat_template, checked when it is loaded
            return []
        return [
            f"key 'template_name' is required for task_type '{task}': one of {', '.join(sorted(TEMPLATES))}, or 'auto'"
        ]
    if name != AUTO_TEMPLATE and name not in TEMPLATES:
        hint = suggest_template(name)
        return [f"key 'template_name': unknown template {name!r}{f' (did you mean {hint!r}?)' if hint else ''}"]
    return []


def _check_deepspeed(values: dict[str, Any]) -> list[str]:
    ds = values.get("deepspeed")
    if isinstance(ds, str) and not Path(ds).is_file():
        return [f"key 'deepspeed': file {ds!r} not found"]
    return []


BUILTIN_CHECKS = (
    _check_required,
    _check_choices,
    _check_precision,
    _check_lora,
    _check_lengths,
    _check_template,
    _check_deepspeed,
    distributed.deepspeed_problems,
    *safety.CONFIG_CHECKS,
)


def check_values(values: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    # The task and model modules register their checks in VALIDATORS when
    # imported; import them here so a check never depends on import order.
    import component.runner  # noqa: F401

    for check in (*BUILTIN_CHECKS, *VALIDATORS):
        problems += check(values)
    return problems


def check_runnable(values: dict[str, Any]) -> list[str]:
    """Problems that stop a run but not a config file's validation."""
    task = values.get("task_type", "sft")
    if task not in IMPLEMENTED_TASK_TYPES and task in TASK_TYPES:
        return [
            f"key 'task_type': {task!r} is not implemented yet; implemented: {', '.join(sorted(IMPLEMENTED_TASK_TYPES))}"
        ]
    return []


# ---------------------------------------------------------------- building

# Our defaults for TrainingArguments, where transformers' default is wrong
# for this tool. A config may override each of them.
TRAINING_DEFAULTS: dict[str, Any] = {
    "report_to": ["tensorboard"],
    "remove_unused_columns": False,  # our collators read the columns themselves
    "logging_first_step": True,
    "save_strategy": "steps",
    "optim": "adamw_torch_fused",  # transformers' and TRL's default: no per-parameter temporaries in the step
}


def _build(values: dict[str, Any], source: str) -> Config:
    parts = {}
    for cls in ARGUMENT_CLASSES[:3]:
        names = {f.name for f in dataclasses.fields(cls)}
        parts[cls] = cls(**{k: v for k, v in values.items() if k in names})
    training_names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    kwargs = {**TRAINING_DEFAULTS, **{k: v for k, v in values.items() if k in training_names}}
    if values.get("eval_file") and "eval_strategy" not in values:
        kwargs["eval_strategy"] = "steps"
    import torch

    if not torch.cuda.is_available():
        # bf16 on the CPU is only accepted by TrainingArguments with use_cpu.
        kwargs.setdefault("use_cpu", bool(kwargs.get("bf16")) or kwargs.get("use_cpu", False))
    # torchrun/deepspeed: backend, CPU process group, DDP flags (before devices are set up).
    kwargs = distributed.prepare_training_kwargs(kwargs, values.get("train_mode", "lora"))
    try:
        training = TrainingArguments(**kwargs)
    except (ValueError, TypeError, ImportError) as exc:
        raise ConfigError(f"{source}: invalid training arguments: {exc}") from None
    return Config(parts[ModelArguments], parts[DataArguments], parts[MethodArguments], training, source)


HELP_FLAGS = ("-h", "--help")


def describe_keys() -> str:
    """Every key of our dataclasses with its default and help text (TrainingArguments' are documented upstream)."""
    lines = [f"usage: train.py {CONFIG_FILE_FLAG} FILE.json [--key value ...]", ""]
    for cls in ARGUMENT_CLASSES[:3]:
        lines.append(f"{cls.__name__}: {cls.__doc__}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} (default {default!r}): {f.metadata.get('help', '')}")
        lines.append("")
    lines.append("Every field of transformers.TrainingArguments is a key too (learning_rate, num_train_epochs, ...).")
    return "\n".join(lines)


def load_values(argv: list[str]) -> tuple[dict[str, Any], str]:
    """Read and type-check the file and flags; raise one ConfigError listing every problem."""
    path, cli_pairs, problems = _split_cli(list(argv))
    source = path or "command line"
    file_values = _read_json(path) if path else {}
    values, type_problems = merge_sources(file_values, cli_pairs, source)
    problems += type_problems
    # Checks see only the values that parsed, so a type error and a
    # conflict elsewhere are reported in the same message.
    problems += check_values(values)
    if problems:
        raise ConfigError(format_problems(f"{source}: invalid configuration", problems))
    return values, source


def load_config(argv: list[str], runnable: bool = True) -> Config:
    """Parse, validate and build the configuration. Writes nothing."""
    values, source = load_values(argv)
    if runnable:
        problems = check_runnable(values)
        if problems:
            raise ConfigError(format_problems(f"{source}: cannot run this configuration", problems))
    return _build(values, source)


def save_config(config: Config, output_dir: str) -> Path:
    path = Path(output_dir) / RESOLVED_CONFIG_NAME
    path.write_text(json.dumps(config.to_dict(), indent=2, default=str, sort_keys=True) + "\n")
    return path


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
