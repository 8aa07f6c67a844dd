"""Runs train.py's main once per config file, in one process: one torchrun launch, several runs.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py a.json b.json

Starting a rank costs seconds of imports on a small CPU; the distributed tests
share that cost between runs. Exits with the first non-zero status.
"""

import sys

from component.cli import main_train
from component.training.distributed import shutdown

if __name__ == "__main__":
    status = 0
    for path in sys.argv[1:]:
        status = main_train(["--train_args_file", path])
        if status:
            break
    shutdown(status)  # a launched rank ends here
    sys.exit(status)
