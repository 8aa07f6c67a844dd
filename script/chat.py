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
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loguru import logger  # noqa: E402

from component.errors import USER_ERROR_EXIT_CODE, UserError  # noqa: E402
from component.inference import DTYPES, LoadedModel, generate, load_for_inference  # noqa: E402
from component.logs import setup_logging  # noqa: E402
from component.template import Message  # noqa: E402

RESET_COMMAND = "/reset"
EXIT_COMMANDS = ("/exit", "/quit")
PROMPT = ">>> "
STOPPED_NOTE = " [stopped]"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="Model folder (full or merged), hub id or .gguf; "
        "with --adapter, the base model. An adapter folder alone also works.",
    )
    p.add_argument("--adapter", help="LoRA/QLoRA adapter folder to apply to --model.")
    p.add_argument("--prompt", help="One-shot: print the reply to this message and exit.")
    p.add_argument("--system", help="System prompt.")
    p.add_argument("--template", help="Chat template name; default: the one recorded at training time.")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding.")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--load_in_4bit", action="store_true", help="Load the model in 4-bit NF4 (bitsandbytes).")
    return p.parse_args(argv)


def stream_reply(
    loaded: LoadedModel, messages: list[Message], args: argparse.Namespace, out: TextIO = sys.stdout
) -> tuple[str, bool]:
    """Write the reply as it streams; returns (reply, whether Ctrl-C stopped it)."""
    pieces: list[str] = []
    stream = generate(
        loaded, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )
    interrupted = False
    try:
        for piece in stream:
            out.write(piece)
            out.flush()
            pieces.append(piece)  # the reply kept in the history is what was shown
    except KeyboardInterrupt:
        interrupted = True
        out.write(STOPPED_NOTE)
    finally:
        stream.close()  # stops the generation thread, whichever way we got here
    out.write("\n")
    out.flush()
    return "".join(pieces), interrupted


def system_messages(args: argparse.Namespace) -> list[Message]:
    return [Message("system", args.system)] if args.system else []


def interactive(
    loaded: LoadedModel, args: argparse.Namespace, read: Callable[[str], str] = input, out: TextIO = sys.stdout
) -> None:
    out.write(
        f"chatting with {loaded.name} (template {loaded.template.name}); "
        f"{RESET_COMMAND} clears the history, {EXIT_COMMANDS[0]} or Ctrl-D quits, Ctrl-C stops a reply\n"
    )
    history = system_messages(args)
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        if line in EXIT_COMMANDS:
            return
        if line == RESET_COMMAND:
            history = system_messages(args)
            out.write("(history cleared)\n")
            continue
        history.append(Message("user", line))
        reply, _ = stream_reply(loaded, history, args, out)
        history.append(Message("assistant", reply))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        loaded = load_for_inference(args.model, args.adapter, args.template, args.dtype, args.load_in_4bit)
        if args.prompt is not None:
            stream_reply(loaded, system_messages(args) + [Message("user", args.prompt)], args)
        else:
            interactive(loaded, args)
    except UserError as exc:
        logger.error(str(exc))
        return USER_ERROR_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
