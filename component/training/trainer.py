"""Our trainers: one mixin that every task's Trainer uses, and the SFT/pretrain Trainer.

`RunHooks` is mixed into transformers' `Trainer` (SFT, pretrain) and trl's
`DPOTrainer` alike. It holds the run's callbacks by name (the report, the
interrupt handler, the non-finite guard, the checkpoint marker) and feeds
them every micro-batch and every loss; nothing is found by scanning. It also
owns the terminal: one log line per metrics record, under one progress bar
(component/training/log_callback.py).

`FinetuneTrainer` adds the lean loss (component/training/loss.py) through
transformers' public `compute_loss_func` hook: `compute_loss` asks the model
for no logits and keeps the decoder's last hidden state, and the hook turns
the labelled rows into the loss. Trainer.compute_loss does the rest as
upstream does (label popping, token averaging across devices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from loguru import logger
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from component.config import Config
from component.data.batching import TokenBudgetSampler
from component.data.splits import TaskData
from component.errors import ConfigError
from component.training import fsdp
from component.training.checkpoints import CheckpointMarker
from component.training.log_callback import LogCallback, ProgressBar
from component.training.loss import LeanLoss, TiedHeadGrad, find_head_parts, without_label_rows
from component.training.neftune import NEFTUNE_KEY, PerExampleNEFTune
from component.training.report import RunReportCallback
from component.training.safety import InterruptCallback, NonFiniteGuard


class RunHooks:
    """Mixin for a transformers Trainer (ours or trl's): the run's callbacks, held by name, fed every step.

    Keyword arguments on top of the Trainer's: `max_nonfinite_steps` for the guard, and
    `callbacks`, extra ones (tests, benchmarks), run after the report and before the safety callbacks.
    """

    def __init__(self, *args, max_nonfinite_steps: int = 0, callbacks: Sequence[TrainerCallback] = (), **kwargs):
        self.run_report = RunReportCallback()
        self.interrupt = InterruptCallback()
        self.nonfinite_guard = NonFiniteGuard(max_nonfinite_steps)
        self.checkpoint_marker = CheckpointMarker()
        # The report goes first: it counts a step's tokens before the others see the step. Extra callbacks see
        # the report and the log of a step, and act before the safety callbacks do. The interrupt callback asks for a save
        # at step end; the marker then clears the completion mark of the folder about to be written.
        safety = [self.interrupt, self.nonfinite_guard, self.checkpoint_marker]
        super().__init__(*args, callbacks=[self.run_report, LogCallback(), *callbacks, *safety], **kwargs)
        self.checkpoint_marker.take_rotation(self.args)
        # LogCallback writes each metrics record; transformers' printer or bar would show it a second time.
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        if not self.args.disable_tqdm:
            self.add_callback(ProgressBar(self.run_report.tokens_per_second))

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # accelerate drops an FSDP plugin on a CPU process group (DDP instead); given as on a GPU (training/fsdp.py).
        if fsdp.enable_on_cpu(self.accelerator, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        if self.is_fsdp_enabled and not _internal_call:  # the run's own save, not a checkpoint's: consolidated
            fsdp.full_state_dict_for_final_save(self.accelerator)
        super().save_model(output_dir, _internal_call)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Before any callback sees a training record: TensorBoard and our log line get the token rate and counts.
        if "loss" in logs:
            logs.update(self.run_report.log_metrics())
        super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        # The run report counts real and supervised tokens from each micro-batch. trl's GRPO hands its prompt rows
        # here (a list); it counts the batches it generates from them itself (component/tasks/grpo.py).
        if isinstance(inputs, dict):
            self.run_report.observe_batch(inputs)
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.nonfinite_guard.observe_loss(loss)
        return loss


class FinetuneTrainer(RunHooks, Trainer):
    """transformers.Trainer with the run hooks and the lean loss."""

    def __init__(
        self,
        *args,
        lean_loss: bool = True,
        neftune_alpha: Optional[float] = None,
        batch_sampler: Optional[Sampler] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler  # token-budget batches (component/data/batching.py), or None
        self.neftune = PerExampleNEFTune(neftune_alpha) if neftune_alpha else None
        if self.neftune is not None:
            logger.info(f"NEFTune: alpha {neftune_alpha}, noise scaled by each example's own length")
        if batch_sampler is not None:
            self.add_callback(SamplerEpoch(batch_sampler))
        # None where the model's type or config rules the lean loss out (component/training/loss.py).
        # ZeRO-3 partitions the head's weight and gathers it only inside the model's own forward.
        parts = find_head_parts(self.model) if lean_loss and not is_deepspeed_zero3_enabled() else None
        # A head tied to the input embedding: one weight-gradient buffer instead of two (component/training/loss.py).
        # Eager single-process runs only: not DataParallel, DeepSpeed, FSDP, or a compiled model.
        one_process = self.args.n_gpu <= 1 and not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.torch_compile
        )
        embedding = TiedHeadGrad.usable(parts, self.model, self.accelerator.num_processes if one_process else 0)
        self.tied_grad = TiedHeadGrad(embedding.weight, embedding) if embedding is not None else None
        self.lean = LeanLoss(parts, sink=self.tied_grad) if parts is not None else None
        if self.lean is not None:
            self.compute_loss_func = self.lean
        logger.info(
            "loss: lean (the output head runs on labelled positions only)"
            if self.lean is not None
            else "loss: the model's own (full-sequence logits)"
        )
        if self.tied_grad is not None:
            logger.info("tied head and embedding: one gradient buffer (the lookup's gradient is sparse until added)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.neftune is not None:
            self.neftune.observe(inputs)
        if self.lean is None:
            return super().compute_loss(model, without_label_rows(inputs), return_outputs, num_items_in_batch)
        if return_outputs or "labels" not in inputs:
            # Logits wanted, or nothing to learn: the model's own loss, exactly as upstream (label smoothing too).
            self.compute_loss_func = None
            try:
                return super().compute_loss(model, without_label_rows(inputs), return_outputs, num_items_in_batch)
            finally:
                self.compute_loss_func = self.lean
        with self.lean.capture():
            loss = super().compute_loss(model, self.lean.model_inputs(inputs), False, num_items_in_batch)
        if num_items_in_batch is None and model.training:
            # With a loss hook set, training_step no longer divides by the accumulation steps; a loss
            # normalised by this micro-batch's own count (no num_items_in_batch) still needs it.
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def compute_loss_context_manager(self):
        """Under bf16 autocast on the CPU, LoRA's input stays bf16: peft would cast it to its fp32 adapter's dtype
        (one copy per adapted layer, and the dropout in fp32) only for autocast to cast it back for the matmul."""
        from peft import PeftModel
        from peft.helpers import disable_input_dtype_casting

        stack = super().compute_loss_context_manager()
        if self.args.bf16 and self.args.device.type == "cpu" and isinstance(self.model, PeftModel):
            stack.enter_context(disable_input_dtype_casting(self.model))
        return stack

    def get_train_dataloader(self) -> DataLoader:
        """With a batch sampler (token-budget batches), a DataLoader over it; accelerate shards its
        batches across ranks (their number is a multiple of ranks x accumulation steps), and the
        Trainer sets its epoch and skips the batches already trained on resume."""
        if self.batch_sampler is None:
            return super().get_train_dataloader()
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def train(self, *args, **kwargs):
        if self.tied_grad is not None:
            self.tied_grad.open()
        if self.neftune is not None:  # attached for this training only: never left on the model
            self.neftune.attach(self.model.get_input_embeddings())
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.tied_grad is not None:
                self.tied_grad.close()
            if self.neftune is not None:
                self.neftune.detach()

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.tied_grad is not None:
            self.tied_grad.flush()  # before clipping, the finite-gradient guard and the optimizer
        return loss


class SamplerEpoch(TrainerCallback):
    """Sets the token-budget sampler's epoch at each epoch's start. transformers reaches a batch sampler
    inside accelerate's shard wrapper, but not once a resume has wrapped it again to skip batches."""

    def __init__(self, sampler: TokenBudgetSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch + 1e-6))  # mid-epoch on resume: 1.5 -> 1


