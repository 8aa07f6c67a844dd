"""The HTTP routes: chat completions (JSON or server-sent events), models, health; and `serve`.

A client that disconnects stops its generation, streaming or not: the
generation runs in a worker thread that checks a `cancel` event between tokens.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Optional, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from loguru import logger
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from component.inference.generation import ModelSource
from component.inference.server.schema import ApiError, ChatRequest, validation_error
from component.inference.server.service import DEFAULT_MAX_QUEUE, Prepared, Service, build_service

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 4 * 1024 * 1024


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


def serve(
    source: ModelSource,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    name: Optional[str] = None,
    max_context: Optional[int] = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> None:
    """Load the model, then answer requests until stopped (Ctrl-C or SIGTERM)."""
    import uvicorn  # only here: the routes and their tests run without it

    service = build_service(source, name, max_context, max_queue)
    uvicorn.run(create_app(service), host=host, port=port, log_level="info")
