"""From a Config to transformers' TrainingArguments: where a run meets the machine.

Constructing `TrainingArguments` sets up accelerate's process state, devices
and, under a launcher, the process group. So it happens here, once, at the
start of the runner, never while a config is loaded:
- a DeepSpeed config run by plain `python train.py` becomes a one-rank launch;
- bf16 on a machine without CUDA runs on the CPU (`use_cpu`);
- the launcher and the hardware decide the backend (component/training/distributed.py);
- an optimizer the device cannot run is replaced, with a warning (component/model/quantization.py).
Errors of TrainingArguments' own checks come back as a ConfigError naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainingArguments

from component.config import Config
from component.errors import ConfigError
from component.model.quantization import apply_optimizer_fallback
from component.training import distributed


def machine_kwargs(config: Config) -> dict[str, Any]:
    """The config's TrainingArguments values, adjusted for the launcher and the hardware."""
    kwargs = dict(config.training)
    if not torch.cuda.is_available():
        # bf16 on the CPU is only accepted by TrainingArguments with use_cpu.
        kwargs.setdefault("use_cpu", bool(kwargs.get("bf16")) or kwargs.get("use_cpu", False))
    # torchrun/deepspeed: backend, CPU process group, DDP flags (before devices are set up).
    return distributed.prepare_training_kwargs(kwargs, config.method.train_mode)


def training_arguments(config: Config, make: Callable[..., TrainingArguments] = TrainingArguments) -> TrainingArguments:
    """Build the run's TrainingArguments (or a subclass, through `make`): process state, devices, optimizer."""
    distributed.emulate_launch_for_deepspeed(config.training.get("deepspeed"))  # plain `python train.py`
    try:
        args = make(**machine_kwargs(config))
    except (ValueError, TypeError, ImportError) as exc:
        raise ConfigError(f"{config.source}: invalid training arguments: {exc}") from None
    apply_optimizer_fallback(args)
    return args
