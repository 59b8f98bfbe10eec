"""POST /search: nearest catalogue images to an uploaded image, a catalogue id or a vector."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import ReadAccess, StateDep
from service.errors import BadRequest
from service.queries import SearchByJson, SearchFilters, parse_search_request, query_vector
from service.search import Timer, filtered_search

router = APIRouter(tags=["search"])

_multipart_schema = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the query image"},
        **{name: prop for name, prop in SearchFilters.model_json_schema()["properties"].items()},
    },
}
OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _multipart_schema},
            "application/json": {
                "schema": SearchByJson.model_json_schema(ref_template="#/components/schemas/{model}")
            },
        },
    }
}


@router.post("/search", dependencies=[ReadAccess], openapi_extra=OPENAPI_BODY, summary="Similar images")
async def search(request: Request, state: StateDep) -> dict:
    """Multipart (`file` + optional `k`, `label`, `tags`, `min_score`) or JSON (`{"id": ...}` or
    `{"vector": [...]}` + the same options). Results are best first, with cosine similarity scores."""
    settings, engine, db = state.settings, state.engine, state.db
    loaded = engine.require()
    filters, query = await parse_search_request(request, settings.MAX_UPLOAD_BYTES)
    if filters.k > settings.SEARCH_MAX_K:
        raise BadRequest(f"k: must be at most {settings.SEARCH_MAX_K}")
    timer = Timer()
    vector = await query_vector(engine, db, loaded, query, timer)
    hits = await filtered_search(
        engine, db, loaded, vector, filters.k, filters.label, filters.tags, filters.min_score, timer=timer
    )
    return {
        "results": [
            {
                "id": hit.id,
                "score": hit.score,
                "label": hit.record.get("label"),
                "tags": hit.record.get("tags") or [],
                "content_url": f"/images/{hit.id}/content",
                "thumbnail_url": f"/images/{hit.id}/thumbnail",
            }
            for hit in hits
        ],
        "model_version": loaded.model_version,
        "index_version": loaded.version,
        "timing_ms": timer.as_dict(),
    }
