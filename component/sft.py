"""The SFT task: conversation data, padded batches, transformers' Trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

from datasets import Dataset
from loguru import logger

from component.collator import PaddingCollator
from component.config import Config
from component.errors import ConfigError
from component.model import read_model_type
from component.model_types import model_type_info
from component.padding_free import PaddingFreeCollator, padding_free_enabled, padding_free_problem
from component.sft_data import DataSummary, build_sft_dataset
from component.template import pad_eos_note, resolve_template


class TaskData(NamedTuple):
    """What a task hands the trainer: datasets, collator and a data summary."""

    train: Dataset
    eval: Optional[Dataset]
    collator: object
    summary: DataSummary
    problems: list


def build_splits(config: Config, build: Callable, **args) -> tuple[Any, Optional[Dataset]]:
    """Build the train split and, when eval_file is set, the eval split, logging each summary."""
    train = build(config.data.train_file, **args)
    logger.info(f"train data {config.data.train_file}: {train.summary.describe()}")
    if not config.data.eval_file:
        return train, None
    ev = build(config.data.eval_file, **args)
    logger.info(f"eval data {config.data.eval_file}: {ev.summary.describe()}")
    return train, ev.dataset


def build_data(config: Config, tokenizer) -> TaskData:
    # Named or the tokenizer's own ('auto', or no template_name); refused where tokens are missing.
    template = resolve_template(config.data.template_name, tokenizer, config.model.model_name_or_path)
    args = dict(
        template=template,
        tokenizer=tokenizer,
        max_len=config.data.max_seq_length,
        num_workers=config.data.tokenize_num_workers,
        skip_invalid=config.data.skip_invalid_examples,
    )
    train, eval_ds = build_splits(config, build_sft_dataset, **args)
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
