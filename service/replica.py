"""One service process among N replicas: it follows the catalogue (service.watcher), holds or waits
for the publisher lease (service.lease), and adopts versions its peers publish.

Roles. Every replica serves reads and writes and applies every catalogue change to its own index.
Only the lease holder republishes the index (debounced, as before); the others only load. The
refresh (`python -m training.moco`) and `service.ingest` publish on their own, guarded by the
store's compare-and-switch of CURRENT, and remain the only way the model changes.

Adoption. A version published by a replica from the same model as ours holds what our own index
already holds (both follow the same change stream), so a following replica takes its name as the
base of its index without reloading it: no load, no reconcile, no moment with fewer vectors. Any
other new version (a new model from a refresh, a rollback) is loaded and swapped in, then the
stream resumes at its token or, without one, a reconcile runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from index.store import IndexStoreError
from service.errors import DATABASE_DOWN
from service.lease import LEASES, Lease
from service.state import ServiceState
from service.watcher import TOKEN_KEY, CatalogueWatcher

log = logging.getLogger("service.replica")


class Replica:
    def __init__(self, state: ServiceState) -> None:
        settings = state.settings
        self.state = state
        self.lease = Lease(state.db.db[LEASES], ttl_s=settings.PUBLISHER_LEASE_SECONDS)
        if settings.REPLICA_ID:
            self.lease.holder = settings.REPLICA_ID
        self.watcher = CatalogueWatcher(state)
        self._tasks: list[asyncio.Task] = []
        state.engine.may_publish = self.lease.held
        state.engine.publish_extras = self.publish_extras

    @property
    def role(self) -> str:
        return "publisher" if self.lease.held() else "follower"

    def publish_extras(self) -> dict[str, Any]:
        """What a version we publish records about us: the lease term (a fencing number) and the
        change-stream position its index is complete up to (None: processes that load it reconcile)."""
        return {"publisher": self.lease.holder, "lease_term": self.lease.term,
                TOKEN_KEY: self.watcher.publish_token()}  # fmt: skip

    # ----------------------------------------------------------------- hooks for service.lifecycle
    async def adopt_current(self) -> bool:
        """Before loading CURRENT: adopt it instead when it is a peer's republish of our model."""
        engine = self.state.engine
        loaded = engine.loaded
        if loaded is None or not self.watcher.following:
            return False
        version = await engine.run_in_thread(engine.store.current_version)
        if version is None or version == loaded.version:
            return False
        try:
            manifest = await engine.run_in_thread(engine.store.read_manifest, version)
        except IndexStoreError:
            return False  # load_current reports it
        if manifest.get("created_by") != "service" or manifest.get("model_version") != loaded.model_version:
            return False
        return await engine.adopt(version)

    async def on_swap(self) -> bool:
        """After a new version was swapped in: True when the stream resumed at its token (no
        reconcile needed), False when the caller must reconcile (a stream is open before it does)."""
        return await self.watcher.resume_at_version()

    # ----------------------------------------------------------------- tasks
    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.watcher.run(), name="catalogue-watcher"),
            asyncio.create_task(self._hold_lease(), name="publisher-lease"),
        ]

    async def _hold_lease(self) -> None:
        """The holder renews three times per ttl (one lost round trip is survived); the others try
        ten times per ttl, so publishing moves within ttl + ttl/10 of the holder's death."""
        document_ready = False
        while True:
            was_held = self.lease.held()
            try:
                if not document_ready:
                    await self.lease.ensure_document()
                    document_ready = True
                held = await self.lease.acquire_or_renew()
            except DATABASE_DOWN as exc:
                held = self.lease.held()  # still ours until the local deadline passes
                log.warning("publisher lease not renewed (%s)", type(exc).__name__)
            if held != was_held:
                log.info("%s the publisher lease (term %s) as %s",
                         "took" if held else "lost", self.lease.term, self.lease.holder)  # fmt: skip
            await asyncio.sleep(self.lease.ttl_s / (3 if held else 10))

    async def stop(self) -> None:
        """Stop following; the caller publishes pending changes (if we hold the lease), then `release`."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.watcher.stop()

    async def renew_for_shutdown(self) -> bool:
        """One last renewal before the shutdown's publish (`Lease.reclaim`): a holder whose renewals
        ran late on a busy machine would otherwise leave its last changes to the next reconcile."""
        with contextlib.suppress(*DATABASE_DOWN):
            return await self.lease.reclaim()
        return False

    async def release(self) -> None:
        with contextlib.suppress(*DATABASE_DOWN):
            await self.lease.release()

    async def status(self) -> dict[str, Any]:
        stats = self.watcher.stats
        try:
            document = await self.lease.current()
        except DATABASE_DOWN:
            document = None
        return {
            "replica": self.lease.holder,
            "role": self.role,
            "lease": {
                "holder": document.get("holder") if document else None,
                "term": document.get("term") if document else None,
                "expires_at": document["expires_at"].isoformat() if document else None,
                "ttl_s": self.lease.ttl_s,
            },
            "watcher": {
                "state": stats.state,
                "detail": stats.detail,
                "events_applied": stats.events_applied,
                "added": stats.added,
                "added_from_vector": stats.added_from_vector,
                "embedded": stats.embedded,
                "deferred": self.watcher.deferred,
                "grace_expired": stats.grace_expired,
                "removed": stats.removed,
                "resumed_from_version": stats.resumed_from_version,
                "fallback_reconciles": stats.fallback_reconciles,
                "has_token": self.watcher.token is not None,
                "apply_lag": stats.lag_summary(),  # write committed -> applied to this index
            },
        }
