"""The terminal during training: one log line per metrics record, under one progress bar.

transformers shows each metrics record itself (`PrinterCallback` prints the
dict, `ProgressCallback` writes it above its bar), so with our log every step
showed twice. `RunHooks` (component/training/trainer.py) removes both and adds
`LogCallback`, which writes each record once to our log (stderr and
train.log), and, unless `disable_tqdm`, `ProgressBar`: transformers' bar with
the token rate and without the record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from loguru import logger
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from component.training.report import COUNT_KEYS

# Not shown on the terminal: a number no one reads during training (total_flos), and the running token
# counts, which TensorBoard and report.json have.
UNSHOWN_KEYS = frozenset({"total_flos", *COUNT_KEYS})
# The Trainer's record at the end of `train()`: its runtime, speeds and mean loss, not a step's.
SUMMARY_KEY = "train_runtime"
EVAL_PREFIX = "eval_"


def format_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def record_label(logs: dict, step: int) -> str:
    """What a metrics record is: a training step's, an evaluation's, or the end-of-training summary."""
    if SUMMARY_KEY in logs:
        return f"end of training at step {step}"
    if any(key.startswith(EVAL_PREFIX) for key in logs):
        return f"eval at step {step}"
    return f"step {step}"


def format_record(logs: dict, step: int) -> str:
    shown = ", ".join(f"{k}={format_value(v)}" for k, v in logs.items() if k not in UNSHOWN_KEYS)
    return f"{record_label(logs, step)}: {shown}"


class LogCallback(TrainerCallback):
    """Writes each metrics record of the Trainer to our log, as one line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(format_record(logs, state.global_step))


class ProgressBar(ProgressCallback):
    """transformers' training progress bar, with the token rate, minus the records (LogCallback writes those)."""

    def __init__(self, tokens_per_second: Callable[[], Optional[float]]):
        super().__init__()
        self.tokens_per_second = tokens_per_second

    def on_step_end(self, args, state, control, **kwargs):
        rate = self.tokens_per_second()
        if state.is_world_process_zero and self.training_bar is not None and rate is not None:
            self.training_bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)  # drawn by the update below
        super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass
