"""Token-budget batches: micro-batches filled with whole examples up to a number of tokens.

`TokenBudgetSampler` is a batch sampler. Each epoch it shuffles the examples (seed + epoch), cuts
the order into windows, and packs each window best-fit-decreasing into bins of at most
`max_tokens` tokens: longest example first, each into the fullest bin it still fits, a new bin
when none has room. The bins are then shuffled, so the order stays random across epochs while
each batch is nearly full. An example is never cut here (truncation to max_seq_length happened at
tokenization, and max_tokens >= max_seq_length is checked), and each batch becomes one
padding-free row (component/data/collator.py): labels never cross an example boundary.

Every example is used exactly once per epoch. So that every rank runs the same number of
micro-batches per optimizer step, the number of bins is made a multiple of `multiple_of`
(ranks x gradient-accumulation steps) by splitting the bins that hold the most examples; the
remainder is never dropped or repeated.

The order is a function of (seed, epoch) alone: a resumed run regenerates the epoch's batches and
the Trainer skips the ones already trained, so the run continues exactly.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

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


def split_to_multiple(bins: list[list[int]], multiple_of: int) -> list[list[int]]:
    """Split the bins holding the most examples until their number is a multiple of `multiple_of`
    (possible while some bin holds two examples)."""
    bins = [list(b) for b in bins]
    while len(bins) % multiple_of and any(len(b) > 1 for b in bins):
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cached[0] == epoch:
            return self._cached[1]
        rng = random.Random(self.seed * 100_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        bins: list[list[int]] = []
        for start in range(0, len(order), self.window):
            bins += best_fit_decreasing(order[start : start + self.window], self.lengths, self.max_tokens)
        bins = split_to_multiple(bins, self.multiple_of)
        rng.shuffle(bins)
        self._cached = (epoch, bins)
        return bins

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def __len__(self) -> int:
        return len(self.batches(self.epoch))
