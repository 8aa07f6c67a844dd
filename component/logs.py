"""Logging: loguru on the main process at INFO, warnings only elsewhere; and the library notes we hide.

`setup_logging` sends our messages to stderr and, once the output folder
exists, `log_to_file` adds `train.log` in it. Lines go to stderr through
`tqdm.write`, so a log line printed while a progress bar is drawn lands above
the bar instead of splitting it.

`hide_library_notes` is the one place where other libraries' output is
filtered: the few messages in `LIBRARY_NOTES` that print on every command or
every save and that a user cannot act on. Each is matched by its exact text
(a regex from the start of the message; `.*` only where the text holds a path
or an error), so any other warning, and every error, still shows. Some print
while a library is imported: `setup_logging` installs the filters, and every
entry point calls it (component/cli.py's `run_main`) before its command
imports peft, DeepSpeed or transformers. With FINETUNE_VERBOSE=1 nothing is
hidden.

A leaf module (loguru and tqdm only), so that every entry point sets up
logging without importing transformers.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loguru import logger
from tqdm import tqdm

from component.ranks import is_main_process

LOG_FILE = "train.log"
LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | {message}"
VERBOSE_ENV = "FINETUNE_VERBOSE"
_file_sink: Optional[int] = None  # loguru id of the current train.log sink


def setup_logging(verbose: Optional[bool] = None) -> None:
    """Our log on stderr (INFO on the main process, WARNING elsewhere), and the library notes hidden."""
    global _file_sink
    hide_library_notes(verbose)
    logger.remove()  # every sink, the previous run's train.log included
    _file_sink = None
    logger.add(
        _write_stderr,
        level="INFO" if is_main_process() else "WARNING",
        format=LOG_FORMAT,
        colorize=sys.stderr.isatty(),
    )


def _write_stderr(message: str) -> None:
    # sys.stderr looked up per line: a test's captured stream, or the real one.
    tqdm.write(message, file=sys.stderr, end="")


def log_to_file(output_dir: str) -> None:
    """Send the log to output_dir/train.log, replacing the previous run's file in this process."""
    global _file_sink
    if not is_main_process():
        return
    if _file_sink is not None:
        logger.remove(_file_sink)
    _file_sink = logger.add(Path(output_dir) / LOG_FILE, level="INFO", format=LOG_FORMAT)


# ---------------------------------------------------------------- library notes nobody can act on


@dataclass(frozen=True)
class LibraryNote:
    """One library message hidden unless verbose: where it comes from, its text, and why it is noise."""

    pattern: str
    """Regex matched from the start of the whole message."""
    logger_name: Optional[str] = None
    """The `logging` logger it is written to; None: a Python warning of `category`."""
    category: type[Warning] = UserWarning
    why: str = ""


def _exactly(*parts: str) -> str:
    """The regex of a message made of fixed `parts` with anything in between (a path, an error), and nothing after."""
    return ".*".join(re.escape(p) for p in parts) + r"\Z"


LIBRARY_NOTES: tuple[LibraryNote, ...] = (
    LibraryNote(
        _exactly(
            "Failed to load CPU gemm_4bit_forward from kernels-community: ",
            ". Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
        ),
        logger_name="bitsandbytes.backends.cpu.ops",
        why="printed when bitsandbytes is imported (by peft, on every command) on a CPU with AVX512-BF16 and no "
        "`kernels` package, which downloads from the Hub; bitsandbytes then uses its own CPU kernel",
    ),
    LibraryNote(
        _exactly("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
        logger_name="DeepSpeed",
        why="DeepSpeed's device detection, on stdout, whenever it is imported without CUDA (every command); "
        "the device a run uses is in our own start-up log",
    ),
    LibraryNote(
        _exactly(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6. "
            "Use `is_activation_checkpointing` instead."
        ),
        category=FutureWarning,
        why="read by peft's PeftModel on every LoRA model it wraps; not our code",
    ),
    LibraryNote(
        _exactly(
            "'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used."
        ),
        why="TrainingArguments pins dataloader memory by default; without an accelerator torch ignores it",
    ),
    LibraryNote(
        _exactly("Could not find a config file in ", " - will assume that the vocabulary was not modified."),
        why="peft, on every adapter save, when the base model is a GGUF file or a folder without config.json; "
        "we never change the vocabulary, so its assumption is right",
    ),
    LibraryNote(
        _exactly(
            "Loading a GGUF checkpoint with its weights packed is fastest in float32, and this one was asked for in ",
            "-- the weights stay quantized regardless, so this costs no extra memory.",
        ),
        logger_name="transformers.quantizers.quantizer_gguf",
        why="we load a GGUF file as a float model (component/model/loading.py), so no weight stays packed",
    ),
)


class _DropNotes(logging.Filter):
    """Drops the records of one logger whose message is one of its library notes; never an error."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p, re.DOTALL) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def _logger_filters() -> dict[str, _DropNotes]:
    names = sorted({n.logger_name for n in LIBRARY_NOTES if n.logger_name})
    return {name: _DropNotes([n.pattern for n in LIBRARY_NOTES if n.logger_name == name]) for name in names}


_LOGGER_FILTERS = _logger_filters()


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def hide_library_notes(verbose: Optional[bool] = None) -> None:
    """Hide LIBRARY_NOTES (verbose: show them; None: FINETUNE_VERBOSE decides). Calling it again is harmless.

    Filters by exact message, on the one logger or warning category that writes it: never a whole logger, level
    or library, and never an error record. Call it before importing the libraries: some notes print on import.
    Decide verbosity at the first call: verbose after hiding shows the logged notes again but not the warnings
    (Python has no public way to remove one warnings filter).
    """
    verbose = verbose_from_env() if verbose is None else verbose
    for name, drop in _LOGGER_FILTERS.items():
        if verbose:
            logging.getLogger(name).removeFilter(drop)
        else:
            logging.getLogger(name).addFilter(drop)  # a no-op when already there
    if not verbose:
        for note in LIBRARY_NOTES:
            if note.logger_name is None:
                # An identical filter already installed is replaced, not duplicated.
                warnings.filterwarnings("ignore", message=note.pattern, category=note.category)
