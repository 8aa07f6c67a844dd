"""Fine-tune a causal language model from a JSON config.

    python train.py --train_args_file train_args/<name>.json [--key value ...]

Flags after the file override its values. The same command runs under
`torchrun` and `deepspeed`.
"""

from __future__ import annotations

import sys

from loguru import logger

from component.config import HELP_FLAGS, describe_keys, load_config
from component.distributed import shutdown
from component.errors import USER_ERROR_EXIT_CODE, UserError
from component.logs import setup_logging
from component.runner import run


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if any(flag in argv for flag in HELP_FLAGS):
        print(describe_keys())
        return 0
    try:
        config = load_config(argv)
        run(config)
    except UserError as exc:
        logger.error(str(exc))
        return getattr(exc, "exit_code", USER_ERROR_EXIT_CODE)  # a signal: 128 + its number
    return 0


if __name__ == "__main__":
    status = main()
    shutdown(status)  # a launched rank ends here
    sys.exit(status)
