"""Every failure becomes one JSON line `{"detail": "..."}` with the right status, never a traceback."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from index.vectors import VectorError
from service.engine import NotReady
from service.imaging import ImageRejected
from service.validation import SAFE_TEXT_PATTERN, SAFE_TEXT_RULE, InvalidValue

log = logging.getLogger("service.errors")
# ExecutionTimeout: the server cancelled a query at its maxTimeMS (busy, not down): also a 503.
DATABASE_DOWN = (
    ConnectionFailure,
    ServerSelectionTimeoutError,
    AutoReconnect,
    NetworkTimeout,
    ExecutionTimeout,
)


class BadRequest(ValueError):
    """A request the service understood but cannot serve (422 unless told otherwise)."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


_OBJECT_REPR = re.compile(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>")
_CLASS_REPR = re.compile(r"<class '(?:[\w.]*\.)?(\w+)'>")
_LOCATION_KINDS = ("body", "query", "path", "header", "cookie", "form")


def one_line(text: str) -> str:
    """A message fit for a client: one line, no Python object representations."""
    text = _OBJECT_REPR.sub("", _CLASS_REPR.sub(r"\1", text))
    return " ".join(text.split())


def validation_message(errors: Sequence[Mapping[str, Any]]) -> str:
    """'k: Input should be less than or equal to 1000; "file" is required' from pydantic's errors."""
    parts = []
    for error in errors:
        location = tuple(error.get("loc", ()))
        where = ".".join(str(p) for p in location if p not in _LOCATION_KINDS)
        kind = error.get("type")
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if kind == "missing":
            parts.append(f'"{where}" is required' if where else "a request body is required")
        elif kind in ("model_attributes_type", "dict_type") and not where:
            parts.append("the request body must be a JSON object")
        elif kind == "extra_forbidden":
            parameter = "query parameter" if location[:1] == ("query",) else "field"
            parts.append(f'unknown {parameter} "{where}"')
        elif kind == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == SAFE_TEXT_PATTERN:
            parts.append(f"{where}: {SAFE_TEXT_RULE}")
        elif kind == "json_invalid":
            parts.append(f"request body is not valid JSON: {error.get('ctx', {}).get('error', message)}")
        elif where and not message.startswith(f"{where}: "):
            parts.append(f"{where}: {message}")
        else:
            parts.append(message)
    return "; ".join(parts) or "invalid request"


def database_message(exc: Exception) -> str:
    if isinstance(exc, (ExecutionTimeout, TimeoutError)):
        return f"database too slow: a catalogue query timed out ({type(exc).__name__}); retry shortly"
    return f"database unreachable ({type(exc).__name__}); the service reconnects by itself, retry shortly"


def json_error(status_code: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one error body of the service: `{"detail": "<one line>"}`."""
    return JSONResponse({"detail": one_line(detail)}, status_code=status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return json_error(422, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
        if exc.status_code == 413 and detail == "Content Too Large" and limit is not None:
            detail = f"request body is over the limit of {limit} bytes"  # streamed past the limit
        return json_error(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(ImageRejected)
    async def _image(_: Request, exc: ImageRejected) -> JSONResponse:
        return json_error(exc.status_code, str(exc))

    @app.exception_handler(BadRequest)
    async def _bad(_: Request, exc: BadRequest) -> JSONResponse:
        return json_error(exc.status_code, str(exc))

    @app.exception_handler(InvalidValue)
    async def _invalid(_: Request, exc: InvalidValue) -> JSONResponse:
        return json_error(422, str(exc))

    @app.exception_handler(VectorError)
    async def _vector(_: Request, exc: VectorError) -> JSONResponse:
        return json_error(422, str(exc))

    @app.exception_handler(NotReady)
    async def _not_ready(_: Request, exc: NotReady) -> JSONResponse:
        return json_error(503, str(exc), {"Retry-After": "5"})

    for error_type in DATABASE_DOWN:

        @app.exception_handler(error_type)
        async def _database(_: Request, exc: Exception) -> JSONResponse:
            log.warning("database unreachable: %s", str(exc).split(", Timeout")[0])
            return json_error(503, database_message(exc), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return json_error(500, f"internal error ({type(exc).__name__}); see the service log")
