"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import StateDep
from service.errors import DATABASE_DOWN, database_message
from service.routing import ContractRoute
from service.schemas import RETRY_AFTER, Live, NotReadyBody, Ready, error_responses

router = APIRouter(prefix="/health", tags=["health"], route_class=ContractRoute)


@router.get("/live", summary="The process is up", responses=error_responses(422))
async def live() -> Live:
    return Live(status="alive")


@router.get(
    "/ready",
    summary="Catalogue queries answered, model and index loaded (503 with reasons otherwise)",
    response_model=Ready,
    responses={
        503: {
            "model": NotReadyBody,
            "description": "not ready: every reason in `reasons`",
            "headers": RETRY_AFTER,
        },
        **error_responses(422),
    },
)
async def ready(state: StateDep) -> Any:
    reasons = []
    if state.db_problem:
        reasons.append(state.db_problem)
    try:  # a real catalogue query (a busy server still answers ping), bounded server-side too
        limit_s = state.settings.MONGO_TIMEOUT_MS / 1000
        await asyncio.wait_for(state.db.check_catalogue(limit_s), timeout=limit_s + 1)
    except (asyncio.TimeoutError, *DATABASE_DOWN) as exc:
        reasons.append(database_message(exc))
    loaded = state.engine.loaded
    if loaded is None:
        reasons.append(state.engine.problem or "the model and index are not loaded")
    if reasons:
        body = NotReadyBody(detail="not ready: " + "; ".join(reasons), reasons=reasons)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    return Ready(
        status="ready",
        model_version=loaded.model_version,
        index_version=loaded.version,
        index_size=loaded.index.ntotal,
        reconciled=not state.needs_reconcile,
        reconcile_seconds=state.last_reconcile_s,
        orphan_sweep_seconds=state.last_sweep_s,
        caches_warm=state.engine.records.warm and state.engine.thumbnails.warm,
    )
