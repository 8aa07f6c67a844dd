"""What every command-line entry point shares: logging, user errors as exit status 2, model flags.

`python train.py` and each `script/*.py` parse their own flags and call one
function of the package; this module gives them the same logging set-up, the
same `UserError` -> message + exit code, and the same model arguments. It also
holds the config-driven commands (training, data inspection), which need the
task registry and the model layer together.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Optional, TextIO

from loguru import logger

from component.errors import USER_ERROR_EXIT_CODE, UserError
from component.logs import setup_logging

# The rest of the package is imported inside the commands that need it: a script that needs no model
# (prepare_lima) starts in a tenth of a second, not the five that transformers, peft and bitsandbytes take.
if TYPE_CHECKING:
    from transformers import TrainerCallback

    from component.data.inspection import InspectOptions
    from component.inference.generation import ModelSource


VERBOSE_FLAG = "--verbose"
VERBOSE_HELP = "Also show the library notes hidden by default (component/logs.py); FINETUNE_VERBOSE=1 does too."


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(VERBOSE_FLAG, action="store_true", default=None, help=VERBOSE_HELP)


def run_main(body: Callable[[], Optional[int]], verbose: Optional[bool] = None) -> int:
    """Set up logging (`verbose` shows the hidden library notes; None: FINETUNE_VERBOSE decides), run
    `body`, and turn a UserError into its message and exit status (no traceback)."""
    setup_logging(verbose)
    try:
        return body() or 0
    except UserError as exc:
        logger.error(str(exc))
        return getattr(exc, "exit_code", USER_ERROR_EXIT_CODE)  # a signal: 128 + its number


def main_train(argv: Optional[list[str]] = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """`python train.py --train_args_file FILE.json [--key value ...]`; `callbacks` join the run's own."""
    from component.config import HELP_FLAGS, USAGE, describe_keys, load_config

    argv = sys.argv[1:] if argv is None else argv
    verbose = True if VERBOSE_FLAG in argv else None
    argv = [a for a in argv if a != VERBOSE_FLAG]
    # Help and usage need only the config layer: answered before the model libraries are imported.
    if any(flag in argv for flag in HELP_FLAGS):
        sys.stdout.write(describe_keys() + "\n")
        return 0
    if not argv:
        sys.stderr.write(f"{USAGE}\ntrain.py: error: no config given (--help lists every key)\n")
        return USER_ERROR_EXIT_CODE

    def train() -> None:
        from component.runner import run
        from component.tasks.registry import CONFIG_CHECKS

        run(load_config(argv, CONFIG_CHECKS), callbacks)

    return run_main(train, verbose)


# ---------------------------------------------------------------- model flags (chat, serve, evaluate)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model to load for inference, as `model_source` reads them (and --verbose)."""
    from component.inference.generation import DTYPES

    add_verbose_argument(parser)

    parser.add_argument(
        "--model",
        required=True,
        help="Model folder (full or merged), hub id or .gguf; with --adapter, the base model. "
        "A run's adapter folder alone also works.",
    )
    parser.add_argument("--adapter", help="LoRA/QLoRA adapter folder to apply to --model.")
    parser.add_argument("--template", help="Chat template name; default: the one recorded at training time.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="Precision of the model's weights.")
    parser.add_argument(
        "--load_in_4bit", action="store_true", help="Load the base model in 4-bit NF4 (bitsandbytes, GPU)."
    )


def model_source(args: argparse.Namespace) -> ModelSource:
    from component.inference.generation import ModelSource

    return ModelSource(args.model, args.adapter, args.template, args.dtype, args.load_in_4bit)


# ---------------------------------------------------------------- data inspection (script/inspect_data.py)


def inspect_data(
    train_args_file: str, overrides: Sequence[str], options: InspectOptions, out: Optional[TextIO] = None
) -> None:
    """Load the config as train.py does and the tokenizer only (never the model), then show the data
    as its task trains on it: SFT conversations, DPO pairs or pretraining blocks."""
    from component.config import CONFIG_FILE_FLAG, load_config
    from component.config.checks import check_data_paths
    from component.data.inspection import show_dpo_data, show_pretrain_data, show_sft_data
    from component.model.loading import load_tokenizer
    from component.tasks.registry import CONFIG_CHECKS

    config = load_config([CONFIG_FILE_FLAG, train_args_file, *overrides], CONFIG_CHECKS)
    shows = {"sft": show_sft_data, "dpo": show_dpo_data, "pretrain": show_pretrain_data}
    check_data_paths(config)
    shows[config.method.task_type](config, load_tokenizer(config.model), options, out)
