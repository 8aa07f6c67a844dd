"""Loading a config: read, check, build. Writes nothing and starts nothing.

`load_config(argv, checks)` reads `--train_args_file FILE.json`, applies any
`--key value` flags given after it, runs the built-in checks and the ones it
is handed (the task registry's), and returns a `Config`. `config_from_values`
does the same from a dict, for tests and benchmarks. Every problem is
collected and reported in one `ConfigError` that names the file and the keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from component.config.arguments import (
    OUR_CLASSES,
    RESOLVED_CONFIG_NAME,
    TRAINING_DEFAULTS,
    Config,
    training_fields,
)
from component.config.checks import BUILTIN_CHECKS, Check
from component.config.parse import CONFIG_FILE_FLAG, merge_sources, read_json, split_cli
from component.errors import ConfigError, format_problems

HELP_FLAGS = ("-h", "--help")
USAGE = f"usage: train.py {CONFIG_FILE_FLAG} FILE.json [--key value ...]"


def check_values(values: dict[str, Any], checks: Sequence[Check] = ()) -> list[str]:
    problems: list[str] = []
    for check in (*BUILTIN_CHECKS, *checks):
        problems += check(values)
    return problems


def _raise_if(problems: list[str], source: str) -> None:
    if problems:
        raise ConfigError(format_problems(f"{source}: invalid configuration", problems))


def load_values(argv: list[str], checks: Sequence[Check] = ()) -> tuple[dict[str, Any], str]:
    """Read and type-check the file and flags; raise one ConfigError listing every problem."""
    path, cli_pairs, problems = split_cli(list(argv))
    source = path or "command line"
    file_values = read_json(path) if path else {}
    values, type_problems = merge_sources(file_values, cli_pairs, source)
    # Checks see only the values that parsed, so a type error and a
    # conflict elsewhere are reported in the same message.
    _raise_if(problems + type_problems + check_values(values, checks), source)
    return values, source


def build(values: dict[str, Any], source: str) -> Config:
    """The Config of checked values: our dataclasses, and the TrainingArguments values with our defaults."""
    parts = []
    for cls in OUR_CLASSES:
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append(cls(**{k: v for k, v in values.items() if k in names}))
    training = {**TRAINING_DEFAULTS, **{k: v for k, v in values.items() if k in training_fields()}}
    if (values.get("eval_file") or values.get("eval_datasets")) and "eval_strategy" not in values:
        training["eval_strategy"] = "steps"
    return Config(*parts, training, source)


def load_config(argv: list[str], checks: Sequence[Check] = ()) -> Config:
    """Parse, validate and build the configuration. Writes nothing.

    The Config keeps `argv` as given, so the resume hint can repeat the command-line overrides."""
    values, source = load_values(argv, checks)
    return dataclasses.replace(build(values, source), argv=tuple(argv))


def config_from_values(values: dict[str, Any], checks: Sequence[Check] = (), source: str = "values") -> Config:
    """A Config from a dict of keys as a config file holds them, checked like a file."""
    merged, problems = merge_sources(values, [], source)
    _raise_if(problems + check_values(merged, checks), source)
    return build(merged, source)


def describe_keys() -> str:
    """Every key of our dataclasses with its default and help text (TrainingArguments' are documented upstream)."""
    lines = [USAGE, ""]
    for cls in OUR_CLASSES:
        lines.append(f"{cls.__name__}: {cls.__doc__}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} (default {default!r}): {f.metadata.get('help', '')}")
        lines.append("")
    lines.append("Every field of transformers.TrainingArguments is a key too (learning_rate, num_train_epochs, ...).")
    return "\n".join(lines)


def save_config(resolved: dict[str, Any], output_dir: str) -> Path:
    """Write the resolved config (Config.to_dict) next to the run's outputs."""
    path = Path(output_dir) / RESOLVED_CONFIG_NAME
    path.write_text(json.dumps(resolved, indent=2, default=str, sort_keys=True) + "\n")
    return path
