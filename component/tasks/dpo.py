"""The DPO task: preference pairs (component/data/preference.py) trained with trl's DPOTrainer.

The reference is a frozen copy in full mode, the base with the adapter
disabled under LoRA and QLoRA. The run's arguments are trl's `DPOConfig`, built
from our config like every task's TrainingArguments, so trl's own defaults
(bf16, gradient checkpointing, lr 1e-6) never apply silently. The trainer mixes
in `RunHooks`: the report, the interrupt handler and the non-finite guard see
every step, as in SFT.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

from transformers import TrainingArguments

from component.config import Config
from component.config.arguments import FULL_WEIGHT_MODES
from component.data.cache import cache_root, cached
from component.data.preference import DPOSummary, PreferenceData, build_preference_dataset, no_progress_bars
from component.data.splits import TaskData, build_splits
from component.data.tokenizer_template import check_template_keys, resolve_template, use_chat_template_file
from component.tasks.task import Task
from component.training.setup import training_arguments
from component.training.trainer import RunHooks

TELEMETRY_ENV = "HF_HUB_DISABLE_TELEMETRY"  # huggingface_hub's opt-out, which trl's ping honours

# Ours stays: trl 1.16 exposes no list (DPOConfig.loss_type is a plain list[str]; DPOTrainer rejects an unknown
# name only at the first loss, after output_dir exists). tests/test_library_parity.py keeps the two equal.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


def build_data(config: Config, args: TrainingArguments, tokenizer) -> TaskData:
    use_chat_template_file(tokenizer, config.data.chat_template)
    template = resolve_template(config.data.template_name, tokenizer)  # as SFT: named, or the tokenizer's own
    build_args = dict(
        template=template,
        tokenizer=tokenizer,
        max_len=config.data.max_seq_length,
        max_prompt_len=config.data.max_prompt_length,
        skip_invalid=config.data.skip_invalid_examples,
        empty_think=config.data.empty_think_block,
    )
    build = cached(build_preference_dataset, cache_root(config), "dpo", PreferenceData, lambda d: DPOSummary(**d))
    with args.main_process_first(desc="dpo data"):  # under torchrun the first rank builds the cache
        train, eval_ds = build_splits(config, build, **build_args)
    return TaskData(train.dataset, eval_ds, None, train.summary, train.problems)


def dpo_arguments(config: Config):
    """trl's DPOConfig: every TrainingArguments value of ours, plus the DPO options."""
    from trl import DPOConfig

    method = config.method
    return training_arguments(
        config,
        DPOConfig,
        beta=method.dpo_beta,
        loss_type=list(method.dpo_loss_type),
        loss_weights=method.dpo_loss_weights,
        label_smoothing=method.dpo_label_smoothing,
        precompute_ref_log_probs=method.dpo_precompute_ref_log_probs,
        max_length=config.data.max_seq_length,  # pairs already fit: trl's collator never cuts
        dataset_num_proc=config.data.tokenize_num_workers,
        trust_remote_code=config.model.trust_remote_code,
    )


def frozen_copy(config: Config, model):
    """The full-mode reference: the starting model, frozen."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from component.model.loading import load_base_model, torch_dtype

    if is_deepspeed_zero3_enabled():
        # A ZeRO-3 model holds only this rank's shards: load the starting weights again instead.
        ref = load_base_model(config.model, torch_dtype(config))
    else:
        ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def reference_without_copy(model) -> None:
    """Given a PeftModel, trl keeps a copy of the adapter as "ref". Ours is always freshly initialised
    (B = 0), so the base with the adapter disabled is the same reference, with no copy held; trl uses
    that when no "ref" adapter exists (DPO, KTO)."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model) and "ref" in model.peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")


def trl_experimental(name: str):
    """A module of trl.experimental (orpo, cpo), imported without trl's notice: trl is pinned and tested here."""
    import importlib

    from trl.import_utils import suppress_experimental_warning

    with suppress_experimental_warning():
        return importlib.import_module(f"trl.experimental.{name}")


def _trainer_class():
    from trl import DPOTrainer

    class PreferenceTrainer(RunHooks, DPOTrainer):
        """trl's DPOTrainer on our pre-tokenized pairs, with the adapter-disabled reference under LoRA."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            reference_without_copy(self.model)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Our pairs are rendered with the SFT template and truncated already; trl would
            # re-tokenize them as plain text and append an EOS the template may not use.
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PreferenceTrainer


@contextlib.contextmanager
def telemetry_disabled() -> Iterator[None]:
    """No usage ping from trl's trainer: we never contact a remote service unasked.

    trl pings from its trainer's constructor through huggingface_hub's `send_telemetry`,
    which `HF_HUB_DISABLE_TELEMETRY` turns off. This process read that variable once, when
    transformers imported huggingface_hub, so the constant `send_telemetry` checks is set
    too. Both are put back afterwards: nothing leaks into the rest of the process.
    """
    from huggingface_hub import constants

    env, constant = os.environ.get(TELEMETRY_ENV), constants.HF_HUB_DISABLE_TELEMETRY
    os.environ[TELEMETRY_ENV] = "1"
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_TELEMETRY = constant
        if env is None:
            os.environ.pop(TELEMETRY_ENV, None)
        else:
            os.environ[TELEMETRY_ENV] = env


def build_trainer(config: Config, args, model, tokenizer, data: TaskData, callbacks=()):
    ref_model = None
    if config.method.train_mode in FULL_WEIGHT_MODES and not args.precompute_ref_log_probs:
        ref_model = frozen_copy(config, model)
    return trl_trainer(_trainer_class(), config, args, model, tokenizer, data, callbacks, ref_model=ref_model)


def trl_trainer(trainer_class, config: Config, args, model, tokenizer, data: TaskData, callbacks=(), **extra):
    """One of trl's trainers (subclassed with our RunHooks) over our tokenized data: without trl's
    telemetry ping (its constructor sends it) or the progress bars of its dataset maps."""
    with telemetry_disabled(), no_progress_bars():
        return trainer_class(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            max_nonfinite_steps=config.method.max_nonfinite_steps,
            callbacks=callbacks,
            **extra,
        )


def check_dpo_values(values: dict[str, Any]) -> list[str]:
    problems = check_template_keys(values)
    if values.get("dpo_beta", 0.1) <= 0:
        problems.append(f"key 'dpo_beta': must be positive, got {values['dpo_beta']}")
    smoothing = values.get("dpo_label_smoothing", 0.0)
    if not 0.0 <= smoothing < 0.5:
        problems.append(f"key 'dpo_label_smoothing': must be in [0, 0.5), got {smoothing}")
    losses = values.get("dpo_loss_type", ["sigmoid"])
    unknown = [x for x in losses if x not in DPO_LOSS_TYPES]
    if unknown or not losses:
        problems.append(
            f"key 'dpo_loss_type': unknown {unknown or 'empty list'}; one or more of {', '.join(DPO_LOSS_TYPES)}"
        )
    weights = values.get("dpo_loss_weights")
    if weights is not None and len(weights) != len(losses):
        problems.append(f"key 'dpo_loss_weights': {len(weights)} weights for {len(losses)} loss types")
    if "exo_pair" in losses and smoothing == 0.0:
        problems.append("key 'dpo_label_smoothing': the exo_pair loss needs it above 0 (e.g. 1e-3)")
    return problems


TASK = Task("dpo", build_data, build_trainer, checks=(check_dpo_values,), training_arguments=dpo_arguments)
