"""Fine-tune a causal language model from a JSON config.

    python train.py --train_args_file train_args/<name>.json [--key value ...]

Flags after the file override its values. The same command runs under
`torchrun` and `deepspeed`.
"""

from __future__ import annotations

import sys

from component.cli import main_train
from component.training.distributed import shutdown

if __name__ == "__main__":
    status = main_train()
    shutdown(status)  # a launched rank ends here
    sys.exit(status)
