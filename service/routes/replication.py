"""GET /replication: this replica's role (publisher or follower), the publisher lease and its
change-stream follower (service.replica)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.deps import StateDep
from service.replica import Replica
from service.routing import ContractRoute
from service.schemas import error_responses

router = APIRouter(tags=["meta"], route_class=ContractRoute)


class LeaseInfo(BaseModel):
    holder: str | None = Field(description="replica id of the publisher, null when free")
    term: int | None = Field(description="incremented at every change of holder (a fencing number)")
    expires_at: str | None = Field(description="ISO time the holder must renew by")
    ttl_s: float


class ApplyLag(BaseModel):
    events: int = Field(description="recent events measured")
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None


class WatcherInfo(BaseModel):
    state: str = Field(description="starting | following | retrying | unavailable | stopped")
    detail: str | None
    events_applied: int
    added: int
    added_from_vector: int = Field(description="of `added`: the vector stored by the replica that indexed it")
    embedded: int = Field(description="of `added`: embedded here from the stored bytes")
    deferred: int = Field(description="inserts waiting now for the writing replica's vector")
    grace_expired: int = Field(description="inserts whose vector did not come in time (then embedded)")
    removed: int
    resumed_from_version: str | None = Field(description="the index version whose stored token it resumed at")
    fallback_reconciles: int = Field(description="reconciles run because no usable resume token existed")
    has_token: bool
    apply_lag: ApplyLag = Field(description="write committed -> applied to this replica's index")


class ReplicationInfo(BaseModel):
    replica: str | None
    role: str = Field(description="publisher | follower | standalone")
    lease: LeaseInfo | None
    watcher: WatcherInfo | None
    index_version: str | None
    index_size: int | None


@router.get(
    "/replication",
    summary="Publisher lease and change-stream follower of this replica",
    responses=error_responses(422),
)
async def replication(state: StateDep) -> ReplicationInfo:
    loaded = state.engine.loaded
    replica = state.replica
    status = await replica.status() if isinstance(replica, Replica) else {}
    return ReplicationInfo(
        replica=status.get("replica"),
        role=status.get("role", "standalone"),
        lease=status.get("lease"),
        watcher=status.get("watcher"),
        index_version=loaded.version if loaded else None,
        index_size=loaded.index.ntotal if loaded else None,
    )
