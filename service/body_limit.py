"""Request bodies over the limits are refused before they are read whole.

A Content-Length over the limit answers 413 at once, without reading a byte; a body without one
(chunked) or with a false one is counted as it streams in and cut off at the limit (413), so a
multipart upload is never spooled past it. The limit depends on the operation: `POST /images`
takes up to MAX_REQUEST_BYTES (or MAX_FILES_PER_REQUEST full files, if less), every other request
one file's worth (MAX_UPLOAD_BYTES) plus room for the form fields or a JSON body.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import json_error
from service.settings import Settings

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
ENVELOPE_BYTES = 1024 * 1024  # multipart headers and form fields, or a JSON body (a 65536-d vector fits)


def request_body_limit(settings: Settings, method: str, path: str) -> int:
    if method == "POST" and path.rstrip("/") == "/images":
        most_files = settings.MAX_FILES_PER_REQUEST * settings.MAX_UPLOAD_BYTES + ENVELOPE_BYTES
        return min(settings.MAX_REQUEST_BYTES, most_files)
    return settings.MAX_UPLOAD_BYTES + ENVELOPE_BYTES


class BodySizeLimit:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for  # (method, path) -> bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)  # no operation reads a body: none is limited
            return
        limit = self.limit_for(scope["method"], scope["path"])
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = json_error(413, f"request body of {int(length)} bytes is over the limit of {limit}")
            await response(scope, receive, send)
            return
        # Starlette's responder counts the streamed bytes and raises a 413 HTTPException from
        # `receive` once past the limit; the error handlers turn it into the JSON error.
        await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)
