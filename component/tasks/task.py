"""The record a task type is: how it builds its data, its trainer and its arguments, and its config checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import TrainingArguments

from component.config import Check, Config
from component.training.setup import training_arguments


@dataclass(frozen=True)
class Task:
    """One task type. The runner reads these fields; nothing registers itself."""

    name: str
    build_data: Callable
    """(config, args, tokenizer) -> TaskData."""
    build_trainer: Callable
    """(config, args, model, tokenizer, data, callbacks) -> a Trainer using RunHooks."""
    checks: tuple[Check, ...] = ()
    """Config checks for this task's keys; run only when task_type names it."""
    training_arguments: Callable[[Config], TrainingArguments] = training_arguments
    """Builds the run's TrainingArguments (or the task's subclass of it)."""
    token_batches: bool = False
    """Whether the task reads `batching: tokens` / `max_tokens_per_batch` (component/data/batching.py)."""
