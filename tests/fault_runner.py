"""train.py with one injected fault, for the fault tests (run as a subprocess).

    python tests/fault_runner.py FAULT STEP --train_args_file CONFIG.json [--key value ...]

FAULT is one of:
  kill       SIGKILL this process as step STEP begins (kill -9 mid-training)
  term       SIGTERM this process as step STEP begins (a scheduler's stop)
  term2      two SIGTERMs as step STEP begins (the second must exit at once)
  kill_save  SIGKILL while checkpoint-STEP is being written (after weights and
             optimizer, before the RNG state, trainer state and completion marker)
  slow       sleep SLOW_STEP_S after every step from STEP on, so that a test can
             signal the process from outside while it trains
The fault is a callback handed to `run(config, callbacks=...)`; only kill_save
patches the Trainer, since no hook runs between a checkpoint's files.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from transformers import Trainer, TrainerCallback

from component.cli import run_main
from component.config import load_config
from component.runner import run
from component.tasks.registry import CONFIG_CHECKS
from component.training.distributed import shutdown

SLOW_STEP_S = 1.0


class Fault(TrainerCallback):
    def __init__(self, kind: str, step: int):
        self.kind, self.step = kind, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != self.step:
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.kind == "term2":
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, args, state, control, **kwargs):
        if self.kind == "slow" and state.global_step >= self.step:
            time.sleep(SLOW_STEP_S)


def die_while_saving(step: int) -> None:
    save_rng = Trainer._save_rng_state

    def dying_save_rng(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_rng(self, output_dir)

    Trainer._save_rng_state = dying_save_rng


def main(kind: str, step: int, argv: list[str]) -> int:
    if kind == "kill_save":
        die_while_saving(step)
    return run_main(lambda: run(load_config(argv, CONFIG_CHECKS), callbacks=[Fault(kind, step)]) and None)


if __name__ == "__main__":
    status = main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
    shutdown(status)
    sys.exit(status)
