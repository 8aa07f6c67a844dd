"""From a Config to transformers' TrainingArguments: where a run meets the machine.

Constructing `TrainingArguments` sets up accelerate's process state, devices
and, under a launcher, the process group. So it happens here, once, at the
start of the runner, never while a config is loaded:
- a DeepSpeed or FSDP config run by plain `python train.py` becomes a one-rank launch;
- bf16 on a machine without CUDA runs on the CPU (`use_cpu`); fp16 there is refused, before anything
  starts: the CPU has no fp16 autocast or loss scaling, so the model would train in plain float16;
- the launcher and the hardware decide the backend (component/training/distributed.py);
- an optimizer the device cannot run is replaced, with a warning (component/model/quantization.py).
Errors of TrainingArguments' own checks come back as a ConfigError naming the file and the key. The
values it accepts but that fail later (a batch size of 0, a negative learning rate, a reporting
integration not installed) are checked with the config (component/config/checks.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import torch
from transformers import TrainingArguments

from component.config import Config
from component.config.arguments import training_fields
from component.errors import ConfigError
from component.training import distributed
from component.training.neftune import NEFTUNE_KEY


def fp16_problem(config: Config) -> Optional[str]:
    """fp16 needs CUDA: without it transformers would load the model in float16 and train it with no loss scaling."""
    if not config.training.get("fp16") or torch.cuda.is_available():
        return None
    return (
        f"{config.source}: key 'fp16': this machine has no CUDA GPU, and fp16 training needs one: on the CPU "
        "there is no fp16 autocast and no loss scaling, so the model would load and train in plain float16, "
        "where small gradients vanish and large values overflow. Use bf16: true (and fp16: false), or fp32 "
        "(fp16 and bf16 false)."
    )


def machine_kwargs(config: Config) -> dict[str, Any]:
    """The config's TrainingArguments values, adjusted for the launcher and the hardware."""
    kwargs = dict(config.training)
    kwargs.pop(NEFTUNE_KEY, None)  # our per-example NEFTune (training/neftune.py), never transformers' hook
    if not torch.cuda.is_available():
        # bf16 on the CPU is only accepted by TrainingArguments with use_cpu.
        kwargs.setdefault("use_cpu", bool(kwargs.get("bf16")) or kwargs.get("use_cpu", False))
    # torchrun/deepspeed: backend, CPU process group, DDP flags (before devices are set up).
    return distributed.prepare_training_kwargs(kwargs, config.method.train_mode)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def restored_defaults(cls: type[TrainingArguments]) -> dict[str, Any]:
    """TrainingArguments' own defaults for the fields a subclass (trl's DPOConfig) gives other defaults.

    A config means the same in every task: trl's DPOConfig would otherwise turn on bf16 and gradient
    checkpointing and set the learning rate to 1e-6 for every value the config leaves out.
    """
    base = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    return {
        f.name: _default(base[f.name])
        for f in dataclasses.fields(cls)
        if f.name in base and _default(f) != _default(base[f.name])
    }


def refused_key(message: str) -> Optional[str]:
    """The key a TrainingArguments error names: its first `--flag`, else the first field name in the text."""
    fields = training_fields()
    flags = [name for name in re.findall(r"--(\w+)", message) if name in fields]
    if flags:
        return flags[0]
    words = [word for word in re.findall(r"\w+", message) if word in fields]
    return words[0] if words else None


def refusal(config: Config, exc: Exception) -> ConfigError:
    key = refused_key(str(exc))
    where = f"key '{key}'" if key else "invalid training arguments"
    return ConfigError(f"{config.source}: {where}: {exc}")


def training_arguments(
    config: Config, cls: type[TrainingArguments] = TrainingArguments, **extra: Any
) -> TrainingArguments:
    """Build the run's TrainingArguments, or the task's subclass with its `extra` options: process state,
    devices, optimizer."""
    problem = fp16_problem(config)  # before any process state: a refused run starts nothing
    if problem:
        raise ConfigError(problem)
    distributed.emulate_one_rank_launch(config.training)  # DeepSpeed or FSDP under a plain `python train.py`
    try:
        args = cls(**{**restored_defaults(cls), **machine_kwargs(config), **extra})
    except (ValueError, TypeError, ImportError, OverflowError) as exc:  # OverflowError: a huge ddp_timeout
        raise refusal(config, exc) from None
    return args
