"""Every task type, in one table: the runner and the config checks read it.

Adding a task type: a module in component/tasks/ with a `TASK` record, and
one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from component.config import Check, MethodArguments
from component.config.checks import choice_problems
from component.data.tokenizer_template import check_template_name
from component.errors import ConfigError
from component.model.loading import check_lora_target_values
from component.model.weights import check_model_pickles
from component.tasks import dpo, grpo, kto, orpo, pretrain, reward, sft, simpo
from component.tasks.task import Task
from component.training.distributed import deepspeed_problems
from component.training.fsdp import fsdp_problems

TASKS: dict[str, Task] = {
    task.name: task
    for task in (sft.TASK, pretrain.TASK, dpo.TASK, orpo.TASK, simpo.TASK, kto.TASK, reward.TASK, grpo.TASK)
}
DEFAULT_TASK = "sft"
# MethodArguments' keys and defaults: a saved train_args.json holds every key, at its default where unused.
METHOD_DEFAULTS = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(MethodArguments)
}
# Checks that need a layer above the config: template names, model files and types, DeepSpeed and FSDP settings.
SHARED_CHECKS: tuple[Check, ...] = (
    check_template_name,
    check_model_pickles,
    check_lora_target_values,
    deepspeed_problems,
    fsdp_problems,
)


def check_task_type(values: dict[str, Any]) -> list[str]:
    return choice_problems("task_type", values.get("task_type", DEFAULT_TASK), TASKS)


def check_task_keys(values: dict[str, Any]) -> list[str]:
    task = TASKS.get(values.get("task_type", DEFAULT_TASK))
    return [p for check in (task.checks if task else ()) for p in check(values)]


def check_other_task_keys(values: dict[str, Any]) -> list[str]:
    """A task's own keys (named `<task>_...`: dpo_beta, kto_beta, ...) set for another task type to a value
    other than the default: that task would not read them."""
    task_type = values.get("task_type", DEFAULT_TASK)
    return [
        f"key '{key}': read by task_type '{owner}' only, and this config's task_type is '{task_type}'; remove it"
        for key, value in values.items()
        for owner in [key.split("_", 1)[0]]
        if key in METHOD_DEFAULTS and owner in TASKS and owner != task_type and value != METHOD_DEFAULTS[key]
    ]


def check_token_batches(values: dict[str, Any]) -> list[str]:
    """`batching` / `max_tokens_per_batch` set for a task that would not read them (`Task.token_batches`):
    refused, not ignored."""
    task_type = values.get("task_type", DEFAULT_TASK)
    if task_type not in TASKS or TASKS[task_type].token_batches:
        return []
    readers = " or ".join(repr(name) for name, task in TASKS.items() if task.token_batches)
    return [
        f"key '{key}': token-budget batches are built for task_type {readers} only, not '{task_type}' "
        f"(it batches per_device_train_batch_size examples, pairs or packed blocks per device); remove '{key}'"
        for key, unset in (("batching", "examples"), ("max_tokens_per_batch", None))
        if values.get(key, unset) != unset
    ]


CONFIG_CHECKS: tuple[Check, ...] = (
    check_task_type,
    *SHARED_CHECKS,
    check_task_keys,
    check_other_task_keys,
    check_token_batches,
)
"""What `load_config` is handed by train.py, the scripts and the tests."""


def task_for(name: str) -> Task:
    if name not in TASKS:  # a Config built without CONFIG_CHECKS
        raise ConfigError(check_task_type({"task_type": name})[0])
    return TASKS[name]
