"""Every failure becomes one JSON line `{"detail": "..."}` with the right status, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymongo.errors import AutoReconnect, ConnectionFailure, NetworkTimeout, ServerSelectionTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.vectors import VectorError
from service.engine import NotReady
from service.imaging import ImageRejected
from service.validation import InvalidValue

log = logging.getLogger("service.errors")
DATABASE_DOWN = (ConnectionFailure, ServerSelectionTimeoutError, AutoReconnect, NetworkTimeout)


class BadRequest(ValueError):
    """A request the service understood but cannot serve (422 unless told otherwise)."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


def validation_message(exc: RequestValidationError) -> str:
    """'k: Input should be less than or equal to 1000; ...' from pydantic's error list."""
    parts = []
    for error in exc.errors():
        location = ".".join(
            str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "form")
        )
        parts.append(f"{location}: {error.get('msg')}" if location else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def database_message(exc: Exception) -> str:
    return f"database unreachable ({type(exc).__name__}); the service reconnects by itself, retry shortly"


def json_error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return json_error(422, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return json_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

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
