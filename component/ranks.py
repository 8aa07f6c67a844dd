"""Which process this is: the one leaf fact every layer may ask.

torchrun and the deepspeed launcher set `RANK` for each process; a plain
`python train.py` has none and is rank 0.
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
