"""Chatting in a terminal: one streamed reply, or an interactive session with a history.

Replies are written as they are generated and stop at the template's stop
token, which is never shown. Ctrl-C stops a reply (what was shown is kept in
the history); in a session, /reset clears the history and /exit (or Ctrl-D)
quits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, TextIO

from component.data.template import Message
from component.inference.generation import LoadedModel, ModelSource, generate

RESET_COMMAND = "/reset"
EXIT_COMMANDS = ("/exit", "/quit")
PROMPT = ">>> "
STOPPED_NOTE = " [stopped]"


@dataclass(frozen=True)
class ChatSettings:
    """How replies are generated, and the system prompt every conversation starts with."""

    system: Optional[str] = None
    """System prompt; None: none."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 is greedy decoding."""
    top_p: float = 1.0


def stream_reply(
    loaded: LoadedModel, messages: list[Message], settings: ChatSettings, out: Optional[TextIO] = None
) -> tuple[str, bool]:
    """Write the reply as it streams; returns (reply, whether Ctrl-C stopped it)."""
    out = out or sys.stdout
    pieces: list[str] = []
    stream = generate(
        loaded,
        messages,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
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


def system_messages(settings: ChatSettings) -> list[Message]:
    return [Message("system", settings.system)] if settings.system else []


def interactive(
    loaded: LoadedModel,
    settings: ChatSettings,
    read: Callable[[str], str] = input,
    out: Optional[TextIO] = None,
) -> None:
    out = out or sys.stdout
    out.write(
        f"chatting with {loaded.name} (template {loaded.template.name}); "
        f"{RESET_COMMAND} clears the history, {EXIT_COMMANDS[0]} or Ctrl-D quits, Ctrl-C stops a reply\n"
    )
    history = system_messages(settings)
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
            history = system_messages(settings)
            out.write("(history cleared)\n")
            continue
        history.append(Message("user", line))
        reply, _ = stream_reply(loaded, history, settings, out)
        history.append(Message("assistant", reply))


def chat(source: ModelSource, settings: ChatSettings, prompt: Optional[str] = None) -> None:
    """Load the model, then answer `prompt` once, or start an interactive session when it is None."""
    loaded = source.load()
    if prompt is not None:
        stream_reply(loaded, system_messages(settings) + [Message("user", prompt)], settings)
    else:
        interactive(loaded, settings)
