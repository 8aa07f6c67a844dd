"""`LogCallback`: the Trainer's metrics (loss, learning rate, eval loss) in our log (component/logs.py)."""

from __future__ import annotations

from loguru import logger
from transformers import TrainerCallback


class LogCallback(TrainerCallback):
    """Writes each metrics record of the Trainer to our log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            logger.info(f"step {state.global_step}: {shown}")
