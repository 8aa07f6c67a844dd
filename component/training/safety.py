"""Run safety: clean interruption, a guard against non-finite numbers, and input checks.

- `InterruptCallback`: on SIGTERM or SIGINT (a preempted node, a scheduler, Ctrl-C)
  the run finishes its current optimizer step, saves a checkpoint and stops; the
  runner then logs how to resume and exits non-zero (128 + the signal number, as a
  shell reports a signal). A second signal exits at once without saving. Ranks
  agree on stopping through one all-reduce per step, so they all save the same step.
- `NonFiniteGuard`: a non-finite loss or gradient stops the run with the step, the
  learning rate and the likely causes, before the optimizer applies it, so the last
  checkpoint on disk stays good. `max_nonfinite_steps` such steps may be skipped first.

Both are held by the trainer's `RunHooks` (component/training/trainer.py), which
hands the guard every micro-batch's loss, for SFT, pretrain and DPO alike.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from loguru import logger
from transformers import TrainerCallback

from component.errors import UserError
from component.training.checkpoints import newest_complete, resume_command

INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNAL_EXIT_BASE = 128  # a process ended by signal N exits with 128 + N
NONFINITE_CAUSES = (
    "fp16 overflow: use bf16: true where the hardware has it, or fp32",
    "a learning rate too high for this model (try 10x lower, or more warmup_steps)",
    "a data example with extreme content (check the data summary)",
)


class TrainingInterrupted(UserError):
    """The run stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteError(UserError):
    """The loss or the gradients became NaN or infinite."""


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _any_rank(flag: float, device) -> float:
    """The largest value of `flag` over all ranks (itself when not distributed)."""
    if not _distributed():
        return flag
    t = torch.tensor([flag], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


# ---------------------------------------------------------------- signals


class InterruptCallback(TrainerCallback):
    """Turns SIGTERM/SIGINT into 'finish this step, save a checkpoint, stop'."""

    def __init__(self):
        self.signum: Optional[int] = None  # the signal that stopped the run, on every rank
        self.stopped_at: Optional[int] = None  # the global step saved when stopping
        self._received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def handle(self, signum: int, frame=None) -> None:
        if self._received is not None:
            logger.error(f"second signal ({signal.Signals(signum).name}): exiting now, without saving")
            os._exit(SIGNAL_EXIT_BASE + signum)
        self._received = signum
        logger.warning(
            f"received {signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
            "(send it again to exit at once)"
        )

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread install handlers
        for sig in INTERRUPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self.handle)

    def on_step_end(self, args, state, control, **kwargs):
        received = _any_rank(float(self._received or 0), args.device)
        if received:
            self.signum = int(received)
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def interrupted(self, state) -> bool:
        """True when a signal stopped training before its last step."""
        return self.signum is not None and state.global_step < state.max_steps


@contextmanager
def handlers_restored(callback: InterruptCallback) -> Iterator[None]:
    """Around `trainer.train()`: the previous signal handlers come back however training ends."""
    try:
        yield
    finally:
        callback.restore()


def raise_if_interrupted(trainer, config) -> None:
    """After `trainer.train()`: log how to resume and raise when a signal stopped the run."""
    callback = trainer.interrupt
    if not callback.interrupted(trainer.state):
        return
    name = signal.Signals(callback.signum).name
    checkpoint = os.path.join(config.output_dir, f"checkpoint-{callback.stopped_at}")
    message = (
        f"stopped by {name} at step {callback.stopped_at} of {trainer.state.max_steps}; "
        f"checkpoint saved to {checkpoint}. Resume with:\n  {resume_command(config)}"
    )
    raise TrainingInterrupted(message, SIGNAL_EXIT_BASE + callback.signum)


# ---------------------------------------------------------------- non-finite guard


class NonFiniteGuard(TrainerCallback):
    """Stops (or skips, up to `max_skipped` times) an optimizer step whose loss or gradients are not finite.

    The loss of each micro-batch is handed in by `observe_loss` (RunHooks.training_step);
    gradients are checked just before the optimizer step, after clipping.
    """

    def __init__(self, max_skipped: int = 0):
        self.max_skipped = max_skipped
        self.skipped = 0
        self._loss_ok: Optional[torch.Tensor] = None
        self._last_loss: Optional[torch.Tensor] = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()  # stays on the device: no sync per micro-batch
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok
        self._last_loss = loss.detach()

    def _grads_ok(self, model) -> bool:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return True  # DeepSpeed keeps them itself; the loss check still runs
        # One fused norm over all gradients (foreach kernels on a GPU): a NaN or inf anywhere makes it non-finite.
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        loss_ok = True if self._loss_ok is None else bool(self._loss_ok)
        # Under fp16 the loss scaler skips overflowing steps itself and lowers its scale.
        grads_ok = args.fp16 or model is None or self._grads_ok(model)
        bad = _any_rank(0.0 if loss_ok and grads_ok else 1.0, args.device)
        last_loss = self._last_loss
        self._loss_ok = self._last_loss = None
        if not bad:
            return
        what = "the loss" if not loss_ok else "the gradients" if not grads_ok else "another rank's loss or gradients"
        step = state.global_step + 1
        lr = _current_lr(lr_scheduler, args.learning_rate)
        loss_text = f" (last loss {last_loss.float().item()})" if last_loss is not None and not loss_ok else ""
        # DeepSpeed holds its own gradient copies, which zero_grad here would not clear.
        if self.skipped < self.max_skipped and not args.deepspeed:
            self.skipped += 1
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            logger.warning(
                f"step {step}: {what} not finite{loss_text} at learning rate {lr:.3g}; step skipped "
                f"({self.skipped} of max_nonfinite_steps={self.max_skipped})"
            )
            return
        raise NonFiniteError(nonfinite_message(args.output_dir, step, lr, f"{what} became NaN or infinite{loss_text}"))


def _current_lr(lr_scheduler, default: float) -> float:
    try:
        return float(lr_scheduler.get_last_lr()[0])
    except (AttributeError, IndexError, TypeError):  # no scheduler, or one without get_last_lr
        return default


def nonfinite_message(output_dir: str, step: int, lr: float, what: str) -> str:
    newest = newest_complete(output_dir).path
    kept = (
        f"The last good checkpoint is kept: {newest} (resume from it after the fix)."
        if newest
        else "No checkpoint was saved before this step."
    )
    causes = "\n".join(f"  - {c}" for c in NONFINITE_CAUSES)
    return (
        f"training stopped at step {step} (learning rate {lr:.3g}): {what}. Likely causes:\n{causes}\n{kept}\n"
        "To skip a few such steps instead of stopping, set max_nonfinite_steps."
    )
