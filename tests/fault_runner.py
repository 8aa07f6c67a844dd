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
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Trainer, TrainerCallback  # noqa: E402

import component.runner as runner  # noqa: E402
import train  # noqa: E402

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


def install(kind: str, step: int) -> None:
    add = runner.add_safety_callbacks

    def add_with_fault(trainer, *args, **kwargs):
        add(trainer, *args, **kwargs)
        trainer.add_callback(Fault(kind, step))

    runner.add_safety_callbacks = add_with_fault
    if kind == "kill_save":
        save_rng = Trainer._save_rng_state

        def dying_save_rng(self, output_dir):
            if self.state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return save_rng(self, output_dir)

        Trainer._save_rng_state = dying_save_rng


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    sys.exit(train.main(sys.argv[3:]))
