"""Our Trainer: transformers' `Trainer`, subclassed only where we must.

`FinetuneTrainer` is what every task uses unless it needs another class
(DPO uses trl's). `default_callbacks()` is the list of callbacks every run gets.
"""

from __future__ import annotations

from loguru import logger
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from component.logs import LogCallback
from component.loss import TiedHeadGrad, find_head_parts, lean_causal_lm_loss
from component.report import RunReportCallback, observe_batch
from component.safety import observe_loss


class FinetuneTrainer(Trainer):
    """transformers.Trainer with our loss and run-safety hooks."""

    def __init__(self, *args, lean_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        # None where the model's type or config rules the lean loss out (component/loss.py).
        # ZeRO-3 partitions the head's weight and gathers it only inside the model's own forward.
        self.lean_parts = find_head_parts(self.model) if lean_loss and not is_deepspeed_zero3_enabled() else None
        logger.info(
            "loss: lean (the output head runs on labelled positions only)"
            if self.lean_parts is not None
            else "loss: the model's own (full-sequence logits)"
        )
        # A head tied to the input embedding: one weight-gradient buffer instead of two (component/loss.py).
        # Eager single-process runs only: not DataParallel, DeepSpeed, FSDP, or a compiled model.
        one_process = self.args.n_gpu <= 1 and not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.torch_compile
        )
        embedding = TiedHeadGrad.usable(
            self.lean_parts, self.model, self.accelerator.num_processes if one_process else 0
        )
        self.tied_grad = TiedHeadGrad(embedding.weight, embedding) if embedding is not None else None
        if self.tied_grad is not None:
            logger.info("tied head and embedding: one gradient buffer (the lookup's gradient is sparse until added)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.lean_parts is None or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = lean_causal_lm_loss(model, self.lean_parts, inputs, num_items_in_batch, sink=self.tied_grad)
        if (
            self.args.average_tokens_across_devices
            and self.model_accepts_loss_kwargs
            and num_items_in_batch is not None
        ):
            # As Trainer.compute_loss: num_items_in_batch counts every device's tokens, and DDP averages gradients.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def train(self, *args, **kwargs):
        if self.tied_grad is not None:
            self.tied_grad.open()
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.tied_grad is not None:
                self.tied_grad.close()

    def training_step(self, model, inputs, *args, **kwargs):
        # The run report counts real and supervised tokens from each micro-batch.
        observe_batch(self.callback_handler.callbacks, inputs)
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.tied_grad is not None:
            self.tied_grad.flush()  # before clipping, the finite-gradient guard and the optimizer
        observe_loss(self.callback_handler.callbacks, loss)  # the non-finite guard (component/safety.py)
        return loss


def default_callbacks() -> list:
    # The report callback goes first: it adds tokens/s to the logs the others show.
    return [RunReportCallback(), LogCallback()]
