"""Hot catalogue records for search results, kept in memory and invalidated on change.

A search result needs only a record's label and tags (`catalogue.SEARCH_FIELDS`); popular images
come back again and again, and each round trip to the database costs milliseconds. The cache holds
those fields for up to `capacity` records (least recently used go first).

Invalidation follows the database itself, not the code paths that write: a change stream on
`images` (updates, replacements, deletions, from this service or any other process) evicts the
record within the stream's latency (milliseconds). The cache serves nothing unless that stream is
open: before it started, after it failed (a standalone mongod has no change streams) and while it
reconnects, every lookup goes to the database. A read racing an invalidation is not cached: each
eviction bumps a generation counter, and records fetched under an older generation are returned but
not kept.

Filters are evaluated on cached records only for the forms the service builds (`label` equality,
`tags` `$all`, `label` `$type: "string"`); any other filter reads the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from service.catalogue import records_by_id
from service.db import Database

log = logging.getLogger("service.record_cache")
RETRY_SECONDS = 2.0


class RecordCache:
    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._records: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._generation = 0
        self._watching = False  # the change stream is open: the cache may serve
        self._task: asyncio.Task | None = None
        self.hits = 0
        self.misses = 0

    # ----------------------------------------------------------------- lookups
    async def records(self, db: Database, ids: list[int], mongo_filter: dict[str, Any]) -> dict[int, dict]:
        """{id: record (label, tags)} for the ids that exist and pass `mongo_filter`."""
        self._ensure_watching(db)
        if not self._watching or not _supported(mongo_filter):
            return await records_by_id(db, ids, mongo_filter)
        found: dict[int, dict] = {}
        missing = []
        for image_id in ids:
            record = self._records.get(image_id)
            if record is None:
                missing.append(image_id)
            else:
                self._records.move_to_end(image_id)
                found[image_id] = record
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            generation = self._generation
            fetched = await records_by_id(db, missing)
            if generation == self._generation and self._watching:
                for image_id, record in fetched.items():
                    self._put(image_id, record)
            found.update(fetched)
        return {i: found[i] for i in ids if i in found and _matches(found[i], mongo_filter)}

    def _put(self, image_id: int, record: dict[str, Any]) -> None:
        self._records[image_id] = record
        self._records.move_to_end(image_id)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def invalidate(self, ids: list[int] | None = None) -> None:
        """Forget `ids` (all records when None)."""
        self._generation += 1
        if ids is None:
            self._records.clear()
        else:
            for image_id in ids:
                self._records.pop(image_id, None)

    # ----------------------------------------------------------------- the change stream
    def _ensure_watching(self, db: Database) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch(db), name="record-cache-watch")

    async def _watch(self, db: Database) -> None:
        pipeline = [  # only the id: update events would otherwise carry every changed field (vectors)
            {"$match": {"operationType": {"$in": ["update", "replace", "delete"]}}},
            {"$project": {"documentKey": 1}},
        ]
        while True:
            try:
                async with await db.images.watch(pipeline) as stream:
                    self.invalidate()  # whatever changed while no stream was open
                    self._watching = True
                    async for change in stream:
                        key = change.get("documentKey", {}).get("_id")
                        self.invalidate([int(key)] if isinstance(key, int) else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no change streams here, or the database went away
                log.info("record cache off (%s: %s); retrying", type(exc).__name__, exc)
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

    @property
    def watching(self) -> bool:
        return self._watching


def _supported(mongo_filter: dict[str, Any]) -> bool:
    for key, value in mongo_filter.items():
        if key == "label" and (isinstance(value, str) or value == {"$type": "string"}):
            continue
        if key == "tags" and isinstance(value, dict) and set(value) == {"$all"}:
            continue
        return False
    return True


def _matches(record: dict[str, Any], mongo_filter: dict[str, Any]) -> bool:
    for key, value in mongo_filter.items():
        if key == "label":
            label = record.get("label")
            if value == {"$type": "string"}:
                if not isinstance(label, str):
                    return False
            elif label != value:
                return False
        elif key == "tags":
            tags = record.get("tags") or []
            if not all(tag in tags for tag in value["$all"]):
                return False
    return True
