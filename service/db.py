"""The MongoDB layer: one client, the `images` collection, GridFS buckets, indexes and id allocation.

pymongo's native async API (`AsyncMongoClient`) is used rather than the sync client in a thread
pool: database calls are I/O waits, so they belong on the event loop, and the thread pool stays
free for the CPU work (decoding, inference, FAISS).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pymongo
from gridfs import AsyncGridFSBucket
from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

IMAGES = "images"
COUNTERS = "counters"
CONTENT_BUCKET = "content"
THUMBNAIL_BUCKET = "thumbnails"
IMAGE_ID_COUNTER = "image_id"
# `$in` lists stay this short: SecantusDB checks every candidate against the whole list in Python
# (measured: 500 ids on a 10k catalogue 1.2 s, 5000 ids 114 s), so cost grows with the list squared.
ID_CHUNK = 64
STREAM_BATCH = 1000  # documents per getMore of a streamed scan
PREPARE_TIMEOUT_S = 900.0
ID_ONLY = {"_id": 1}


def chunked(ids: Iterable[int], size: int = ID_CHUNK) -> Iterator[list[int]]:
    chunk: list[int] = []
    for image_id in ids:
        chunk.append(int(image_id))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def stream_docs(
    collection: AsyncCollection,
    query: Mapping[str, Any] | None = None,
    projection: Mapping[str, Any] | None = ID_ONLY,
    batch_size: int = STREAM_BATCH,
) -> AsyncIterator[list[dict]]:
    """All matching documents, a batch at a time, from ONE scan of the collection: never a query
    per page (a range query is a full scan on SecantusDB) nor an id list sent to the server; the
    caller matches ids against a sorted array (`projection=None`: whole documents). Run it inside
    `pymongo.timeout(...)` so the server
    cancels (maxTimeMS) a scan nobody waits for any more."""
    cursor = collection.find(dict(query or {}), projection, batch_size=batch_size)
    batch: list[dict] = []
    async for doc in cursor:
        batch.append(doc)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


async def paced_id_windows(
    db: Database, duty: float, size: int = ID_CHUNK, first: int = 1
) -> AsyncIterator[list[int]]:
    """Every image id that was ever allocated (`first`..the counter as it is now) in consecutive
    windows of `size`, for background work that reads the catalogue by point lookups (`$in` of one
    window) instead of a scan. A scan is one command that decodes the whole collection before it
    answers (SecantusDB: ~1.5 s per 100k documents idle, 8 s on a loaded machine, while every other
    client waits); a window is a few milliseconds. After each window the caller has processed, it
    pauses so that the walk keeps the database busy for at most `duty` of the time: queries from
    requests interleave, and a slower (loaded) server gets proportionally longer pauses. File ids
    are image ids (GridFS files are stored under the id of their record), so this covers them too."""
    if not 0 < duty <= 1:
        raise ValueError(f"duty must be in (0, 1], got {duty}")
    counter = await db.counters.find_one({"_id": IMAGE_ID_COUNTER})
    last = int(counter["seq"]) if counter else 0
    for start in range(first, last + 1, size):
        began = time.monotonic()
        yield list(range(start, min(start + size, last + 1)))
        busy = time.monotonic() - began
        await asyncio.sleep(busy * (1 - duty) / duty)


@dataclass
class Database:
    client: AsyncMongoClient
    db: AsyncDatabase
    closed: bool = False  # by `close`: a closed client never reopens

    @classmethod
    def connect(cls, uri: str, name: str, timeout_ms: int, journal: bool = True) -> Database:
        """`journal`: every write is acknowledged only once it is in the journal (j: true), so an
        acknowledged write survives a crash of the database process or of the machine.

        `timeout_ms` bounds server selection: with the database down (connections refused), a
        request fails (503) within it. The connect timeout is also the driver's heartbeat timeout
        (SDAM: monitors use it as their socket timeout), and a heartbeat that times out clears the
        pool and cancels every operation in flight ("operation cancelled"), so it gets the
        operations' own limit instead: a server that is slow for a few seconds (SecantusDB on a
        loaded machine) must not turn the requests it is still serving into 503s, some of them
        writes that took effect. A server that stops answering altogether is the supervisor's."""
        operation_ms = max(timeout_ms * 15, 30_000)
        client: AsyncMongoClient = AsyncMongoClient(
            uri,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=operation_ms,
            socketTimeoutMS=operation_ms,
            appname="ssl-retrieval-service",
            tz_aware=True,
            journal=journal,
        )
        return cls(client, client[name])

    @property
    def images(self) -> AsyncCollection:
        return self.db[IMAGES]

    @property
    def counters(self) -> AsyncCollection:
        return self.db[COUNTERS]

    @property
    def content(self) -> AsyncGridFSBucket:
        return AsyncGridFSBucket(self.db, bucket_name=CONTENT_BUCKET)

    @property
    def thumbnails(self) -> AsyncGridFSBucket:
        return AsyncGridFSBucket(self.db, bucket_name=THUMBNAIL_BUCKET)

    async def ping(self) -> None:
        await self.client.admin.command("ping")

    async def check_catalogue(self, timeout_s: float) -> None:
        """A real, bounded catalogue read (not only `ping`, which a busy server still answers): a
        point lookup on `images` and the id counter, cancelled server-side after `timeout_s`."""
        with pymongo.timeout(timeout_s):
            await self.images.find_one({"_id": 0}, {"_id": 1})
            await self.counters.find_one({"_id": IMAGE_ID_COUNTER})

    async def prepare(self) -> None:
        """Indexes and the id counter, created up front (idempotent).

        The counter document must exist before concurrent `find_one_and_update($inc)` calls race on
        it: two upserts of a missing document can both insert. Building an index over a large
        existing catalogue takes minutes on SecantusDB, hence the long limit.
        """
        with pymongo.timeout(PREPARE_TIMEOUT_S):
            await self._prepare()

    async def _prepare(self) -> None:
        await self.images.create_index([("sha256", ASCENDING)], unique=True, name="sha256_unique")
        await self.images.create_index([("label", ASCENDING)], name="label")
        await self.images.create_index([("tags", ASCENDING)], name="tags")
        await self.images.create_index([("status", ASCENDING)], name="status")
        for bucket in (CONTENT_BUCKET, THUMBNAIL_BUCKET):  # what GridFS creates on its first write
            await self.db[f"{bucket}.chunks"].create_index(
                [("files_id", ASCENDING), ("n", ASCENDING)], unique=True, name="files_id_1_n_1"
            )
            await self.db[f"{bucket}.files"].create_index(
                [("filename", ASCENDING), ("uploadDate", ASCENDING)], name="filename_1_uploadDate_1"
            )
        await self.counters.update_one({"_id": IMAGE_ID_COUNTER}, {"$setOnInsert": {"seq": 0}}, upsert=True)

    async def allocate_ids(self, count: int) -> list[int]:
        """`count` fresh consecutive ids in one atomic increment."""
        counter = await self.counters.find_one_and_update(
            {"_id": IMAGE_ID_COUNTER}, {"$inc": {"seq": count}}, return_document=ReturnDocument.AFTER
        )
        if counter is None:  # dropped behind our back: recreate, then retry once
            await self.prepare()
            return await self.allocate_ids(count)
        last = int(counter["seq"])
        return list(range(last - count + 1, last + 1))

    async def close(self) -> None:
        self.closed = True
        await self.client.close()
