"""See what training sees: SFT examples with the supervised text marked (and, per message, the tokens
learned of each reasoning, reply and tool-call part), DPO pairs (prompt, chosen and rejected), or
pretraining blocks (a ¶ where a document starts), then the data report.

    python script/inspect_data.py --train_args_file train_args/smollm2-135m-sft-lora.json [--index N] [--num 3]
                                  [--dump OUT.jsonl] [--color auto|always|never] [--key value ...]

Loads only the tokenizer (never the model) and the same template, tokenization and truncation as
train.py. Supervised text (each assistant reply and its end-of-turn token) is shown in green in a
terminal, or between [[ and ]] otherwise; where an example is cut at max_seq_length, a ✂ marks the
cut and the text after it is left out. The report gives examples, tokens, supervised tokens,
truncated and dropped examples, and a length histogram. `--dump` writes one JSON line per training example: {"input_ids", "labels"}.
Flags after the file override its values, as in train.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional, TextIO

from component.cli import add_verbose_argument, inspect_data, run_main
from component.data.inspection import COLOR_CHOICES, InspectOptions


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the rest: config keys that override the file's."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_argument(p)
    p.add_argument("--train_args_file", required=True, help="The training config (JSON), as for train.py.")
    p.add_argument("--index", type=int, default=0, help="First example to show (0-based line of valid examples).")
    p.add_argument("--num", type=int, default=3, help="How many examples to show.")
    p.add_argument("--dump", help="Write input_ids and labels of every training example to this JSONL file.")
    p.add_argument("--color", choices=COLOR_CHOICES, default="auto")
    return p.parse_known_args(argv)


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    args, overrides = parse_args(argv)
    options = InspectOptions(args.index, args.num, args.dump, args.color)
    return run_main(lambda: inspect_data(args.train_args_file, overrides, options, out), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
