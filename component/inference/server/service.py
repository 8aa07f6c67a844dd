"""The served model: request checks, token limits, usage counts, and one generation at a time.

`Service.prepare` turns a validated request into messages the template can
render, within the model's context; `Service.turn` hands the model to one
request at a time, first come first served (beyond `max_queue` waiting
requests: 429).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from loguru import logger

from component.data.template import Message, TemplateError, generation_prompt
from component.inference.generation import LoadedModel, ModelSource, generate
from component.inference.server.schema import ApiError, ChatRequest

DEFAULT_MAX_TOKENS = 512
FALLBACK_CONTEXT_LENGTH = 2048  # for models whose config states no maximum (e.g. ALiBi, recurrent)
CONTEXT_CONFIG_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
MAX_STOP_STRINGS = 4
DEFAULT_MAX_QUEUE = 32  # requests waiting for the model beyond this get 429
# OpenAI's "developer" role is its newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
GenerateFn = Callable[..., Any]


@dataclass
class Prepared:
    """A validated request: messages, limits, and the prompt's token count."""

    request: ChatRequest
    messages: list[Message]
    prompt_tokens: int
    max_tokens: int


@dataclass
class Service:
    """One model, its limits, the generation lock and some counters."""

    loaded: LoadedModel
    model_id: str
    context_length: int
    generate_fn: GenerateFn = generate
    max_queue: int = DEFAULT_MAX_QUEUE
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stats: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("requests", "completed", "cancelled", "failed", "active", "max_active", "waiting"), 0
        )
    )

    def admit(self) -> None:
        """Count a request in, or refuse it when too many already wait for the model."""
        if self.stats["waiting"] >= self.max_queue:
            raise ApiError(
                429,
                f"the server is busy: {self.stats['waiting']} requests are waiting; retry later",
                kind="server_busy",
                code="server_busy",
            )
        self.stats["requests"] += 1

    def prepare(self, req: ChatRequest) -> Prepared:
        messages = []
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise ApiError(
                    400,
                    f"messages[{i}].role: {m.role!r} is not supported; use one of {', '.join(ROLES)}",
                    param=f"messages[{i}].role",
                )
            messages.append(Message(ROLES[m.role], m.text()))
        if messages[-1].role != "user":
            raise ApiError(400, "the last message must come from the user", param="messages")
        tok = self.loaded.tokenizer
        try:
            prompt = generation_prompt(self.loaded.template, tok, messages)
        except TemplateError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from None
        prompt_tokens = len(tok(prompt, add_special_tokens=False)["input_ids"])
        room = self.context_length - prompt_tokens
        asked = req.max_completion_tokens or req.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(
                400,
                f"this model's context is {self.context_length} tokens; the prompt has "
                f"{prompt_tokens} and {asked or 1} more were asked for. Shorten the messages "
                "or lower max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        if len(req.stop_list()) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return Prepared(req, messages, prompt_tokens, asked or min(DEFAULT_MAX_TOKENS, room))

    def pieces(self, p: Prepared, cancel: threading.Event):
        return self.generate_fn(
            self.loaded,
            p.messages,
            max_new_tokens=p.max_tokens,
            temperature=p.request.temperature,
            top_p=p.request.top_p,
            stop=p.request.stop_list(),
            cancel=cancel,
        )

    def usage(self, p: Prepared, reply: str) -> tuple[dict[str, int], str]:
        """Token counts (the reply re-tokenized) and the finish reason."""
        completion = len(self.loaded.tokenizer(reply, add_special_tokens=False)["input_ids"]) if reply else 0
        finish = "length" if completion >= p.max_tokens else "stop"
        usage = {
            "prompt_tokens": p.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": p.prompt_tokens + completion,
        }
        return usage, finish

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for the model (first come, first served), then hold it."""
        self.stats["waiting"] += 1
        try:
            await self.lock.acquire()
        finally:
            self.stats["waiting"] -= 1
        self.stats["active"] += 1
        self.stats["max_active"] = max(self.stats["max_active"], self.stats["active"])
        try:
            yield
        finally:
            self.stats["active"] -= 1
            self.lock.release()


def context_length(loaded: LoadedModel, override: Optional[int]) -> int:
    if override:
        return override
    config = loaded.model.config
    for key in CONTEXT_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_CONTEXT_LENGTH


def model_id(model: Optional[str], adapter: Optional[str]) -> str:
    return Path(adapter or model or "model").name.removesuffix(".gguf")


def build_service(
    source: ModelSource,
    name: Optional[str] = None,
    max_context: Optional[int] = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> Service:
    """Load the model; `name` (shown by /v1/models) defaults to its folder's, `max_context` to its config's."""
    loaded = source.load()
    service = Service(
        loaded,
        name or model_id(source.model, source.adapter),
        context_length(loaded, max_context),
        max_queue=max_queue,
    )
    logger.info(
        f"serving {loaded.name} as {service.model_id!r}: template {loaded.template.name}, "
        f"context {service.context_length} tokens"
    )
    return service
