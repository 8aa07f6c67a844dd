"""What every command-line entry point shares: logging, user errors as exit status 2, model flags.

`python train.py` and each `script/*.py` parse their own flags and call one
function of the package; this module gives them the same logging set-up, the
same `UserError` -> message + exit code, and the same model arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

from loguru import logger

from component.config import HELP_FLAGS, describe_keys, load_config
from component.errors import USER_ERROR_EXIT_CODE, UserError
from component.runner import run
from component.tasks.registry import CONFIG_CHECKS
from component.training.logs import setup_logging


def run_main(body: Callable[[], Optional[int]]) -> int:
    """Set up logging, run `body`, and turn a UserError into its message and exit status (no traceback)."""
    setup_logging()
    try:
        return body() or 0
    except UserError as exc:
        logger.error(str(exc))
        return getattr(exc, "exit_code", USER_ERROR_EXIT_CODE)  # a signal: 128 + its number


def main_train(argv: Optional[list[str]] = None) -> int:
    """`python train.py --train_args_file FILE.json [--key value ...]`."""
    argv = sys.argv[1:] if argv is None else argv
    if any(flag in argv for flag in HELP_FLAGS):
        print(describe_keys())
        return 0

    def train() -> None:
        run(load_config(argv, CONFIG_CHECKS))

    return run_main(train)
