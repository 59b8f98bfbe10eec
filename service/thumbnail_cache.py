"""Hot thumbnails in memory: the PNG bytes of recent search results, under a memory cap.

A result page shows a dozen or more thumbnails; read one by one from GridFS each costs two database
round trips, which on a slow server is most of a search's time on screen. Thumbnails are read here
in batches (`catalogue.read_thumbnails`) and kept, least recently used first out, while their total
size stays under `max_bytes`. A thumbnail never changes while its id lives (ids are never reused),
so the only invalidation is its removal: the cache follows `thumbnails.files` through a change
stream (`service.followed_cache`) and forgets an id as soon as its file is deleted, by any process.
Nothing is served from memory while that stream is not open.

Each thumbnail carries a strong ETag (a hash of its bytes) for HTTP revalidation.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from pymongo.asynchronous.collection import AsyncCollection

from service.catalogue import read_thumbnails
from service.db import THUMBNAIL_BUCKET, Database
from service.followed_cache import FollowedCache

ENTRY_OVERHEAD = 200  # bytes per entry besides the PNG: dict slot, objects, the ETag string


@dataclass(frozen=True)
class Thumbnail:
    data: bytes  # PNG
    etag: str  # quoted, as the ETag header carries it

    @classmethod
    def of(cls, data: bytes) -> Thumbnail:
        return cls(data, f'"{hashlib.blake2b(data, digest_size=12).hexdigest()}"')


class ThumbnailCache(FollowedCache):
    def __init__(self, max_bytes: int = 64 * 2**20) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self._thumbnails: OrderedDict[int, Thumbnail] = OrderedDict()
        self.size = 0  # bytes held, overhead included
        self.hits = 0
        self.misses = 0

    async def thumbnails(self, db: Database, ids: list[int]) -> dict[int, Thumbnail]:
        """{id: thumbnail} for the ids whose thumbnail is stored; misses in one batched read."""
        if self.max_bytes > 0:
            self.ensure_watching(db)
        found: dict[int, Thumbnail] = {}
        if self.watching:
            for image_id in ids:
                if (thumbnail := self._thumbnails.get(image_id)) is not None:
                    self._thumbnails.move_to_end(image_id)
                    found[image_id] = thumbnail
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            generation = self.generation
            fetched = {i: Thumbnail.of(data) for i, data in (await read_thumbnails(db, missing)).items()}
            if self.may_keep(generation):
                for image_id, thumbnail in fetched.items():
                    self._put(image_id, thumbnail)
            found |= fetched
        return found

    @property
    def warm(self) -> bool:
        return self.max_bytes <= 0 or super().warm  # a cache of no bytes needs no warming

    def offer(self, image_id: int, data: bytes, generation: int) -> None:
        """Keep a thumbnail this process has in hand (an upload's), read or written while
        `generation` was current, as the most recently used."""
        if self.may_keep(generation):
            self._put(image_id, Thumbnail.of(data))

    def fill(self, found: dict[int, bytes], generation: int) -> bool:
        """Warm-up: keep thumbnails read while `generation` was current as the least recently used,
        only while they fit without evicting anything. False once the cache is full (stop reading)."""
        if not self.may_keep(generation):
            return True  # something changed meanwhile: this batch is not kept, later ones may be
        for image_id, data in found.items():
            if image_id in self._thumbnails:
                continue
            cost = len(data) + ENTRY_OVERHEAD
            if self.size + cost > self.max_bytes:
                return False
            self._thumbnails[image_id] = Thumbnail.of(data)
            self._thumbnails.move_to_end(image_id, last=False)
            self.size += cost
        return True

    def _put(self, image_id: int, thumbnail: Thumbnail) -> None:
        cost = len(thumbnail.data) + ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        self._drop(image_id)
        self._thumbnails[image_id] = thumbnail
        self.size += cost
        while self.size > self.max_bytes:
            self._drop(next(iter(self._thumbnails)))

    def _drop(self, image_id: int) -> None:
        thumbnail = self._thumbnails.pop(image_id, None)
        if thumbnail is not None:
            self.size -= len(thumbnail.data) + ENTRY_OVERHEAD

    def source(self, db: Database) -> AsyncCollection:
        return db.db[f"{THUMBNAIL_BUCKET}.files"]

    def forget(self, ids: list[int] | None) -> None:
        if ids is None:
            self._thumbnails.clear()
            self.size = 0
        else:
            for image_id in ids:
                self._drop(image_id)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._thumbnails

    def __len__(self) -> int:
        return len(self._thumbnails)
