"""Evaluate a trained model on an SFT-format file: loss, perplexity, and replies.

    python script/evaluate.py --model DIR [--adapter DIR] --eval_file FILE.jsonl
        [--generate_to OUT.jsonl] [--batch_size 8] [--max_seq_length N] [--max_new_tokens 256]

Loss is the mean cross-entropy over the supervised tokens, tokenized, masked
and truncated as in training, with the run's saved template; perplexity is
exp(loss). With --generate_to, each conversation's last user message is
answered, one JSON line per conversation (a last turn without "assistant" is
a prompt only). GAIR's LIMA format is read too. Greedy unless --temperature.
The metrics are printed as JSON (and written to --output_json).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from component.cli import add_model_arguments, model_source, run_main
from component.inference import evaluation as ev


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--eval_file", required=True, help="SFT-format JSONL (last turn may omit 'assistant')")
    p.add_argument("--generate_to", help="write one JSON line per conversation: prompt and reply")
    p.add_argument("--batch_size", type=int, default=ev.DEFAULT_BATCH_SIZE)
    p.add_argument("--max_seq_length", type=int, help="default: the run's max_seq_length, else 1024")
    p.add_argument("--max_new_tokens", type=int, default=ev.DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--output_json", help="also write the metrics to this file")
    return p.parse_args(argv)


def settings(a: argparse.Namespace) -> ev.EvalSettings:
    return ev.EvalSettings(
        a.eval_file,
        a.generate_to,
        a.batch_size,
        a.max_seq_length,
        a.max_new_tokens,
        a.temperature,
        a.top_p,
        a.output_json,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: ev.evaluate_and_report(model_source(args), settings(args)), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
