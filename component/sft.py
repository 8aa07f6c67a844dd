"""The SFT task: conversation data, padded batches, transformers' Trainer."""

from __future__ import annotations

from typing import NamedTuple, Optional

from datasets import Dataset
from loguru import logger

from component.collator import PaddingCollator
from component.config import Config
from component.sft_data import DataSummary, build_sft_dataset
from component.template import get_template


class TaskData(NamedTuple):
    """What a task hands the trainer: datasets, collator and a data summary."""

    train: Dataset
    eval: Optional[Dataset]
    collator: object
    summary: DataSummary
    problems: list


def build_data(config: Config, tokenizer) -> TaskData:
    template = get_template(config.data.template_name)
    args = dict(
        template=template,
        tokenizer=tokenizer,
        max_len=config.data.max_seq_length,
        num_workers=config.data.tokenize_num_workers,
        skip_invalid=config.data.skip_invalid_examples,
    )
    train = build_sft_dataset(config.data.train_file, **args)
    logger.info(f"train data {config.data.train_file}: {train.summary.describe()}")
    eval_ds = None
    if config.data.eval_file:
        ev = build_sft_dataset(config.data.eval_file, **args)
        logger.info(f"eval data {config.data.eval_file}: {ev.summary.describe()}")
        eval_ds = ev.dataset
    return TaskData(train.dataset, eval_ds, PaddingCollator(tokenizer.pad_token_id), train.summary, train.problems)
