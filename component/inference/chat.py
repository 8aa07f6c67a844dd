"""Chatting in a terminal: one streamed reply, or an interactive session with a history.

Replies are written as they are generated and stop at the template's stop
token, which is never shown. Sampling settings left unset come from the
model's `generation_config` (greedy where it does not sample). Ctrl-C stops a
reply, and that exchange (the question and the partial reply) is left out of
the history; in a session, /reset clears the history and /exit (or Ctrl-D)
quits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Optional, TextIO

from transformers import GenerationConfig

from component.data.template import Message
from component.inference.generation import LoadedModel, ModelSource, generate

RESET_COMMAND = "/reset"
EXIT_COMMANDS = ("/exit", "/quit")
PROMPT = ">>> "
STOPPED_NOTE = " [stopped]"
NOT_KEPT_NOTE = "(stopped: this question and reply are not kept in the history)\n"
# transformers' own defaults, where neither a flag nor the model's generation_config sets a value.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
NO_REPETITION_PENALTY = 1.0


@dataclass(frozen=True)
class ChatSettings:
    """How replies are generated, and the system prompt every conversation starts with.

    The sampling fields left at None come from the model's generation_config (`resolve_sampling`)."""

    system: Optional[str] = None
    """System prompt; None: none."""
    max_new_tokens: int = 256
    temperature: Optional[float] = None
    """0 is greedy decoding; None: the model's generation_config (greedy unless it samples)."""
    top_p: Optional[float] = None
    """Nucleus sampling's probability mass; None: the model's generation_config, else 1."""
    repetition_penalty: Optional[float] = None
    """Above 1, tokens already in the conversation are less likely; None: the model's generation_config, else 1."""


def resolve_sampling(settings: ChatSettings, defaults: GenerationConfig) -> ChatSettings:
    """`settings` with every sampling field set: given, else the model's generation_config, else transformers'."""

    def pick(given: Optional[float], from_model: Optional[float], fallback: float) -> float:
        return given if given is not None else from_model if from_model is not None else fallback

    # A model that does not sample (do_sample unset or false) decodes greedily, whatever temperature it lists.
    model_temperature = (defaults.temperature or DEFAULT_TEMPERATURE) if defaults.do_sample else 0.0
    return replace(
        settings,
        temperature=pick(settings.temperature, model_temperature, 0.0),
        top_p=pick(settings.top_p, defaults.top_p, DEFAULT_TOP_P),
        repetition_penalty=pick(settings.repetition_penalty, defaults.repetition_penalty, NO_REPETITION_PENALTY),
    )


def describe_sampling(settings: ChatSettings) -> str:
    decoding = (
        "greedy" if not settings.temperature else f"temperature {settings.temperature:g}, top_p {settings.top_p:g}"
    )
    return f"{decoding}, repetition_penalty {settings.repetition_penalty:g}"


@contextmanager
def repetition_penalty_set(loaded: LoadedModel, penalty: Optional[float]) -> Iterator[None]:
    """The model's generation_config holds `penalty` for one reply.

    `generate` leaves repetition_penalty unset in the GenerationConfig it passes, and transformers fills unset
    values from the model's own generation_config, so this is where a chat's penalty reaches the model."""
    config = loaded.model.generation_config
    before = config.repetition_penalty
    config.repetition_penalty = penalty
    try:
        yield
    finally:
        config.repetition_penalty = before


def stream_reply(
    loaded: LoadedModel, messages: list[Message], settings: ChatSettings, out: Optional[TextIO] = None
) -> tuple[str, bool]:
    """Write the reply as it streams; returns (reply, whether Ctrl-C stopped it)."""
    out = out or sys.stdout
    settings = resolve_sampling(settings, loaded.model.generation_config)
    pieces: list[str] = []
    interrupted = False
    with repetition_penalty_set(loaded, settings.repetition_penalty):
        stream = generate(
            loaded,
            messages,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
        )
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
                pieces.append(piece)  # the reply returned is what was shown
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
    sampling = describe_sampling(resolve_sampling(settings, loaded.model.generation_config))
    out.write(
        f"chatting with {loaded.name} (template {loaded.template.name}; {sampling}); "
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
        reply, interrupted = stream_reply(loaded, history, settings, out)
        if interrupted:
            # The question goes too: turns must alternate, and a half reply is not what the model would say.
            history.pop()
            out.write(NOT_KEPT_NOTE)
        else:
            history.append(Message("assistant", reply))


def chat(source: ModelSource, settings: ChatSettings, prompt: Optional[str] = None) -> None:
    """Load the model, then answer `prompt` once, or start an interactive session when it is None."""
    loaded = source.load()
    if prompt is not None:
        stream_reply(loaded, system_messages(settings) + [Message("user", prompt)], settings)
    else:
        interactive(loaded, settings)
