"""An in-memory cache that serves only while a change stream on its source collection is open.

The invalidation rule shared by `RecordCache` (records) and `ThumbnailCache` (thumbnail bytes):
the database itself says what changed, not the code paths that write, so a change made by any
process (another replica, `service.ingest`, a shell) evicts the entry within the stream's latency.
Nothing is served before the stream opened, after it failed (a standalone mongod has no change
streams) or while it reconnects: lookups then go to the database. A read racing an invalidation is
not kept: each eviction bumps `generation`, and a subclass keeps a value fetched under an older
generation only for the caller, never in the cache.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from service.db import Database

log = logging.getLogger("service.followed_cache")
RETRY_SECONDS = 2.0


class FollowedCache:
    """Subclasses name the collection and events to follow and how to forget entries."""

    # Changes to documents, and the collection going away (an event without a documentKey: all).
    operations: tuple[str, ...] = ("update", "replace", "delete", "drop", "rename", "dropDatabase")

    def __init__(self) -> None:
        self._generation = 0
        self._watching = False  # the change stream is open: the cache may serve
        self.openings = 0  # how often the stream opened (each opening starts from an empty cache)
        self.warmed_for = 0  # the opening after which service.cache_warmup last filled the cache
        self._task: asyncio.Task | None = None

    def source(self, db: Database) -> AsyncCollection:
        raise NotImplementedError

    def forget(self, ids: list[int] | None) -> None:
        """Drop the entries of `ids` (all of them when None)."""
        raise NotImplementedError

    def invalidate(self, ids: list[int] | None = None) -> None:
        """Forget `ids` (everything when None); reads in flight are not kept."""
        self._generation += 1
        self.forget(ids)

    def may_keep(self, generation: int) -> bool:
        """Whether a value read while `generation` was current may be cached now."""
        return generation == self._generation and self._watching

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def watching(self) -> bool:
        return self._watching

    @property
    def warm(self) -> bool:
        """Serving, and filled by the warm-up since its stream last opened."""
        return self._watching and self.warmed_for == self.openings

    def ensure_watching(self, db: Database) -> None:
        if self._task is None or self._task.done():
            name = f"{type(self).__name__}-watch"
            self._task = asyncio.get_running_loop().create_task(self._watch(db), name=name)

    async def _watch(self, db: Database) -> None:
        pipeline: list[dict[str, Any]] = [
            {"$match": {"operationType": {"$in": list(self.operations)}}},
            # only the id: update events would otherwise carry every changed field (stored vectors)
            {"$project": {"documentKey": 1, "operationType": 1}},
        ]
        while True:
            try:
                async with await self.source(db).watch(pipeline) as stream:
                    self.invalidate()  # whatever changed while no stream was open
                    self._watching = True
                    self.openings += 1
                    async for change in stream:
                        key = change.get("documentKey", {}).get("_id")
                        self.invalidate([int(key)] if isinstance(key, int) else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no change streams here, or the database went away
                if db.closed:  # the service is shutting down: nothing to follow any more
                    return
                log.info("%s off (%s: %s); retrying", type(self).__name__, type(exc).__name__, exc)
            finally:
                self._watching = False
                self.invalidate()
            await asyncio.sleep(RETRY_SECONDS)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._watching = False
        self.invalidate()
