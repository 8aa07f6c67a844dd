"""Runs train.py's main once per config file, in one process: one torchrun launch, several runs.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py a.json b.json

Starting a rank costs seconds of imports on a small CPU; the distributed tests
share that cost between runs. Exits with the first non-zero status.

Two switches for tests/test_fsdp.py, read from the environment:
- DIST_WORKER_SHARDING=1: after step 1, rank 0 writes `sharding.json` in the run's output_dir: the
  model's class, the batches' collator, every parameter's type with its local and full sizes, and
  whether any DDP wrapper exists in the process (found by the garbage collector, wherever it is held);
- DIST_WORKER_KILL=RANK:STEP: that rank SIGKILLs itself as step STEP begins (kill -9 of one rank).
"""

import gc
import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from component.cli import main_train
from component.training.distributed import shutdown

SHARDING_FILE = "sharding.json"


def sharding_report(model, collator) -> dict:
    import torch
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    params = {}
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        params[name] = {"type": type(p).__name__, "local": local.numel(), "full": p.numel()}
    return {
        "model": type(model).__name__,
        "collator": type(collator).__name__,
        "world_size": torch.distributed.get_world_size(),
        "ddp": any(isinstance(o, DistributedDataParallel) for o in gc.get_objects()),
        "params": params,
    }


class ShardingProbe(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if state.global_step == 1 and state.is_world_process_zero:
            report = sharding_report(model, train_dataloader.collate_fn)
            Path(args.output_dir, SHARDING_FILE).write_text(json.dumps(report, indent=1))


class KillRank(TrainerCallback):
    def __init__(self, spec: str):
        rank, step = spec.split(":")
        self.rank, self.step = int(rank), int(step)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and args.process_index == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def injected_callbacks() -> list[TrainerCallback]:
    callbacks: list[TrainerCallback] = []
    if os.environ.get("DIST_WORKER_SHARDING") == "1":
        callbacks.append(ShardingProbe())
    if os.environ.get("DIST_WORKER_KILL"):
        callbacks.append(KillRank(os.environ["DIST_WORKER_KILL"]))
    return callbacks


if __name__ == "__main__":
    status = 0
    for path in sys.argv[1:]:
        status = main_train(["--train_args_file", path], callbacks=injected_callbacks())
        if status:
            break
    shutdown(status)  # a launched rank ends here
    sys.exit(status)
