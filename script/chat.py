"""Chat with a trained model: a merged/full model, or a base model plus an adapter.

    python script/chat.py --model output/run-merged                      # interactive
    python script/chat.py --model BASE --adapter output/run --prompt "Hi"  # one reply, then exit

The chat template is the one recorded at training time (training_meta.json);
--template overrides it. Replies stream as they are generated and stop at the
template's stop token, which is never printed. Sampling flags left out take
the model's generation_config (greedy where it does not sample). In
interactive mode, /reset clears the history and /exit (or Ctrl-D) quits;
Ctrl-C stops a reply, which is then left out of the history.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from component.cli import add_model_arguments, model_source, run_main
from component.inference.chat import ChatSettings, chat

FROM_MODEL = "default: the model's generation_config"
# The sampling flags' valid values: flag -> (test, what the value must be).
SAMPLING_RANGES = {
    "temperature": (lambda v: v >= 0, "0 or more"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "above 0"),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--prompt", help="One-shot: print the reply to this message and exit.")
    p.add_argument("--system", help="System prompt.")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help=f"0 is greedy decoding; {FROM_MODEL} (greedy unless it samples).")
    p.add_argument("--top_p", type=float, help=f"Nucleus sampling's probability mass, in (0, 1]; {FROM_MODEL}, else 1.")
    p.add_argument(
        "--repetition_penalty",
        type=float,
        help=f"Above 1, tokens already in the conversation are less likely (1.1-1.3 is usual); {FROM_MODEL}, else 1.",
    )
    args = p.parse_args(argv)
    problems = [
        f"--{name} must be {what}, not {getattr(args, name)}"
        for name, (ok, what) in SAMPLING_RANGES.items()
        if getattr(args, name) is not None and not ok(getattr(args, name))
    ]
    if problems:
        p.error("; ".join(problems))
    return args


def settings(args: argparse.Namespace) -> ChatSettings:
    return ChatSettings(
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: chat(model_source(args), settings(args), args.prompt), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
