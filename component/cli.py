"""What every command-line entry point shares: logging, user errors as exit status 2, model flags.

`python train.py` and each `script/*.py` parse their own flags and call one
function of the package; this module gives them the same logging set-up, the
same `UserError` -> message + exit code, and the same model arguments. It also
holds the config-driven commands (training, data inspection), which need the
task registry and the model layer together.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Optional, TextIO

from loguru import logger

from component.errors import USER_ERROR_EXIT_CODE, ConfigError, UserError
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

        config = load_config(argv, CONFIG_CHECKS)
        check_evaluation(config)  # unknown tasks or a bad prompts file: before training, not after it
        run(config, callbacks)
        evaluate_after_training(config)

    return run_main(train, verbose)


def check_evaluation(config) -> None:
    """eval_tasks named right (lm-eval installed for them) and eval_prompts readable, before any training."""
    if config.data.eval_tasks:
        from component.inference.benchmarks import plan_tasks

        plan_tasks(tuple(config.data.eval_tasks))
    if config.data.eval_prompts:
        from component.inference.evaluation import read_prompts

        read_prompts(config.data.eval_prompts)


def evaluate_after_training(config) -> None:
    """eval_tasks / eval_prompts: the finished run scored against its base, and samples.md, on the main
    process (here, above both the runner and inference in the layers)."""
    from component.ranks import is_main_process

    data = config.data
    if not (data.eval_tasks or data.eval_prompts) or not is_main_process():
        return
    from component.inference.evaluation import EvalSettings, evaluate_and_report, recorded_base
    from component.inference.generation import ModelSource

    source = ModelSource(model=config.output_dir)
    settings = EvalSettings(
        tasks=tuple(data.eval_tasks or ()),
        eval_prompts=data.eval_prompts,
        baseline=recorded_base(source) if data.eval_tasks else None,
        output_dir=config.output_dir,
    )
    logger.info(
        f"evaluating the finished run: tasks {', '.join(data.eval_tasks or []) or 'none'}; samples: {data.eval_prompts}"
    )
    evaluate_and_report(source, settings, out=io.StringIO())


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
    # ORPO and reward models read the same pairs as DPO.
    shows = {"sft": show_sft_data, "dpo": show_dpo_data, "orpo": show_dpo_data, "simpo": show_dpo_data}
    shows["rm"] = show_dpo_data
    shows["pretrain"] = show_pretrain_data
    if config.method.task_type not in shows:
        raise ConfigError(
            f"inspect_data does not show {config.method.task_type!r} data yet ({', '.join(shows)} it does); "
            "train.py checks every line of it before training"
        )
    check_data_paths(config)
    shows[config.method.task_type](config, load_tokenizer(config.model), options, out)
