"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import StateDep
from service.errors import DATABASE_DOWN, database_message

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", summary="The process is up")
async def live() -> dict:
    return {"status": "alive"}


@router.get("/ready", summary="Database reachable, model and index loaded (503 with reasons otherwise)")
async def ready(state: StateDep) -> JSONResponse:
    reasons = []
    try:
        await asyncio.wait_for(state.db.ping(), timeout=state.settings.MONGO_TIMEOUT_MS / 1000 + 1)
    except (asyncio.TimeoutError, *DATABASE_DOWN) as exc:
        reasons.append(database_message(exc))
    loaded = state.engine.loaded
    if loaded is None:
        reasons.append(state.engine.problem or "the model and index are not loaded")
    if reasons:
        return JSONResponse(
            {"detail": "not ready: " + "; ".join(reasons), "reasons": reasons}, status_code=503
        )
    return JSONResponse(
        {
            "status": "ready",
            "model_version": loaded.model_version,
            "index_version": loaded.version,
            "index_size": loaded.index.ntotal,
        }
    )
