"""The KTO task: unpaired examples (component/data/unpaired.py) trained with trl's KTOTrainer.

Each line is a prompt, a completion and a label (desirable or not), rendered with our templates
and tokenized as SFT does; trl gets its own tokenized columns (`prompt_ids`, `completion_ids`,
`label`) and never re-tokenizes them. The reference is as in DPO: a frozen copy in full mode, the
base with the adapter disabled under LoRA and QLoRA. KTO's KL estimate (loss `kto`) scores each
prompt with the completion of its neighbour in the same training batch, so, as in trl, examples are
drawn in the file's order (`train_sampling_strategy: sequential`) and a batch needs two or more.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments

from component.config import Config
from component.config.arguments import FULL_WEIGHT_MODES
from component.config.checks import choice_problems
from component.data.cache import cache_root, cached
from component.data.preference import mapped
from component.data.splits import TaskData, build_splits
from component.data.tokenizer_template import check_template_keys, resolve_template, use_chat_template_file
from component.data.unpaired import KTOSummary, UnpairedData, build_unpaired_dataset
from component.tasks import dpo
from component.tasks.task import Task
from component.training.setup import training_arguments
from component.training.trainer import RunHooks

# trl 1.16's KTOConfig.loss_type choices; tests/test_preference_tasks.py keeps the two equal.
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
SEQUENTIAL = "sequential"
KL_COLUMN = "KL_completion_ids"


def build_data(config: Config, args: TrainingArguments, tokenizer) -> TaskData:
    use_chat_template_file(tokenizer, config.data.chat_template)
    template = resolve_template(config.data.template_name, tokenizer)
    build_args = dict(
        template=template,
        tokenizer=tokenizer,
        max_len=config.data.max_seq_length,
        max_prompt_len=config.data.max_prompt_length,
        skip_invalid=config.data.skip_invalid_examples,
        empty_think=config.data.empty_think_block,
    )
    build = cached(build_unpaired_dataset, cache_root(config), "kto", UnpairedData, lambda d: KTOSummary(**d))
    with args.main_process_first(desc="kto data"):  # under torchrun the first rank builds the cache
        train, eval_ds = build_splits(config, build, **build_args)
    return TaskData(train.dataset, eval_ds, None, train.summary, train.problems)


def uses_kl(loss_type: str) -> bool:
    return loss_type != "apo_zero_unpaired"  # as trl decides it (KTOTrainer.calculate_KL)


def kto_arguments(config: Config):
    """trl's KTOConfig: every TrainingArguments value of ours, plus the KTO options."""
    from trl import KTOConfig

    method = config.method
    extra = {"train_sampling_strategy": SEQUENTIAL} if uses_kl(method.kto_loss_type) else {}
    return training_arguments(
        config,
        KTOConfig,
        beta=method.kto_beta,
        loss_type=method.kto_loss_type,
        desirable_weight=method.kto_desirable_weight,
        undesirable_weight=method.kto_undesirable_weight,
        max_length=config.data.max_seq_length,  # examples already fit: trl's collator never cuts
        dataset_num_proc=config.data.tokenize_num_workers,
        trust_remote_code=config.model.trust_remote_code,
        **extra,
    )


def _rotated(batch: dict[str, list]) -> dict[str, list]:
    completions = batch["completion_ids"]
    return {KL_COLUMN: completions[-1:] + completions[:-1]}


def with_kl_completions(dataset, batch_size: int):
    """Each example's mismatched completion for the KL estimate: the completions rotated by one within each
    batch of the file's order, as trl's own preparation does (x_1, y_n), (x_2, y_1), ..."""
    return mapped(dataset, _rotated, batched=True, batch_size=batch_size)


def _trainer_class():
    from trl import KTOTrainer

    class KTORunTrainer(RunHooks, KTOTrainer):
        """trl's KTOTrainer on our tokenized examples, with the adapter-disabled reference under LoRA."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            dpo.reference_without_copy(self.model)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Ours is rendered with the SFT template and cut already; trl would re-tokenize it as plain text.
            if not {"prompt_ids", "completion_ids", "label"} <= set(dataset.column_names):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if self.calculate_KL and KL_COLUMN not in dataset.column_names:
                return with_kl_completions(dataset, args.per_device_train_batch_size)
            return dataset

    return KTORunTrainer


def build_trainer(config: Config, args, model, tokenizer, data: TaskData, callbacks=()):
    ref_model = None
    if config.method.train_mode in FULL_WEIGHT_MODES and not args.precompute_ref_log_probs:
        ref_model = dpo.frozen_copy(config, model)
    return dpo.trl_trainer(_trainer_class(), config, args, model, tokenizer, data, callbacks, ref_model=ref_model)


def check_kto_values(values: dict[str, Any]) -> list[str]:
    problems = check_template_keys(values)
    loss = values.get("kto_loss_type", "kto")
    problems += choice_problems("kto_loss_type", loss, KTO_LOSS_TYPES)
    for key, default in (("kto_beta", 0.1), ("kto_desirable_weight", 1.0), ("kto_undesirable_weight", 1.0)):
        if not values.get(key, default) > 0:
            problems.append(f"key '{key}': must be positive, got {values[key]}")
    if uses_kl(loss):
        if values.get("per_device_train_batch_size", 8) < 2:
            problems.append(
                "key 'per_device_train_batch_size': KTO's KL estimate pairs each prompt with another example's "
                "completion in the same batch, so it needs 2 or more (kto_loss_type 'apo_zero_unpaired' has no KL term)"
            )
        strategy = values.get("train_sampling_strategy", SEQUENTIAL)
        if strategy != SEQUENTIAL:
            problems.append(
                f"key 'train_sampling_strategy': KTO's KL estimate pairs neighbours in the file's order, so "
                f"examples are drawn in that order ('{SEQUENTIAL}'), not {strategy!r}; shuffle the file instead"
            )
    return problems


TASK = Task("kto", build_data, build_trainer, checks=(check_kto_values,), training_arguments=kto_arguments)
