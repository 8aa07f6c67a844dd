"""The served model: request checks, token limits, usage counts, and the batching scheduler.

`Service.prepare` turns a validated request into messages the template can
render, within the model's context. `Service.submit` queues it for the
`Scheduler`, whose one worker thread runs waiting requests together through
transformers' `generate`, in left-padded batches of up to `max_batch` rows.

This is batching in waves, not continuous batching: a batch runs until its
last row ends, and a request that arrives meanwhile waits for the next batch
(beyond `max_queue` waiting requests: 429). `generate` cannot take new rows
mid-flight, and splicing a new row into a running batch's KV cache would mean
editing cache internals that differ by model type. Within a batch each row
keeps its own temperature and top_p (`RowSampling`), token limit and stop
strings, and a row stops within a token once its reply ends or its client
leaves (`RowsEnded`), though the batch's other rows go on.

Rows of one batch are padded on the left, so a row's logits can differ in
their last bits from the same request's alone (a near-tie could then flip a
greedy token); a lone greedy request gets exactly `generation.generate`'s reply.
`_stream_text` and `_generation_config` are borrowed from generation.py so that
stop strings, split characters and the generation settings stay as `chat` has them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from loguru import logger
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from component.data.template import Message, TemplateError, generation_prompt, stop_token_ids
from component.inference.generation import LoadedModel, ModelSource, _generation_config, _stream_text
from component.inference.server.schema import ApiError, ChatRequest
from component.model.model_types import model_type_info

DEFAULT_MAX_TOKENS = 512
FALLBACK_CONTEXT_LENGTH = 2048  # for models whose config states no maximum (e.g. ALiBi, recurrent)
CONTEXT_CONFIG_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
MAX_STOP_STRINGS = 4
DEFAULT_MAX_BATCH = 8  # rows generated together
DEFAULT_MAX_QUEUE = 32  # requests waiting for a batch beyond this get 429
END = None  # on a row's token queue: no more tokens (what generation._stream_text stops at)
# OpenAI's "developer" role is its newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Prepared:
    """A validated request: messages, limits, and the prompt's tokens."""

    request: ChatRequest
    messages: list[Message]
    prompt_ids: list[int]
    max_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(eq=False)
class Row:
    """One admitted request: its prompt and limits, and the queue its new token ids arrive on (END last)."""

    prepared: Prepared
    tokens: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    """Set by the text stream once the reply has ended (stop token, stop string or limit)."""
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set when the client goes away, or the server stops."""
    failure: Optional[BaseException] = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.prepared.prompt_ids

    @property
    def max_tokens(self) -> int:
        return self.prepared.max_tokens

    def stopped(self) -> bool:
        return self.done.is_set() or self.cancel.is_set()


BatchFn = Callable[[LoadedModel, list[Row]], None]
"""Generates for rows together: puts each row's new token ids on `row.tokens` and stops a row once `row.stopped()`."""


# ---------------------------------------------------------------- one batch through transformers' generate


