"""The configuration layer: typed arguments, reading, checking, building (imports nothing above it)."""

from component.config.arguments import (
    AUTO_DATA_FORMAT,
    DATA_FORMATS,
    DEFAULT_OPTIM,
    RESOLVED_CONFIG_NAME,
    SECRET_KEYS,
    TRAINING_DEFAULTS,
    Config,
    DataArguments,
    MethodArguments,
    ModelArguments,
)
from component.config.checks import Check
from component.config.load import (
    HELP_FLAGS,
    USAGE,
    check_values,
    config_from_values,
    describe_keys,
    load_config,
    load_values,
    save_config,
)
from component.config.parse import CONFIG_FILE_FLAG, suggest

__all__ = [
    "AUTO_DATA_FORMAT",
    "CONFIG_FILE_FLAG",
    "DATA_FORMATS",
    "DEFAULT_OPTIM",
    "HELP_FLAGS",
    "RESOLVED_CONFIG_NAME",
    "SECRET_KEYS",
    "TRAINING_DEFAULTS",
    "USAGE",
    "Check",
    "Config",
    "DataArguments",
    "MethodArguments",
    "ModelArguments",
    "check_values",
    "config_from_values",
    "describe_keys",
    "load_config",
    "load_values",
    "save_config",
    "suggest",
]
