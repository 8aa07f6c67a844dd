"""Launch-aware setup: torchrun DDP and DeepSpeed, on GPUs and on the CPU.

The same `train.py` and config run as one process, under `torchrun` (one node
or several) and under the `deepspeed` launcher. What differs is decided here,
from the launcher's environment, before transformers' `TrainingArguments` sets
up its devices (it does so while being constructed):

- The process-group backend: NCCL on GPUs, gloo on the CPU; the config key
  `ddp_backend` overrides it.
- On a CPU-only machine accelerate sees no distributed run unless told it is
  on the CPU (`use_cpu`), and every rank would then train on all the data.
- DeepSpeed on the CPU is worse: transformers never passes a backend to
  accelerate when DeepSpeed is on, so accelerate's state says one process and
  every rank gets the same batches. We create that state ourselves first, with
  the gloo backend, and tell the Trainer to use it (`use_configured_state`).
- `ddp_find_unused_parameters` defaults to False for LoRA/QLoRA: every adapter
  takes part in every forward, so DDP's per-step search for unused parameters
  is wasted work, and with reentrant gradient checkpointing it fails ("Expected
  to mark a variable ready only once"). transformers' default is True for a
  peft model. Full fine-tuning keeps transformers' default.
- A plain `python train.py` with `deepspeed` or `fsdp` set runs as a one-rank launch
  (`emulate_one_rank_launch`, called by the runner).
- FSDP (component/training/fsdp.py): accelerate's environment switch is set as `accelerate launch`
  sets it, before the model loads, and cleared for a run without FSDP.
All of this runs in the runner (component/training/setup.py), never while a
config is loaded: loading a config starts no process group.

`deepspeed_problems(values)` checks a DeepSpeed JSON config against the train
config; the task registry hands it to the config's checks.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from component.config import DEFAULT_OPTIM
from component.config.arguments import FULL_WEIGHT_MODES

CPU_BACKEND = "gloo"
GPU_BACKEND = "nccl"
# Environment accelerate reads to know DeepSpeed is on (set by `accelerate launch`).
ACCELERATE_DEEPSPEED_ENV = "ACCELERATE_USE_DEEPSPEED"
# TrainingArguments' default, in seconds.
DEFAULT_DDP_TIMEOUT_S = 1800
ADAPTER_MODES = ("lora", "qlora")
LOOPBACK = "127.0.0.1"
# ZeRO-3 key: gather the sharded weights into one state dict when saving.
GATHER_ON_SAVE = "stage3_gather_16bit_weights_on_model_save"
# Environment accelerate reads to know FSDP is on (set by `accelerate launch --use_fsdp`, and by the Accelerator).
ACCELERATE_FSDP_ENV = "ACCELERATE_USE_FSDP"


def is_launched() -> bool:
    """True under torchrun or the deepspeed launcher (both set LOCAL_RANK for each rank)."""
    return int(os.environ.get("LOCAL_RANK", "-1")) != -1


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str | None, gpu: bool) -> str:
    """The process-group backend: the configured one, else NCCL on GPUs and gloo on the CPU."""
    return requested or (GPU_BACKEND if gpu else CPU_BACKEND)


def _deepspeed_on_cpu_state(backend: str, timeout_s: int) -> None:
    """Create accelerate's process state for DeepSpeed with an explicit backend.

    Without a backend, accelerate records DeepSpeed runs on the CPU as a single
    process (num_processes 1), so the Trainer does not shard the data.
    """
    from accelerate.state import AcceleratorState, PartialState

    # A state left by an earlier run in this process would keep its DeepSpeed plugin.
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ[ACCELERATE_DEEPSPEED_ENV] = "true"
    try:
        PartialState(backend=backend, timeout=timedelta(seconds=timeout_s))
    finally:
        del os.environ[ACCELERATE_DEEPSPEED_ENV]


def prepare_training_kwargs(kwargs: dict[str, Any], train_mode: str) -> dict[str, Any]:
    """Adjust TrainingArguments keyword arguments for the launcher and the hardware.

    Called right before `TrainingArguments(**kwargs)`. May initialise the
    process group (DeepSpeed on the CPU). Values the user set are kept.
    """
    out = dict(kwargs)
    if train_mode in ADAPTER_MODES and out.get("ddp_find_unused_parameters") is None:
        out["ddp_find_unused_parameters"] = False
    set_fsdp_environment(bool(out.get("fsdp")))
    if not is_launched() or has_gpu():
        return out  # one process, or GPUs: transformers picks NCCL itself
    backend = choose_backend(out.get("ddp_backend"), gpu=False)
    out["ddp_backend"] = backend
    if out.get("deepspeed"):
        _deepspeed_on_cpu_state(backend, out.get("ddp_timeout", DEFAULT_DDP_TIMEOUT_S))
        accel = out.get("accelerator_config") or {}
        if isinstance(accel, str):  # TrainingArguments also takes a JSON file here
            accel = json.loads(Path(accel).read_text())
        out["accelerator_config"] = {**accel, "use_configured_state": True}
    else:
        out["use_cpu"] = True  # accelerate only sets up a CPU process group when told
    return out


def set_fsdp_environment(fsdp: bool) -> None:
    """accelerate's FSDP switch: on for an FSDP config, as `accelerate launch` sets it, before the model
    loads (transformers reads it for `cpu_ram_efficient_loading`); off for any other config. The
    Accelerator of an FSDP run sets it and never clears it, and the config alone decides: a run without
    `fsdp` after one with it in the same process (tests/dist_worker.py), or under a launcher's
    `--use_fsdp`, is not turned into FSDP."""
    if fsdp:
        os.environ[ACCELERATE_FSDP_ENV] = "true"
        return
    if os.environ.pop(ACCELERATE_FSDP_ENV, "false").lower() == "true":
        from loguru import logger

        logger.warning(f"{ACCELERATE_FSDP_ENV}=true ignored: FSDP is switched on by the config's 'fsdp' key")


def shutdown(status: int) -> None:
    """End a launched rank after its runs, without the process group's teardown.

    A rank that exits normally tears its gloo group down in C++ destructors,
    and that teardown sometimes aborts ("terminate called without an active
    exception", SIGABRT) after all work is done; torchrun then fails the whole
    launch. It happened in CI with the group left live and with it destroyed
    first. So a launched rank that succeeded waits for every rank at a
    barrier (nobody is still communicating or saving), flushes its logs and
    exits at once with `os._exit`, skipping the destructors. After a failure
    it exits the same way without the barrier, which the other ranks may never
    reach. Without a process group this returns and the caller exits as usual.
    """
    dist = sys.modules.get("torch.distributed")  # never imported (train.py --help): no group to end
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    if status == 0:
        dist.barrier()
    from loguru import logger

    logger.remove()  # closes (and flushes) every sink: train.log is complete
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def emulate_launch_for_deepspeed(deepspeed_config) -> bool:
    """Let a plain `python train.py` run a DeepSpeed config as a one-rank launch.

    DeepSpeed takes its rank from a launcher's environment; with none it looks
    for MPI and fails with "No module named 'mpi4py'". Returns True when the
    environment was set.
    """
    if not deepspeed_config or is_launched() or "RANK" in os.environ:
        return False
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(free_port()),
    )
    return True


def emulate_one_rank_launch(training: dict[str, Any]) -> bool:
    """`emulate_launch_for_deepspeed` for DeepSpeed and FSDP alike: both need a process group, which a
    plain `python train.py` does not start (transformers refuses FSDP "only works in distributed
    training"); one rank it is, as DeepSpeed does. Returns True when the environment was set."""
    return emulate_launch_for_deepspeed(training.get("deepspeed") or training.get("fsdp"))


# ---------------------------------------------------------------- DeepSpeed config checks

# Trainer `optim` values that DeepSpeed's own "AdamW"/"Adam" optimizer stands in for.
ADAM_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw")


def read_deepspeed_config(ds: Any) -> dict | None:
    if isinstance(ds, dict):
        return ds
    if isinstance(ds, str) and Path(ds).is_file():
        try:
            return json.loads(Path(ds).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    return None


def deepspeed_problems(values: dict[str, Any]) -> list[str]:
    """Problems with the `deepspeed` config in combination with the train config."""
    ds_value = values.get("deepspeed")
    if not ds_value:
        return []
    where = f"key 'deepspeed' ({ds_value})" if isinstance(ds_value, str) else "key 'deepspeed'"
    ds = read_deepspeed_config(ds_value)
    if ds is None:
        if isinstance(ds_value, str) and Path(ds_value).is_file():
            return [f"{where}: not a valid JSON object"]
        return []  # a missing file is reported by the config's own check
    problems = []
    if "scheduler" in ds:
        problems.append(
            f"{where}: has a 'scheduler' block, which would replace lr_scheduler_type "
            f"{values.get('lr_scheduler_type', 'linear')!r}; remove it and set lr_scheduler_type / warmup_steps "
            "in the train config"
        )
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        optim = values.get("optim", DEFAULT_OPTIM)
        if str(opt.get("type", "")).lower() not in ("adam", "adamw") or optim not in ADAM_OPTIMS:
            problems.append(
                f"{where}: its optimizer {opt.get('type')!r} would replace optim {optim!r}; remove the "
                "'optimizer' block, or use an AdamW optim with an AdamW block"
            )
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage == 3 and values.get("train_mode") in FULL_WEIGHT_MODES and zero.get(GATHER_ON_SAVE) is not True:
        problems.append(
            f'{where}: ZeRO-3 full fine-tuning needs "{GATHER_ON_SAVE}": true; without it the saved '
            "model holds no weights (only DeepSpeed's sharded checkpoint, for zero_to_fp32.py)"
        )
    if stage == 3 and values.get("train_mode") == "qlora":
        problems.append(
            f"{where}: ZeRO-3 with train_mode 'qlora' is not supported: ZeRO-3 shards every weight, and the 4-bit "
            "weights are loaded as bitsandbytes Params4bit in uint8 storage, which it cannot shard; use ZeRO-2 "
            "(train_args/ds_z2_config.json) with qlora, or train_mode 'lora' with ZeRO-3"
        )
    if values.get("fp16") and not has_gpu():
        problems.append(
            "key 'fp16': DeepSpeed has no fp16 on the CPU ('Type fp16 is not supported on your device'); "
            "use bf16 or fp32 (fp16 false), or drop 'deepspeed'"
        )
    return problems
