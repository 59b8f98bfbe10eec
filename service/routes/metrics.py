"""GET /metrics: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import StateDep
from service.routing import ContractRoute
from service.schemas import error_responses

router = APIRouter(tags=["meta"], route_class=ContractRoute)
PROMETHEUS_TEXT = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={**PROMETHEUS_TEXT, **error_responses(422)},
)
async def metrics(state: StateDep) -> Response:
    loaded, m = state.engine.loaded, state.metrics
    m.index_size.set(loaded.index.ntotal if loaded else 0)
    m.versions.info(
        {
            "model_version": loaded.model_version if loaded else "",
            "index_version": loaded.version if loaded else "",
        }
    )
    m.embed_batches.set(state.engine.batcher.batches_run)
    for name, cache in (("records", state.engine.records), ("thumbnails", state.engine.thumbnails)):
        m.cache_entries.labels(name).set(len(cache))
        m.cache_hits.labels(name).set(cache.hits)
        m.cache_misses.labels(name).set(cache.misses)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
