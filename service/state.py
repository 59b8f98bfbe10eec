"""What one running service holds: settings, the database, the engine, metrics (app.state.service)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from service.catalogue import Limits
from service.db import Database
from service.embedded_db import EmbeddedDatabase
from service.engine import Engine
from service.metrics import ServiceMetrics
from service.settings import Settings


class ReplicaHooks(Protocol):
    """What service.lifecycle calls on service.replica.Replica (defined there; it needs this state)."""

    async def adopt_current(self) -> bool: ...
    async def on_swap(self) -> bool: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def release(self) -> None: ...


@dataclass
class ServiceState:
    settings: Settings
    db: Database
    engine: Engine
    metrics: ServiceMetrics
    embedded_db: EmbeddedDatabase | None = None
    db_prepared: bool = False  # indexes and the id counter exist
    needs_reconcile: bool = True  # set on every swap, cleared by a successful reconcile
    # Serialises refreshes (poller, POST /admin/reload, start-up): load + reconcile run as one.
    refresh_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_sweep: float | None = None  # monotonic time of the last orphan sweep
    last_sweep_s: float | None = None  # how long it took
    last_reconcile_s: float | None = None  # how long the last reconcile took
    db_problem: str | None = None  # set while the embedded database is being restarted
    replica: ReplicaHooks | None = None  # change-stream follower + publisher lease (service.replica)

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(max_bytes=s.MAX_UPLOAD_BYTES, max_pixels=s.MAX_PIXELS, thumbnail_size=s.THUMBNAIL_SIZE)
