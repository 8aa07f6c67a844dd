"""The HTTP routes: chat completions (JSON or server-sent events), models, health; the API key, the body limit,
the access log; and `serve` (uvicorn).

Each request's reply is decoded in a thread of its own from the token ids the
scheduler hands its row (service.py), and passed to the event loop piece by
piece. A client that disconnects, streaming or not, cancels its row, which
stops within a token.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Optional, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from loguru import logger
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from component.errors import ConfigError, format_problems
from component.inference.generation import ModelSource
from component.inference.server.schema import ApiError, ChatRequest, validation_error
from component.inference.server.service import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, Row, Service, build_service

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
API_KEY_ENV = "FINETUNE_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # answered without the key, for load balancers' health checks


@dataclass(frozen=True)
class ServerSettings:
    """How the server listens, what it admits, and whom (script/serve.py's flags)."""

    host: str = DEFAULT_HOST
    """Address to bind; anything but loopback exposes the model to the network."""
    port: int = DEFAULT_PORT
    """Port to listen on."""
    model_id: Optional[str] = None
    """The name /v1/models shows and a request's `model` must match; None: the model folder's name."""
    context_length: Optional[int] = None
    """Prompt plus reply tokens at most; None: the model config's maximum positions."""
    max_batch: int = DEFAULT_MAX_BATCH
    """Requests generated together in one batch (1 for recurrent models)."""
    max_queue: int = DEFAULT_MAX_QUEUE
    """Requests that may wait for a batch; one more gets 429."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body; a larger one gets 413."""
    api_key: Optional[str] = None
    """Required of every request but /health as `Authorization: Bearer KEY`; None: anyone may call."""


def settings_problems(s: ServerSettings) -> list[str]:
    problems = []
    if not 0 < s.port < 65536:
        problems.append(f"--port {s.port}: use 1-65535")
    if s.max_batch < 1:
        problems.append(f"--max_batch {s.max_batch}: at least 1")
    if s.max_queue < 0:
        problems.append(f"--max_queue {s.max_queue}: 0 or more")
    if s.max_body_bytes < 1:
        problems.append(f"--max_body_bytes {s.max_body_bytes}: at least 1")
    if s.context_length is not None and s.context_length < 2:
        problems.append(f"--context_length {s.context_length}: at least 2")
    return problems


def api_key_from(flag: Optional[str]) -> Optional[str]:
    """The key given by flag, else by the FINETUNE_API_KEY environment variable; an empty one is none."""
    return flag or os.environ.get(API_KEY_ENV) or None


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """A warning when anyone on the network could use the model: bound beyond loopback without a key."""
    if api_key or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to any interface
    return (
        f"serving on {host} without an API key: anyone who can reach this port can use the model. "
        f"Set {API_KEY_ENV} (or --api_key) to require `Authorization: Bearer KEY`, or bind to 127.0.0.1."
    )


# ---------------------------------------------------------------- middleware: access log, API key


@dataclass
class Access:
    """What the access log says about one request; the chat route fills in the tokens and the outcome."""

    request_id: str
    started: float
    tokens_in: Optional[int] = None
    tokens_out: Optional[int] = None
    outcome: str = ""


class AccessLog:
    """One log line per request, once its response has ended (for a stream: after its last event). Gives each
    request an id, returned as the `x-request-id` header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        access = Access(f"req-{uuid.uuid4().hex}", time.monotonic())
        scope.setdefault("state", {})["access"] = access
        status = 500  # unless a response starts

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", access.request_id.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            tokens = "" if access.tokens_in is None else f" tokens in={access.tokens_in} out={access.tokens_out or 0}"
            logger.info(
                f"{access.request_id} {scope['method']} {scope['path']} {status}{tokens} "
                f"{time.monotonic() - access.started:.3f}s{' ' + access.outcome if access.outcome else ''}"
            )


class RequireKey:
    """401, as OpenAI words it, for a request without `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            problem = self.problem(Headers(scope=scope).get("authorization"))
            if problem:
                error = ApiError(401, problem, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def problem(self, header: Optional[str]) -> Optional[str]:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "You didn't provide an API key. Send it as an `Authorization: Bearer KEY` header."
        if not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
            return "Incorrect API key provided."
        return None


# ---------------------------------------------------------------- replies


async def pieces(service: Service, row: Row) -> AsyncIterator[str]:
    """The row's reply, piece by piece, decoded in a thread of its own (it blocks on the row's tokens).
    Closing this iterator early cancels the row."""
    loop = asyncio.get_running_loop()
    handed: asyncio.Queue = asyncio.Queue()
    end = object()

    def hand(item) -> None:
        try:
            loop.call_soon_threadsafe(handed.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is gone
            row.cancel.set()

    def decode() -> None:
        try:
            for piece in service.text(row):
                hand(piece)
        except BaseException as exc:  # raised again in the event loop
            hand(exc)
        finally:
            hand(end)

    threading.Thread(target=decode, name="reply", daemon=True).start()
    try:
        while (item := await handed.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        row.cancel.set()  # a no-op once the reply has ended


def completion_id(access: Access) -> str:
    return "chatcmpl-" + access.request_id.removeprefix("req-")


async def cancel_on_disconnect(request: Request, row: Row, left: threading.Event) -> None:
    """Cancel the row and set `left` when the client goes away (its body is read: only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    left.set()
    row.cancel.set()


def account(service: Service, access: Access, row: Row, reply: str, outcome: str) -> tuple[dict, str]:
    """Count the outcome, note the tokens for the access log; the usage and finish reason."""
    usage, finish = service.usage(row.prepared, reply)
    service.stats[outcome] += 1
    access.tokens_in, access.tokens_out, access.outcome = usage["prompt_tokens"], usage["completion_tokens"], outcome
    return usage, finish


async def complete(service: Service, row: Row, request: Request, access: Access) -> dict:
    """A non-streaming completion; a client that goes away meanwhile stops it."""
    parts: list[str] = []
    outcome, left = "failed", threading.Event()
    try:
        async with anyio.create_task_group() as watch:
            watch.start_soon(cancel_on_disconnect, request, row, left)
            async for piece in pieces(service, row):
                parts.append(piece)
            watch.cancel_scope.cancel()
        outcome = "cancelled" if left.is_set() else "completed"
    finally:
        usage, finish = account(service, access, row, "".join(parts), outcome)
    return {
        "id": completion_id(access),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": service.model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts)},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage,
    }


def sse(data: Union[dict, str]) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream(service: Service, row: Row, access: Access) -> AsyncIterator[str]:
    """Server-sent events for one completion. Closed early (the client went away), it cancels the row."""
    cid, created = completion_id(access), int(time.time())

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

    outcome, parts = "cancelled", []
    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for piece in pieces(service, row):
                parts.append(piece)
                yield chunk({"content": piece})
        except Exception as exc:
            outcome = "failed"
            logger.opt(exception=exc).error(f"{access.request_id}: generation failed")
            yield sse({"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}})
            return
        usage, finish = service.usage(row.prepared, "".join(parts))
        include_usage = (
            row.prepared.request.stream_options is not None and row.prepared.request.stream_options.include_usage
        )
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
        row.cancel.set()
        account(service, access, row, "".join(parts), outcome)


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its iterator, whatever ends the response (a disconnect seen by
    a failed send, or the task being cancelled), and calls `on_close`: a stream that never started has no
    clean-up of its own to run."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self.on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


# ---------------------------------------------------------------- the app


def create_app(
    service: Service, api_key: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    app = FastAPI(title="finetune-toolkit OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.service = service
    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)
    app.add_middleware(AccessLog)  # added last: outermost, so it logs the 401s too

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

    def model_card() -> dict:
        return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "local"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != service.model_id:
            raise ApiError(
                404,
                f"The model `{name}` does not exist; this server serves `{service.model_id}`.",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_id, **service.counters()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        access: Access = request.state.access
        row = service.submit(service.prepare(await parse_request(request, max_body_bytes)))
        if row.prepared.request.stream:
            return EventStream(
                stream(service, row, access), on_close=row.cancel.set, headers={"Cache-Control": "no-cache"}
            )
        return await complete(service, row, request, access)

    return app


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit`: never read beyond it."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise body_too_large(limit)
    return bytes(body)


async def parse_request(request: Request, max_body_bytes: int) -> ChatRequest:
    body = await read_body(request, max_body_bytes)
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


def serve(source: ModelSource, settings: ServerSettings) -> None:
    """Check the settings, load the model, then answer requests until stopped (Ctrl-C or SIGTERM)."""
    import uvicorn  # only here: the routes and their tests run without it

    problems = settings_problems(settings)
    if problems:
        raise ConfigError(format_problems("serve.py: invalid flags", problems))
    warning = exposure_warning(settings.host, settings.api_key)
    if warning:
        logger.warning(warning)
    service = build_service(source, settings.model_id, settings.context_length, settings.max_batch, settings.max_queue)
    if settings.api_key:
        logger.info("requests must carry `Authorization: Bearer KEY` (all but /health)")
    try:
        app = create_app(service, settings.api_key, settings.max_body_bytes)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    finally:
        service.close()
