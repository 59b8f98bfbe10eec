"""`ContractRoute`: an APIRoute that holds requests to what its OpenAPI operation documents.

* A body in a media type the operation does not take is a 415, not read as an empty form.
  Two routes on one path and method may split a request by media type (`POST /search` takes JSON
  or multipart): a route whose media type does not fit matches only partially, so the router
  tries the next one, and the last partial match answers the 415.
* An endpoint that reads its body itself declares the media types it takes in `openapi_extra`
  (`requestBody.content`, a `type/*` wildcard allowed); they are documented and enforced as above.
* A query parameter the operation does not declare is a 422 (`k` in the query string of a
  multipart search would otherwise be dropped silently).
"""

from __future__ import annotations

from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.params import Form
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.routing import Match, compile_path
from starlette.types import Receive, Scope, Send

JSON = "application/json"
MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"


def image_body(options: str) -> dict[str, Any]:
    """`openapi_extra` of an endpoint that takes an image as its whole body (`Content-Type: image/*`),
    its options in the query string: documented, and enforced (415 otherwise) by ContractRoute."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "image/*": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"the image; options as query parameters ({options})",
                }
            },
        }
    }


def query_parameter_names(dependant: Dependant) -> set[str]:
    """The query parameters an endpoint and all its dependencies declare."""
    names = set()
    for field in dependant.query_params:
        model = field.field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):  # `Query()` model: its fields
            names |= {info.alias or name for name, info in model.model_fields.items()}
        else:
            names.add(field.alias)
    for dependency in dependant.dependencies:
        names |= query_parameter_names(dependency)
    return names


def request_media_type(scope: Scope) -> str:
    return Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower()


class ContractRoute(APIRoute):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        body = self.body_field
        raw = ((self.openapi_extra or {}).get("requestBody") or {}).get("content")
        if raw:  # the endpoint reads the body itself: what it takes is what it documents
            self.media_types: frozenset[str] = frozenset(raw)
        elif body is None:
            self.media_types = frozenset()
        elif isinstance(body.field_info, Form):  # File is a Form: multipart, or urlencoded without files
            self.media_types = frozenset({MULTIPART, URLENCODED})
        else:
            self.media_types = frozenset({JSON})
        self.query_names = frozenset(query_parameter_names(self.dependant))

    def _takes(self, scope: Scope) -> bool:
        if not self.media_types:
            return True
        given = request_media_type(scope)
        return given in self.media_types or f"{given.partition('/')[0]}/*" in self.media_types

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is Match.FULL and not self._takes(scope):
            return Match.PARTIAL, child_scope
        return match, child_scope

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in self.methods:
            if not self._takes(scope):
                raise HTTPException(415, self._unsupported_media_type(scope))
            unknown = sorted(set(QueryParams(scope["query_string"])) - self.query_names)
            if unknown:
                raise RequestValidationError(
                    [
                        {"type": "extra_forbidden", "loc": ("query", name), "msg": "unknown"}
                        for name in unknown
                    ]
                )
        await super().handle(scope, receive, send)

    def _unsupported_media_type(self, scope: Scope) -> str:
        """Names every media type this path and method take (all routes sharing them)."""
        documented = set(self.media_types)
        for route in iter_route_contexts(getattr(scope.get("app"), "routes", [])):
            original = route.original_route
            if (
                isinstance(original, ContractRoute)
                and route.methods == self.methods
                and compile_path(route.path or "")[0].match(scope["path"])
            ):
                documented |= original.media_types
        given = request_media_type(scope) or "(none)"
        takes = " or ".join(sorted(documented - {URLENCODED}))
        return f"unsupported Content-Type {given!r}: {scope['method']} {scope['path']} takes {takes}"
