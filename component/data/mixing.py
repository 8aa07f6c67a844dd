"""Mixing tokenized datasets into one: concatenate, or interleave by weight with a fixed seed.

- `concatenate`: the datasets in list order; `num_samples` sizes each one first (`resize`).
- `interleave`: each example is drawn from dataset i with probability weight_i / sum(weights),
  seeded, until the first dataset runs out (datasets' `first_exhausted`): every example is
  used at most once and the realised shares follow the weights. (`all_exhausted` would
  repeat the other datasets until the last one runs out, silently training several epochs on
  the small ones; up-sampling stays explicit, through num_samples under concatenate.)

The mixed dataset is returned with how many examples each dataset gave, for the summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple, Optional

import numpy as np
from datasets import Dataset, concatenate_datasets, interleave_datasets

SOURCE_COLUMN = "_source"
STOPPING_STRATEGY = "first_exhausted"


class Mixed(NamedTuple):
    dataset: Dataset
    counts: list[int]
    """Examples each dataset gave to the mixture, in list order."""


def resize(dataset: Dataset, num_samples: Optional[int], seed: int) -> Dataset:
    """The first `num_samples` examples; above the dataset's size, the whole dataset as many
    times as fits and a seeded draw (without replacement) of the remainder. None: unchanged."""
    if num_samples is None or num_samples == len(dataset):
        return dataset
    if num_samples < len(dataset):
        return dataset.select(range(num_samples))
    repeats, rest = divmod(num_samples, len(dataset))
    extra = np.random.default_rng(seed).choice(len(dataset), size=rest, replace=False)
    return dataset.select([*range(len(dataset))] * repeats + sorted(extra.tolist()))


def mix(datasets: Sequence[Dataset], strategy: str, seed: int, weights: Optional[Sequence[float]] = None) -> Mixed:
    """One dataset of `datasets` by `strategy` (concatenate or interleave, with `weights`)."""
    tagged = [d.add_column(SOURCE_COLUMN, [i] * len(d)) for i, d in enumerate(datasets)]
    if strategy == "interleave" and len(tagged) > 1:
        total = float(sum(weights))
        mixed = interleave_datasets(
            tagged, probabilities=[w / total for w in weights], seed=seed, stopping_strategy=STOPPING_STRATEGY
        )
    else:
        mixed = concatenate_datasets(tagged) if len(tagged) > 1 else tagged[0]
    counted = Counter(mixed[SOURCE_COLUMN])
    return Mixed(mixed.remove_columns(SOURCE_COLUMN), [counted.get(i, 0) for i in range(len(datasets))])
