"""The FastAPI application: `create_app(settings)`; `python -m service` serves it with uvicorn."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import lifecycle
from service.body_limit import BodySizeLimit, request_body_limit
from service.errors import install_error_handlers
from service.metrics import MetricsMiddleware, ServiceMetrics
from service.openapi import install_openapi
from service.routes import admin, classify, health, images, metrics, page, replication, search, version
from service.settings import Settings
from service.state import ServiceState

DESCRIPTION = """Image retrieval over self-supervised embeddings.

Upload images to the catalogue (`POST /images`), search by image, id or vector (`POST /search`),
classify by weighted kNN (`POST /classify`). Errors are JSON: `{"detail": "..."}`.
Writes and admin need `X-API-Key` when `API_KEY` is set."""


def announce(settings: Settings, state: ServiceState) -> None:
    """The first thing a person running `make run` needs: where it is and a search to try."""
    base = f"http://{settings.HOST}:{settings.PORT}"
    loaded = state.engine.loaded
    size = loaded.index.ntotal if loaded is not None else 0
    print(
        f"\nsearch page: {base}/\n"
        f"ssl-retrieval serving {size} indexed images at {base}  (API docs: {base}/docs)\n"
        f"try a search with a catalogue image:\n"
        f"  curl -s -o /tmp/query.png {base}/images/1/content && "
        f"curl -F file=@/tmp/query.png -F k=5 {base}/search\n",
        flush=True,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service_metrics = ServiceMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await lifecycle.start(settings, service_metrics)
        app.state.service = state
        tasks = lifecycle.background_tasks(state)
        announce(settings, state)
        try:
            yield
        finally:
            await lifecycle.stop_background(tasks)
            await lifecycle.stop(state)

    app = FastAPI(title="ssl-retrieval", description=DESCRIPTION, version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for module in (images, search, classify, health, admin, version, metrics, replication):
        app.include_router(module.router)
    page.install(app)  # GET / (the search page) and /static
    install_openapi(app)
    app.add_middleware(MetricsMiddleware, metrics=service_metrics)
    app.add_middleware(
        BodySizeLimit, limit_for=lambda method, path: request_body_limit(settings, method, path)
    )
    if settings.CORS_ORIGINS:  # off unless origins are configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.CORS_ORIGINS,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "X-API-Key"],
        )
    return app
