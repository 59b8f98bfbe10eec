"""The OpenAPI document, generated from the routes' models.

FastAPI documents each route on its own; routes that share a path and method (split by media
type, see `service.routing`) would overwrite each other's operation. Here the first one's
operation is kept and the others' request-body media types are merged into it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts


def build_openapi(app: FastAPI) -> dict[str, Any]:
    first: list[Any] = []
    others: list[Any] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    for route in iter_route_contexts(app.routes):  # included routers flattened, paths with prefixes
        key = (route.path or "", frozenset(route.methods or ()))
        original = route.original_route
        if isinstance(original, APIRoute) and original.include_in_schema and key in seen:
            others.append(route)
        else:
            first.append(route)
            seen.add(key)
    info = {"title": app.title, "version": app.version, "description": app.description}
    document = get_openapi(routes=first, openapi_version=app.openapi_version, **info)
    for route in others:
        extra = get_openapi(routes=[route], openapi_version=app.openapi_version, **info)
        for path, operations in extra["paths"].items():
            for method, operation in operations.items():
                target = document["paths"][path][method]
                target["requestBody"]["content"].update(operation["requestBody"]["content"])
        schemas = extra.get("components", {}).get("schemas", {})
        document.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
    return document


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
