"""Logging: loguru on the main process at INFO, warnings only elsewhere.

`setup_logging` sends our messages to stderr and, once the output folder
exists, `log_to_file` adds `train.log` in it. A leaf module (loguru only), so
that every entry point sets up logging without importing transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from loguru import logger

from component.ranks import is_main_process

LOG_FILE = "train.log"
LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | {message}"
_file_sink: Optional[int] = None  # loguru id of the current train.log sink


def setup_logging() -> None:
    global _file_sink
    logger.remove()  # every sink, the previous run's train.log included
    _file_sink = None
    logger.add(sys.stderr, level="INFO" if is_main_process() else "WARNING", format=LOG_FORMAT)


def log_to_file(output_dir: str) -> None:
    """Send the log to output_dir/train.log, replacing the previous run's file in this process."""
    global _file_sink
    if not is_main_process():
        return
    if _file_sink is not None:
        logger.remove(_file_sink)
    _file_sink = logger.add(Path(output_dir) / LOG_FILE, level="INFO", format=LOG_FORMAT)
