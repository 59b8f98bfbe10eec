"""Hot catalogue records for search results, kept in memory and invalidated on change.

A search result needs only a record's label and tags (`catalogue.SEARCH_FIELDS`); popular images
come back again and again, and each round trip to the database costs milliseconds. The cache holds
those fields for up to `capacity` records (least recently used go first).

Invalidation follows the database itself (`service.followed_cache`): a change stream on `images`
(updates, replacements, deletions, from this service or any other process) evicts the record
within the stream's latency (milliseconds), and nothing is served while that stream is not open.

Filters are evaluated on cached records only for the forms the service builds (`label` equality,
`tags` `$all`, `label` `$type: "string"`); any other filter reads the database.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from service.catalogue import records_by_id
from service.db import Database
from service.followed_cache import FollowedCache


class RecordCache(FollowedCache):
    def __init__(self, capacity: int = 100_000) -> None:
        super().__init__()
        self.capacity = capacity
        self._records: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    # ----------------------------------------------------------------- lookups
    async def records(self, db: Database, ids: list[int], mongo_filter: dict[str, Any]) -> dict[int, dict]:
        """{id: record (label, tags)} for the ids that exist and pass `mongo_filter`."""
        self.ensure_watching(db)
        if not self.watching or not _supported(mongo_filter):
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
            generation = self.generation
            fetched = await records_by_id(db, missing)
            if self.may_keep(generation):
                for image_id, record in fetched.items():
                    self._put(image_id, record)
            found.update(fetched)
        return {i: found[i] for i in ids if i in found and _matches(found[i], mongo_filter)}

    def fill(self, found: list[dict[str, Any]], generation: int) -> bool:
        """Warm-up: keep records (SEARCH_FIELDS) read while `generation` was current as the least
        recently used, only while they fit without evicting anything. False once the cache is full."""
        if not self.may_keep(generation):
            return True  # something changed meanwhile: this batch is not kept, later ones may be
        for record in found:
            image_id = int(record["_id"])
            if image_id in self._records:
                continue
            if len(self._records) >= self.capacity:
                return False
            self._records[image_id] = record
            self._records.move_to_end(image_id, last=False)
        return True

    def _put(self, image_id: int, record: dict[str, Any]) -> None:
        self._records[image_id] = record
        self._records.move_to_end(image_id)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def source(self, db: Database) -> AsyncCollection:
        return db.images

    def forget(self, ids: list[int] | None) -> None:
        if ids is None:
            self._records.clear()
        else:
            for image_id in ids:
                self._records.pop(image_id, None)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._records

    def __len__(self) -> int:
        return len(self._records)


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
