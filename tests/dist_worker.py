"""Runs train.py's main once per config file, in one process: one torchrun launch, several runs.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py a.json b.json

Starting a rank costs seconds of imports on a small CPU; the distributed tests
share that cost between runs. Exits with the first non-zero status.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from component.distributed import shutdown  # noqa: E402

if __name__ == "__main__":
    status = 0
    for path in sys.argv[1:]:
        status = train.main(["--train_args_file", path])
        if status:
            break
    shutdown(status)  # a launched rank ends here
    sys.exit(status)