def token_budget_sampler(config: Config, args: TrainingArguments, train) -> Optional[TokenBudgetSampler]:
    """batching 'tokens': whole examples up to max_tokens_per_batch per micro-batch, the number of
    micro-batches a multiple of ranks x accumulation steps."""
    if config.data.batching != "tokens":
        return None
    lengths = [len(ids) for ids in train["input_ids"]]
    multiple = args.world_size * args.gradient_accumulation_steps
    if len(lengths) < multiple:
        raise ConfigError(
            f"key 'batching': 'tokens' needs at least ranks x gradient_accumulation_steps ({multiple}) examples, "
            f"got {len(lengths)}"
        )
    sampler = TokenBudgetSampler(
        lengths,
        config.data.max_tokens_per_batch,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        multiple_of=multiple,
    )
    batches = sampler.batches(0)
    logger.info(
        f"token-budget batches: {len(batches)} micro-batches of at most {config.data.max_tokens_per_batch} tokens "
        f"per epoch, {sum(lengths) / max(len(batches), 1):.0f} tokens each on average ({len(lengths)} examples, "
        "each once)"
    )
    return sampler


def build_finetune_trainer(
    config: Config,
    args: TrainingArguments,
    model,
    tokenizer,
    data: TaskData,
    callbacks: Sequence[TrainerCallback] = (),
) -> FinetuneTrainer:
    return FinetuneTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tokenizer,
        lean_loss=config.method.lean_loss,
        neftune_alpha=config.training.get(NEFTUNE_KEY),
        batch_sampler=token_budget_sampler(config, args, data.train),
        max_nonfinite_steps=config.method.max_nonfinite_steps,
        callbacks=callbacks,
    )
