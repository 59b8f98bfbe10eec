"""Admin: load the newest published index version now (the service also polls for it)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import AUTH_ERRORS, StateDep, WriteAccess
from service.lifecycle import refresh
from service.routing import ContractRoute
from service.schemas import Reloaded, error_responses

router = APIRouter(prefix="/admin", tags=["admin"], route_class=ContractRoute)


@router.post(
    "/reload",
    dependencies=[WriteAccess],
    summary="Load the newest published index version",
    responses={**AUTH_ERRORS, **error_responses(413, 422, 503)},
)
async def reload(state: StateDep) -> Reloaded:
    swapped = await refresh(state)
    loaded = state.engine.require()
    return Reloaded(
        reloaded=swapped,
        index_version=loaded.version,
        model_version=loaded.model_version,
        index_size=loaded.index.ntotal,
    )
