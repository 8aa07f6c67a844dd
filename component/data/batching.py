"""Token-budget batches: micro-batches filled with whole examples up to a number of tokens.

`TokenBudgetSampler` is a batch sampler. Each epoch it shuffles the examples (seed + epoch), cuts
the order into windows, and packs each window best-fit-decreasing into bins of at most
`max_tokens` tokens: longest example first, each into the fullest bin it still fits, a new bin
when none has room. The bins are then shuffled, so the order stays random across epochs while
each batch is nearly full. An example is never cut here (truncation to max_seq_length happened at
tokenization, and max_tokens >= max_seq_length is checked), and each batch becomes one
padding-free row (component/data/collator.py): labels never cross an example boundary.

Every example is used exactly once per epoch. Every epoch has the same number of batches (the
Trainer sizes epochs from the first): the most that the first epochs pack into, plus 2%, rounded up
to a multiple of `multiple_of` (ranks x gradient-accumulation steps, so that every rank runs the
same number of micro-batches per optimizer step); an epoch that packs into fewer splits the bins
holding the most examples. The remainder is never dropped or repeated.

The order is a function of (seed, epoch) alone: a resumed run regenerates the epoch's batches and
the Trainer skips the ones already trained, so the run continues exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

PLANNED_EPOCHS = 3  # epochs whose packing sets the fixed number of batches
DEFAULT_WINDOW = 1024  # examples per best-fit window: large enough to fill bins, small enough to stay random


def best_fit_decreasing(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to at most `capacity`, longest first into the fullest bin that fits."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        best = -1
        for b, free in enumerate(room):
            if lengths[i] <= free and (best < 0 or free < room[best]):
                best = b
        if best < 0:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[best].append(i)
            room[best] -= lengths[i]
    return bins


def split_to_count(bins: list[list[int]], count: int) -> list[list[int]]:
    """Split the bins holding the most examples until there are `count` of them (while some bin holds two)."""
    bins = [list(b) for b in bins]
    while len(bins) < count and any(len(b) > 1 for b in bins):
        largest = max(range(len(bins)), key=lambda b: len(bins[b]))
        half = len(bins[largest]) // 2
        bins.append(bins[largest][half:])
        bins[largest] = bins[largest][:half]
    return bins


class TokenBudgetSampler(Sampler[list[int]]):
    """Batches of whole examples up to `max_tokens` tokens (see the module doc)."""

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        seed: int = 0,
        multiple_of: int = 1,
        window: int = DEFAULT_WINDOW,
    ):
        too_long = [n for n in lengths if n > max_tokens]
        if too_long:
            raise ValueError(f"an example of {max(too_long)} tokens exceeds max_tokens_per_batch={max_tokens}")
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.seed = seed
        self.multiple_of = max(1, multiple_of)
        self.window = window
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] = (-1, [])
        # One number of batches for every epoch (the Trainer sizes epochs from the first): the most the
        # first epochs pack into, plus 2%, as a multiple of `multiple_of`; an epoch with fewer bins
        # splits its fullest ones up to it.
        most = max(len(self._packed(epoch)) for epoch in range(PLANNED_EPOCHS))
        self.count = -(-math.ceil(most * 1.02) // self.multiple_of) * self.multiple_of

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _packed(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        bins: list[list[int]] = []
        for start in range(0, len(order), self.window):
            bins += best_fit_decreasing(order[start : start + self.window], self.lengths, self.max_tokens)
        return bins

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cached[0] == epoch:
            return self._cached[1]
        bins = split_to_count(self._packed(epoch), self.count)
        if len(bins) != self.count:
            raise RuntimeError(
                f"token-budget batches: epoch {epoch} packs into {len(bins)} batches, not {self.count}; "
                "raise max_tokens_per_batch or lower the number of ranks x accumulation steps"
            )
        random.Random(self.seed * 100_003 + epoch + 1).shuffle(bins)
        self._cached = (epoch, bins)
        return bins

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        return len(self.batches(self.epoch))
