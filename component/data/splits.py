"""What every task hands its trainer, and the train/eval split both are built with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

from datasets import Dataset
from loguru import logger

from component.config import Config


class TaskData(NamedTuple):
    """What a task hands the trainer: datasets, collator and a data summary."""

    train: Dataset
    eval: Optional[Dataset]
    collator: object
    summary: Any
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
