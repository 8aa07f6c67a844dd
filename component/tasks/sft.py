"""The SFT task: conversation data (any format component/data/formats.py reads), padded or padding-free
batches, our FinetuneTrainer."""

from __future__ import annotations

from loguru import logger
from transformers import TrainingArguments

from component.config import Config
from component.data.collator import PaddingCollator, PaddingFreeCollator
from component.data.sft import build_sft_mixture
from component.data.splits import TaskData, build_mixed_splits
from component.data.tokenizer_template import pad_eos_note, resolve_template
from component.errors import ConfigError
from component.model.attention import padding_free_enabled, padding_free_problem
from component.model.loading import read_model_type
from component.model.model_types import model_type_info
from component.tasks.task import Task
from component.training.trainer import build_finetune_trainer


def build_data(config: Config, args: TrainingArguments, tokenizer) -> TaskData:
    # Named or the tokenizer's own ('auto', or no template_name); refused where tokens are missing.
    template = resolve_template(config.data.template_name, tokenizer, config.model.model_name_or_path)
    build_args = dict(
        template=template,
        tokenizer=tokenizer,
        max_len=config.data.max_seq_length,
        num_workers=config.data.tokenize_num_workers,
        skip_invalid=config.data.skip_invalid_examples,
    )
    train, eval_ds = build_mixed_splits(config, build_sft_mixture, **build_args)
    note = pad_eos_note(template, tokenizer, train.dataset[0]["labels"])
    if note:
        logger.log(note[0].upper(), note[1])
    return TaskData(train.dataset, eval_ds, choose_collator(config, tokenizer), train.summary, train.problems)


def choose_collator(config: Config, tokenizer):
    """Padding-free batches where the model type is verified for them, right padding otherwise."""
    model_type = read_model_type(config.model)
    problem = padding_free_problem(config.data.padding_free, model_type)
    if problem:
        raise ConfigError(problem)
    if padding_free_enabled(config.data.padding_free, model_type_info(model_type)):
        logger.info(f"padding-free batches for model type {model_type!r}")
        return PaddingFreeCollator()
    return PaddingCollator(tokenizer.pad_token_id)


TASK = Task("sft", build_data, build_finetune_trainer)