class RowSampling(LogitsProcessor):
    """Each row's own temperature and top_p, as transformers' temperature and top-p warpers apply them to one
    row; a row with temperature 0 keeps only its most likely token, so sampling picks it (greedy)."""

    def __init__(self, temperatures: list[float], top_ps: list[float]):
        self.temperature = torch.tensor(temperatures, dtype=torch.float32)[:, None]
        self.top_p = torch.tensor(top_ps, dtype=torch.float32)[:, None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        temperature, top_p = self.temperature.to(scores.device), self.top_p.to(scores.device)
        greedy = temperature == 0
        scores = scores / torch.where(greedy, torch.ones_like(temperature), temperature)
        sorted_scores, order = torch.sort(scores, descending=False)
        drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False  # keep at least one token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        not_top = torch.ones_like(drop).scatter(1, scores.argmax(dim=-1, keepdim=True), False)
        return scores.masked_fill(torch.where(greedy, not_top, drop), -float("inf"))


class RowsEnded(StoppingCriteria):
    """A row ends at its own token limit, or once its reply has ended or its client has left."""

    def __init__(self, rows: list[Row], prompt_width: int):
        self.rows, self.prompt_width = rows, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.prompt_width
        ended = [made >= row.max_tokens or row.stopped() for row in self.rows]
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


class RowStreamer(BaseStreamer):
    """Hands each row its new tokens, then END after a stop token or its own limit; a finished row's padding
    is never passed on."""

    def __init__(self, rows: list[Row], stop_ids: set[int]):
        self.rows, self.stop_ids = rows, stop_ids
        self.made = [0] * len(rows)
        self.open = [True] * len(rows)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if not self.open[i]:
                continue
            row = self.rows[i]
            row.tokens.put(token)
            self.made[i] += 1
            if token in self.stop_ids or self.made[i] >= row.max_tokens or row.stopped():
                self.open[i] = False
                row.tokens.put(END)

    def end(self) -> None:
        for i, row in enumerate(self.rows):
            if self.open[i]:
                self.open[i] = False
                row.tokens.put(END)


def left_padded(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' prompts as one batch, padded on the left, and its attention mask."""
    width = max(len(r.prompt_ids) for r in rows)
    ids = [[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows]
    mask = [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


def generate_batch(loaded: LoadedModel, rows: list[Row]) -> None:
    """Generate for `rows` together, each row's tokens handed to it as they come (a BatchFn)."""
    stop_ids = stop_token_ids(loaded.template, loaded.tokenizer)
    sample = any(r.prepared.request.temperature > 0 for r in rows)
    # Temperature 1 and top_p 1 add no warper of transformers' own: RowSampling applies each row's.
    config = _generation_config(loaded, max(r.max_tokens for r in rows), 1.0 if sample else 0.0, 1.0, stop_ids)
    input_ids, mask = left_padded(rows, config.pad_token_id)
    device = next(loaded.model.parameters()).device
    sampling = RowSampling([r.prepared.request.temperature for r in rows], [r.prepared.request.top_p for r in rows])
    with torch.inference_mode():
        loaded.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([sampling] if sample else []),
            stopping_criteria=StoppingCriteriaList([RowsEnded(rows, input_ids.shape[1])]),
            streamer=RowStreamer(rows, set(stop_ids)),
        )


# ---------------------------------------------------------------- the scheduler


class QueueFull(Exception):
    """No room for another request: `max_queue` already wait."""


class Scheduler:
    """One worker thread: takes up to `max_batch` waiting rows, generates them together, repeats.

    A request is admitted while fewer than `max_queue` wait, plus `max_batch` when no batch runs (those
    start at once). A row whose client left while it waited is dropped without running.
    """

    def __init__(self, loaded: LoadedModel, batch_fn: BatchFn, max_batch: int, max_queue: int):
        self.loaded, self.batch_fn, self.max_batch, self.max_queue = loaded, batch_fn, max_batch, max_queue
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.counts = dict.fromkeys(("batches", "max_running"), 0)
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="batches", daemon=True)
        self._thread.start()

    def submit(self, row: Row) -> None:
        with self._cond:
            room = self.max_queue + (0 if self.running else self.max_batch)
            if self.closed or len(self.waiting) >= room:
                raise QueueFull
            self.waiting.append(row)
            self._cond.notify()

    def close(self) -> None:
        """Stop the worker: waiting rows end unanswered, running rows stop at their next token."""
        with self._cond:
            self.closed = True
            for row in [*self.waiting, *self.running]:
                row.cancel.set()
            self._cond.notify()
        self._thread.join(timeout=60)

    def _take(self) -> list[Row]:
        """The next batch, waiting for one if need be; empty once closed."""
        with self._cond:
            while not self.closed:
                rows = []
                while self.waiting and len(rows) < self.max_batch:
                    row = self.waiting.popleft()
                    if not row.stopped():  # else its client left while it waited
                        rows.append(row)
                if rows:
                    self.running = rows
                    self.counts["batches"] += 1
                    self.counts["max_running"] = max(self.counts["max_running"], len(rows))
                    return rows
                self._cond.wait()
            return []

    def _work(self) -> None:
        while rows := self._take():
            try:
                self.batch_fn(self.loaded, rows)
            except Exception as exc:  # each row's request answers it; the worker goes on
                logger.opt(exception=exc).error(f"a batch of {len(rows)} failed")
                for row in rows:
                    row.failure = exc
            finally:
                for row in rows:
                    row.tokens.put(END)
                with self._cond:
                    self.running = []


# ---------------------------------------------------------------- the service


@dataclass
class Service:
    """One model, its limits and scheduler, and counters for /health."""

    loaded: LoadedModel
    model_id: str
    context_length: int
    batch_fn: BatchFn = generate_batch
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    created: int = field(default_factory=lambda: int(time.time()))
    """When the model was loaded (Unix seconds), as /v1/models reports it."""
    stats: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("requests", "completed", "cancelled", "failed", "rejected"), 0)
    )
    scheduler: Scheduler = field(init=False)

    def __post_init__(self):
        tok = self.loaded.tokenizer
        self.stop_ids = set(stop_token_ids(self.loaded.template, tok))
        self.stop_text = self.loaded.template.stop_text(tok)
        if model_type_info(self.loaded.model.config.model_type).recurrent:
            self.max_batch = 1  # padding would flow through a recurrent state
        self.scheduler = Scheduler(self.loaded, self.batch_fn, self.max_batch, self.max_queue)

    def counters(self) -> dict[str, int]:
        s = self.scheduler
        return {**self.stats, "waiting": len(s.waiting), "running": len(s.running), **s.counts}

    def prepare(self, req: ChatRequest) -> Prepared:
        """Check the request against this model and its context; 4xx errors as OpenAI words them."""
        if req.model is not None and req.model != self.model_id:
            raise ApiError(
                404,
                f"The model `{req.model}` does not exist; this server serves `{self.model_id}`.",
                param="model",
                code="model_not_found",
            )
        for param, what in req.unsupported():
            raise ApiError(
                400,
                f"{what} is not supported by this server yet; send the request without `{param}`.",
                param=param,
                code="unsupported_parameter",
            )
        messages = self.messages(req)
        tok = self.loaded.tokenizer
        try:
            prompt = generation_prompt(self.loaded.template, tok, messages)
        except TemplateError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from None
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        room = self.context_length - len(prompt_ids)
        asked = req.max_completion_tokens or req.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(
                400,
                f"this model's context is {self.context_length} tokens; the prompt has "
                f"{len(prompt_ids)} and {asked or 1} more were asked for. Shorten the messages "
                "or lower max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        if len(req.stop_list()) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return Prepared(req, messages, prompt_ids, asked or min(DEFAULT_MAX_TOKENS, room))

    @staticmethod
    def messages(req: ChatRequest) -> list[Message]:
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
        return messages

    def submit(self, p: Prepared) -> Row:
        """Queue the request for a batch, or refuse it (429) when `max_queue` already wait."""
        row = Row(p)
        try:
            self.scheduler.submit(row)
        except QueueFull:
            self.stats["rejected"] += 1
            raise ApiError(
                429,
                f"the server is busy: {len(self.scheduler.waiting)} requests are waiting; retry later",
                kind="server_busy",
                code="server_busy",
            ) from None
        self.stats["requests"] += 1
        return row

    def text(self, row: Row) -> Iterator[str]:
        """The row's reply as text pieces, cut at the template's stop text and the request's stop strings.
        Blocks on the row's tokens: run it in a thread."""
        stops = [s for s in [*row.prepared.request.stop_list(), self.stop_text] if s]
        yield from _stream_text(self.loaded.tokenizer, row.tokens, self.stop_ids, stops, row.done, row.cancel)
        if row.failure is not None:
            raise row.failure

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

    def close(self) -> None:
        self.scheduler.close()


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
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> Service:
    """Load the model; `name` (shown by /v1/models) defaults to its folder's, `max_context` to its config's."""
    loaded = source.load()
    service = Service(
        loaded,
        name or model_id(source.model, source.adapter),
        context_length(loaded, max_context),
        max_batch=max_batch,
        max_queue=max_queue,
    )
    logger.info(
        f"serving {loaded.name} as {service.model_id!r}: template {loaded.template.name}, "
        f"context {service.context_length} tokens, batches of up to {service.max_batch}, "
        f"{service.max_queue} more may wait"
    )
    return service
