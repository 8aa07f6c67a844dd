"""Fine-tune a causal language model from a JSON config.

    python train.py --train_args_file train_args/<name>.json [--key value ...]

Flags after the file override its values. The same command runs under
`torchrun` and `deepspeed`. Everything happens in component/: parse and
check (component/config), then one run (component/runner.py).
"""

from __future__ import annotations

import sys

from component.cli import main_train as main
from component.training.distributed import shutdown

__all__ = ["main"]

if __name__ == "__main__":
    status = main()
    shutdown(status)  # a launched rank ends here
    sys.exit(status)
