"""The HTTP API's request schema and its errors, as OpenAI's chat completion API has them.

`ChatRequest` holds the request fields we honour. Fields that would change
what the reply must be, and that we cannot honour (`tools`, `functions`, a
`response_format` other than text, `logprobs`), are refused rather than
ignored; other unknown fields are ignored. `ApiError` is answered as OpenAI
answers errors: {"error": {message, type, param, code}} with a 4xx status,
never a traceback.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError


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
    """The fields of OpenAI's chat completion request that we honour, and those we refuse; others are ignored."""

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
    # Read only to refuse them (`unsupported`): a client that sends them expects a different reply.
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None
    logprobs: Optional[bool] = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, what it asks for) for each field this request sets that the server cannot honour."""
        asked = [
            ("tools", "tool calling", bool(self.tools)),
            ("functions", "function calling", bool(self.functions)),
            (
                "response_format",
                "a response_format other than text",
                (self.response_format or {}).get("type", "text") != "text",
            ),
            ("logprobs", "logprobs", bool(self.logprobs)),
        ]
        return [(param, what) for param, what, is_set in asked if is_set]

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
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None)
