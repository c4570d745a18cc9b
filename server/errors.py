"""OpenAI-style error objects ``{"error": {"message", "type", "param", "code"}}`` and the
handlers that turn every failure into one: bad input is a 4xx with a message, never a 500
or a stack trace.

| status | type | code |
|---|---|---|
| 400 | invalid_request_error | invalid_value, context_length_exceeded, kv_capacity |
| 401 | invalid_request_error | invalid_api_key |
| 404 | invalid_request_error | model_not_found, unknown_url |
| 405 | invalid_request_error | method_not_allowed |
| 413 | invalid_request_error | request_too_large |
| 429 | rate_limit_error | queue_full (with ``Retry-After``) |
| 503 | service_unavailable_error | shutting_down, not_ready |
| 500 | server_error | engine_error (the serving loop failed the request), internal_error (a bug,
logged with its traceback, never shown) |

``kv_capacity`` is a 400: the serving loop raises it only for a request that can never fit the
KV budget, whatever the load (a busy server queues instead).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from slabserve.scheduler.api import RequestError

log = logging.getLogger("slabserve.server")

INVALID = "invalid_request_error"


class APIError(Exception):
    """An error the client sees as an OpenAI error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, INVALID, param, code)


def from_engine(err: RequestError, retry_after_s: int) -> APIError:
    """Map a refusal of the serving loop to its status: queue_full 429, too_long/invalid 400,
    shutting_down 503, kv_capacity 400 (the request can never fit the KV budget)."""
    if err.kind == "queue_full":
        return APIError(429, err.message, "rate_limit_error", err.param, "queue_full",
                        {"Retry-After": str(retry_after_s)})
    if err.kind == "shutting_down":
        return APIError(503, err.message, "service_unavailable_error", None, "shutting_down")
    if err.kind == "too_long":
        return APIError(400, err.message, INVALID, err.param or "prompt",
                        "context_length_exceeded")
    if err.kind == "kv_capacity":
        return APIError(400, err.message, INVALID, err.param or "max_tokens", "kv_capacity")
    return APIError(400, err.message, INVALID, err.param, "invalid_value")


_UNION_TAGS = {"str", "int", "float", "bool", "none"}


# discriminated unions: the field, then the tag pydantic puts in the path
_TAGGED = {"response_format": {"text", "json_object", "json_schema"}}


def _clean_loc(loc: tuple) -> str | None:
    """Dotted field path without pydantic's ``body`` root and union-member tags."""
    parts = [str(p) for p in loc if p != "body"]
    parts = [p for i, p in enumerate(parts)
             if p not in _UNION_TAGS and "[" not in p and not p.startswith("function-")
             and not (i and p in _TAGGED.get(parts[i - 1], ()))]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    if any(e.get("type") == "json_invalid" for e in errors):
        return "request body is not valid JSON", None
    # a union reports one error per member: prefer one that is not a plain type mismatch
    first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")),
                 errors[0])
    param = _clean_loc(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    named = _NAMED.match(msg)
    if param is None and named:
        return msg, named.group(1)
    return (f"{param}: {msg}" if param else msg), param


_NAMED = re.compile(r"^([a-z_]+): ")
_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


def install(app: FastAPI, on_error: Callable[[int], None] = lambda status: None) -> None:
    """Register the handlers: APIError, pydantic validation (-> 400), Starlette HTTP errors
    (404/405 -> error objects) and anything else (-> 500 without details).  ``on_error``
    is told each status sent."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        on_error(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        on_error(400)
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"Unknown request URL: {request.method} {request.url.path}"
        else:
            msg = str(exc.detail)
        code = _HTTP_CODES.get(exc.status_code)
        on_error(exc.status_code)
        err = APIError(exc.status_code, msg, INVALID, None, code, dict(exc.headers or {}))
        return err.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        on_error(500)
        return APIError(500, "internal server error", "server_error", None,
                        "internal_error").response()
