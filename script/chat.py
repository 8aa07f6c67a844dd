"""Chat with a trained model: a merged/full model, or a base model plus an adapter.

    python script/chat.py --model output/run-merged                      # interactive
    python script/chat.py --model BASE --adapter output/run --prompt "Hi"  # one reply, then exit

The chat template is the one recorded at training time (training_meta.json);
--template overrides it. Replies stream as they are generated and stop at the
template's stop token, which is never printed. In interactive mode, /reset
clears the history and /exit (or Ctrl-D) quits; Ctrl-C stops a reply.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from component.cli import add_model_arguments, model_source, run_main
from component.inference.chat import ChatSettings, chat


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--prompt", help="One-shot: print the reply to this message and exit.")
    p.add_argument("--system", help="System prompt.")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding.")
    p.add_argument("--top_p", type=float, default=1.0)
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> ChatSettings:
    return ChatSettings(args.system, args.max_new_tokens, args.temperature, args.top_p)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: chat(model_source(args), settings(args), args.prompt))


if __name__ == "__main__":
    sys.exit(main())
