"""What every task hands its trainer, and the train/eval split both are built with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

from datasets import Dataset
from loguru import logger

from component.config import Config, DataArguments
from component.data.sources import DatasetSpec

DEFAULT_SEED = 42  # TrainingArguments' default seed


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


def dataset_specs(entries: Optional[list[dict]], single: Optional[str], data_format: str) -> list[DatasetSpec]:
    """A `datasets` list as specs; a single file (train_file/eval_file) is a one-entry list. Entries
    without a format take data_format."""
    if entries:
        return [DatasetSpec.from_entry({"format": data_format, **entry}) for entry in entries]
    return [DatasetSpec(single, format=data_format)] if single else []


def mix_seed(config: Config) -> int:
    """mix_seed, else the run's seed."""
    if config.data.mix_seed is not None:
        return config.data.mix_seed
    return config.training.get("seed", DEFAULT_SEED)


def _names(specs: list[DatasetSpec]) -> str:
    return ", ".join(s.path for s in specs)


def build_mixed_splits(config: Config, build: Callable, **args) -> tuple[Any, Optional[Dataset]]:
    """As build_splits, for a task that reads dataset lists: `build(specs, strategy=, seed=, **args)`."""
    data: DataArguments = config.data
    mixing = dict(strategy=data.mix_strategy, seed=mix_seed(config))
    specs = dataset_specs(data.datasets, data.train_file, data.data_format)
    train = build(specs, **mixing, **args)
    logger.info(f"train data {_names(specs)}: {train.summary.describe()}")
    eval_specs = dataset_specs(data.eval_datasets, data.eval_file, data.data_format)
    if not eval_specs:
        return train, None
    # Eval sets are concatenated whatever the train mixture: an interleave would drop eval examples.
    ev = build(eval_specs, strategy="concatenate", seed=mixing["seed"], **args)
    logger.info(f"eval data {_names(eval_specs)}: {ev.summary.describe()}")
    return train, ev.dataset
