"""Admin: load the newest published index version now (the service also polls for it)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import StateDep, WriteAccess
from service.lifecycle import refresh

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/reload", dependencies=[WriteAccess], summary="Load the newest published index version")
async def reload(state: StateDep) -> dict:
    swapped = await refresh(state)
    loaded = state.engine.require()
    return {
        "reloaded": swapped,
        "index_version": loaded.version,
        "model_version": loaded.model_version,
        "index_size": loaded.index.ntotal,
    }
