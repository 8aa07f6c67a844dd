"""Serve a trained model over an OpenAI-compatible HTTP API.

    python script/serve.py --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000]

Endpoints: `POST /v1/chat/completions` (plain JSON, or server-sent events with
`"stream": true`, ending with `data: [DONE]`), `GET /v1/models`, and
`GET /health` (counters). Any OpenAI client works against
`http://HOST:PORT/v1`; the API key is not checked.

- The run's saved chat template renders the messages (`--template` for a
  folder without training metadata). `max_tokens` (or `max_completion_tokens`),
  `temperature` (0 is greedy; default 1 as in OpenAI's API), `top_p` and `stop`
  are honoured; `usage` counts prompt and reply tokens.
- Bad requests get OpenAI-style JSON errors with a 4xx status, never a
  traceback: a body that is not JSON, missing or malformed fields, unknown
  roles, a conversation the template cannot render, a prompt that does not
  fit the context.
- One generation runs at a time; others wait their turn on a first-come lock
  (beyond --max_queue waiting requests: 429). A client that disconnects stops
  its generation, streaming or not.
- Binds to 127.0.0.1 unless told otherwise: there is no authentication.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from loguru import logger  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from component.errors import USER_ERROR_EXIT_CODE, UserError  # noqa: E402
from component.inference import LoadedModel, generate, load_for_inference  # noqa: E402
from component.logs import setup_logging  # noqa: E402
from component.template import Message, TemplateError, generation_prompt  # noqa: E402

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS = 512
FALLBACK_CONTEXT_LENGTH = 2048  # for models whose config states no maximum (e.g. ALiBi, recurrent)
CONTEXT_CONFIG_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP_STRINGS = 4
DEFAULT_MAX_QUEUE = 32  # requests waiting for the model beyond this get 429
# OpenAI's "developer" role is its newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
GenerateFn = Callable[..., Any]


# ---------------------------------------------------------------- request schema


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that we honour; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None)


# ---------------------------------------------------------------- the server


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


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


async def cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client goes away (its body is read: only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


async def complete(service: Service, p: Prepared, request: Request) -> dict:
    """A non-streaming completion, generated under the lock in a worker thread; a client
    that goes away meanwhile stops it."""
    cancel = threading.Event()
    async with service.turn():
        outcome = "failed"
        try:
            async with anyio.create_task_group() as watch:
                watch.start_soon(cancel_on_disconnect, request, cancel)
                reply = await anyio.to_thread.run_sync(lambda: "".join(service.pieces(p, cancel)))
                watch.cancel_scope.cancel()
            outcome = "cancelled" if cancel.is_set() else "completed"
        finally:
            cancel.set()
            service.stats[outcome] += 1
    usage, finish = service.usage(p, reply)
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": service.model_id,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage,
    }


_END = object()


def sse(data: Union[dict, str]) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream(service: Service, p: Prepared) -> AsyncIterator[str]:
    """Server-sent events for one completion. Closing this iterator early (the
    client went away) cancels the generation and waits for its thread to stop,
    so the lock is only released once the model is free."""
    cid, created = completion_id(), int(time.time())

    def chunk(delta: dict, finish: Optional[str] = None, **extra) -> str:
        return sse(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": service.model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra,
            }
        )

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def work():
        try:
            for piece in service.pieces(p, cancel):
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        except BaseException as exc:  # handed to the event loop, which reports it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    async with service.turn():
        outcome, parts = "cancelled", []
        worker = loop.run_in_executor(None, work)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    outcome = "failed"
                    logger.opt(exception=item).error("generation failed")
                    yield sse(
                        {"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}}
                    )
                    return
                parts.append(item)
                yield chunk({"content": item})
            usage, finish = service.usage(p, "".join(parts))
            include_usage = p.request.stream_options is not None and p.request.stream_options.include_usage
            yield chunk({}, finish, **({"usage": None} if include_usage else {}))
            if include_usage:
                yield sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": service.model_id,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield sse("[DONE]")
            outcome = "completed"
        finally:
            cancel.set()
            with anyio.CancelScope(shield=True):
                await worker
            service.stats[outcome] += 1
            if outcome == "cancelled":
                logger.info("client went away: generation stopped")


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its iterator, whatever ends the response
    (a disconnect seen by a failed send, or the task being cancelled), so the
    iterator's clean-up runs now rather than whenever it is garbage-collected."""

    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="finetune-toolkit OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return ApiError(
            exc.status_code,
            str(exc.detail),
            code=None if exc.status_code != 404 else "not_found",
            kind="invalid_request_error",
        ).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.opt(exception=exc).error(f"{request.method} {request.url.path} failed")
        return ApiError(500, "internal server error; see the server log", kind="server_error").response()

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": service.model_id, "object": "model", "created": 0, "owned_by": "local"}],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_id, **service.stats}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        prepared = service.prepare(await parse_request(request))
        service.admit()
        if prepared.request.stream:
            return EventStream(stream(service, prepared), headers={"Cache-Control": "no-cache"})
        return await complete(service, prepared, request)

    return app


async def parse_request(request: Request) -> ChatRequest:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(exc) from None


# ---------------------------------------------------------------- CLI


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


def build_service(args: argparse.Namespace) -> Service:
    loaded = load_for_inference(args.model, args.adapter, args.template, args.dtype, args.load_in_4bit)
    service = Service(
        loaded,
        args.model_id or model_id(args.model, args.adapter),
        context_length(loaded, args.context_length),
        max_queue=args.max_queue,
    )
    logger.info(
        f"serving {loaded.name} as {service.model_id!r}: template {loaded.template.name}, "
        f"context {service.context_length} tokens"
    )
    return service


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder, merged output, or a run's adapter folder")
    p.add_argument("--adapter", help="LoRA adapter folder to apply on --model")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--template", help="chat template; default: the one the run saved")
    p.add_argument("--model_id", help="name shown by /v1/models; default: the folder's name")
    p.add_argument("--context_length", type=int, help="default: the model config's maximum positions")
    p.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE, help="waiting requests before 429")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--load_in_4bit", action="store_true", help="load the base model in 4 bits (GPU)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    import uvicorn

    setup_logging()
    args = parse_args(argv)
    try:
        service = build_service(args)
    except UserError as exc:
        logger.error(str(exc))
        return USER_ERROR_EXIT_CODE
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
