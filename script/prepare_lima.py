"""Write LIMA as our SFT JSONL (`data/train.jsonl` by default).

    python script/prepare_lima.py                       # GAIR/lima from the hub (gated: needs your HF token)
    python script/prepare_lima.py --input ../shared/data/lima/train.jsonl
    python script/prepare_lima.py --input lima_train.jsonl --output data/train.jsonl

A local input may be in GAIR's format (`"conversations"`: alternating
human/assistant strings) or already in ours (`"conversation"`: a list of
{"human", "assistant"}). Odd rows are repaired and reported, never fatal:
a pair with an empty reply ends the conversation before it (the turns after
it lose their context), and a trailing question with no reply is dropped.
LIMA's licence is non-commercial: the output is for your own use.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from component.cli import add_verbose_argument, run_main
from component.data.lima import DEFAULT_OUTPUT, prepare_lima


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_argument(parser)
    parser.add_argument("--input", help="local JSONL (GAIR or our format); default: the hub dataset")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--split", default="train", help="hub split (train or test)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: prepare_lima(args.input, args.output, args.split), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
