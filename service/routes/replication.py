"""GET /replication: this replica's role (publisher or follower) and its change-stream follower."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import StateDep
from service.replica import Replica

router = APIRouter(tags=["meta"])


@router.get("/replication", summary="Publisher lease and change-stream follower of this replica")
async def replication(state: StateDep) -> dict:
    loaded = state.engine.loaded
    replica = state.replica
    status = await replica.status() if isinstance(replica, Replica) else {"role": "standalone"}
    return {**status, "index_version": loaded.version if loaded else None,
            "index_size": loaded.index.ntotal if loaded else None}  # fmt: skip
