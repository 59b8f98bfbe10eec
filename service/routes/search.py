"""POST /search: nearest catalogue images to an uploaded image (multipart, or the image itself as
the body), or to a catalogue id or a vector (JSON). Three routes on one path, split by media type
(`ContractRoute`), one search core."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Request

from service.deps import AUTH_ERRORS, LoadedDep, ReadAccess, StateDep
from service.engine import Loaded
from service.errors import BadRequest
from service.queries import query_vector
from service.routing import ContractRoute, image_body
from service.schemas import (
    SearchForm,
    SearchHit,
    SearchOptions,
    SearchParams,
    SearchQuery,
    SearchResponse,
    error_responses,
)
from service.search import Timer, filtered_search
from service.state import ServiceState
from service.thumbnail_cache import Thumbnail
from service.uploads import read_body, read_upload

router = APIRouter(tags=["search"], route_class=ContractRoute)

PNG_DATA_URL = "data:image/png;base64,"
SEARCH = {
    "summary": "Similar images",
    "description": "Multipart (`file` + optional `k`, `label`, `tags`, `min_score`, `expand`) or JSON "
    '(`{"id": ...}` or `{"vector": [...]}` + the same options). Results are best first, with cosine '
    "similarity to the query as scores, ranked by alpha query expansion over the top `expand` "
    "(default `SEARCH_EXPAND`, 5; 0: plain). "
    "`thumbnails=N` inlines the first N results' thumbnails as data URLs, for a page that shows them "
    "at once.",
    "dependencies": [ReadAccess],
    "responses": {**AUTH_ERRORS, **error_responses(400, 404, 413, 415, 422, 503)},
}


async def run_search(
    state: ServiceState, loaded: Loaded, options: SearchOptions, query: Any
) -> SearchResponse:
    """The search core: query is bytes (an uploaded image), an int (a catalogue id) or a list (a vector)."""
    if options.k > state.settings.SEARCH_MAX_K:
        raise BadRequest(f"k: must be at most {state.settings.SEARCH_MAX_K}")
    timer = Timer()
    expand = state.settings.SEARCH_EXPAND if options.expand is None else options.expand
    # Without metadata filters the first candidates are the results (bar records deleted a moment
    # ago): their thumbnails are read while their records are.
    filtered = options.label is not None or bool(options.tags)
    prefetch = InlineThumbnails(state, 0 if filtered else options.thumbnails)
    with state.engine.serving():
        try:
            vector = await query_vector(state.engine, state.db, loaded, query, timer)
            hits = await filtered_search(
                state.engine,
                state.db,
                loaded,
                vector,
                options.k,
                options.label,
                options.tags,
                options.min_score,
                timer=timer,
                on_candidates=prefetch.start,
                expand=expand,
            )
            inline = await prefetch.data_urls([hit.id for hit in hits[: options.thumbnails]], timer)
        finally:
            prefetch.cancel()
    return SearchResponse(
        results=[
            SearchHit(
                id=hit.id,
                score=hit.score,
                label=hit.record.get("label"),
                tags=hit.record.get("tags") or [],
                content_url=f"/images/{hit.id}/content",
                thumbnail_url=f"/images/{hit.id}/thumbnail",
                thumbnail_data_url=inline.get(hit.id),
            )
            for hit in hits
        ],
        expand=expand,
        model_version=loaded.model_version,
        index_version=loaded.version,
        timing_ms=timer.as_dict("thumbnails"),
    )


class InlineThumbnails:
    """The thumbnails of the first results as data URLs: those of the first `prefetch` candidates
    read (from memory, the rest in one batched read) concurrently with their records, any other
    result's after."""

    def __init__(self, state: ServiceState, prefetch: int) -> None:
        self.state = state
        self.prefetch = prefetch
        self.task: asyncio.Task[dict[int, Thumbnail]] | None = None
        self.asked: set[int] = set()

    def start(self, candidates: list[int]) -> None:
        if self.task is None and self.prefetch > 0:  # the first round's candidates only
            ids = candidates[: self.prefetch]
            self.asked = set(ids)
            self.task = asyncio.ensure_future(self.state.engine.thumbnails.thumbnails(self.state.db, ids))

    async def data_urls(self, ids: list[int], timer: Timer) -> dict[int, str]:
        """{id: data URL} for the ids whose thumbnail is stored."""
        if not ids:
            return {}
        started = time.perf_counter()
        found = await self.task if self.task is not None else {}
        if missing := [i for i in ids if i not in self.asked]:
            found = found | await self.state.engine.thumbnails.thumbnails(self.state.db, missing)
        timer.add("thumbnails", started)
        return {i: PNG_DATA_URL + base64.b64encode(found[i].data).decode("ascii") for i in ids if i in found}

    def cancel(self) -> None:
        """The search failed before its thumbnails were needed: stop reading them (and take a
        failed read's error, which the search's own error already reports)."""
        if self.task is None:
            return
        if not self.task.done():
            self.task.cancel()
        elif not self.task.cancelled():
            self.task.exception()


@router.post("/search", **SEARCH)
async def search_by_id_or_vector(state: StateDep, loaded: LoadedDep, query: SearchQuery) -> SearchResponse:
    return await run_search(state, loaded, query, query.id if query.id is not None else query.vector)


@router.post("/search", **SEARCH)
async def search_by_image(
    state: StateDep, loaded: LoadedDep, form: Annotated[SearchForm, File()]
) -> SearchResponse:
    data = await read_upload(form.file, state.settings.MAX_UPLOAD_BYTES)
    return await run_search(state, loaded, form, data)


@router.post("/search", **SEARCH, openapi_extra=image_body("k, label, tags, min_score, expand, thumbnails"))
async def search_by_image_body(
    state: StateDep, loaded: LoadedDep, request: Request, options: Annotated[SearchParams, Query()]
) -> SearchResponse:
    data = await read_body(request, state.settings.MAX_UPLOAD_BYTES, "query image")
    return await run_search(state, loaded, options, data)
