"""Warm the record and thumbnail caches in the background, so that a search's results are served
from memory from the first query on, not one database round trip per new result.

After start-up (and again whenever a cache's change stream reopens, which empties it) one streamed
scan of `images` (label and tags only) fills the record cache, and one scan of the thumbnails'
files documents (lengths) then of their chunks fills the thumbnail cache, each until its budget
(entries, bytes) is reached: warmed entries go in as the least recently used and never evict
anything. The scans are one cursor each, read a batch of WARM_BATCH documents per getMore (no `$in`
lists, no query per page: both are full scans on SecantusDB), and yield to the service: no batch is
asked for while a search or classification is in flight, and after each batch the warm-up rests
for (1 - DUTY) / DUTY times as long as the batch took. A batch read while an invalidation arrived
is not kept (`FollowedCache.may_keep`), so the caches stay as correct as their change streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pymongo
from pymongo.asynchronous.collection import AsyncCollection

from service.catalogue import SEARCH_FIELDS
from service.db import THUMBNAIL_BUCKET, Database
from service.followed_cache import FollowedCache
from service.record_cache import RecordCache
from service.thumbnail_cache import ThumbnailCache

log = logging.getLogger("service.cache_warmup")
WARM_BATCH = 256  # documents per getMore: short enough that a search never waits long behind one
DUTY = 0.25  # the share of time the warm-up may keep the database busy
IDLE_POLL_S = 0.005  # how often a paused warm-up looks whether the searches in flight finished
CHECK_S = 1.0  # how often the loop looks for a cache to (re)warm
RETRY_S = 60.0  # after a failed warm-up (database away, a batch timed out)
BATCH_TIMEOUT_S = 60.0  # server-side limit of one batch (the scan is cancelled if nobody reads it)
Busy = Callable[[], bool]


async def _batches(collection: AsyncCollection, projection: dict[str, Any], cache: FollowedCache, busy: Busy):
    """(documents, the cache's generation before they were read) per batch of one streamed scan,
    each batch asked for only when no search is in flight, with a rest after it."""
    cursor = collection.find({}, projection, batch_size=WARM_BATCH)
    try:
        while True:
            while busy():
                await asyncio.sleep(IDLE_POLL_S)
            generation = cache.generation
            started = time.perf_counter()
            with pymongo.timeout(BATCH_TIMEOUT_S):
                docs = await cursor.to_list(WARM_BATCH)
            if not docs:
                return
            yield docs, generation
            await asyncio.sleep((time.perf_counter() - started) * (1 - DUTY) / DUTY)
    finally:
        await cursor.close()


async def warm_records(db: Database, cache: RecordCache, busy: Busy = lambda: False) -> int:
    """Fill `cache` with records (label, tags) until its capacity; returns how many it then holds."""
    async with contextlib.aclosing(_batches(db.images, SEARCH_FIELDS, cache, busy)) as batches:
        async for docs, generation in batches:
            if not cache.fill(docs, generation):
                break  # full: the cursor is closed on the way out
    return len(cache)


async def warm_thumbnails(db: Database, cache: ThumbnailCache, busy: Busy = lambda: False) -> int:
    """Fill `cache` with thumbnails until its byte budget; returns how many it then holds. A file
    whose chunks do not add up to its length (a delete in progress) is left out."""
    if cache.max_bytes <= 0:
        return 0
    files = db.db[f"{THUMBNAIL_BUCKET}.files"]
    chunks = db.db[f"{THUMBNAIL_BUCKET}.chunks"]
    lengths: dict[int, int] = {}
    async for docs, _ in _batches(files, {"length": 1}, cache, busy):
        lengths |= {int(d["_id"]): int(d["length"]) for d in docs if isinstance(d["_id"], int)}
    pieces: dict[int, dict[int, bytes]] = {}  # files of several chunks, read so far
    pieces_generation = cache.generation
    projection = {"_id": 0, "files_id": 1, "n": 1, "data": 1}
    async with contextlib.aclosing(_batches(chunks, projection, cache, busy)) as batches:
        async for docs, generation in batches:
            if generation != pieces_generation:  # an invalidation: pieces read before are suspect
                pieces.clear()
                pieces_generation = generation
            complete: dict[int, bytes] = {}
            for doc in docs:
                image_id = doc["files_id"]
                if not isinstance(image_id, int) or image_id not in lengths or image_id in cache:
                    continue
                numbered = pieces.setdefault(image_id, {})
                numbered[int(doc["n"])] = bytes(doc["data"])
                if sum(map(len, numbered.values())) == lengths[image_id]:
                    del pieces[image_id]
                    if sorted(numbered) == list(range(len(numbered))):
                        complete[image_id] = b"".join(numbered[n] for n in range(len(numbered)))
            if not cache.fill(complete, generation):
                break
    return len(cache)


async def keep_caches_warm(
    db: Database, records: RecordCache, thumbnails: ThumbnailCache, busy: Busy
) -> None:
    """Forever: warm each cache once its change stream is open, and again after each reopening."""
    warmers: list[tuple[FollowedCache, Callable[[], Awaitable[int]]]] = [
        (records, lambda: warm_records(db, records, busy))
    ]
    if thumbnails.max_bytes > 0:
        warmers.append((thumbnails, lambda: warm_thumbnails(db, thumbnails, busy)))
    retry_at = [0.0] * len(warmers)
    while True:
        for i, (cache, warm) in enumerate(warmers):
            cache.ensure_watching(db)
            opening = cache.openings
            if not cache.watching or cache.warmed_for == opening or time.monotonic() < retry_at[i]:
                continue
            started = time.monotonic()
            try:
                held = await warm()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away or the scan timed out: next time
                log.warning(
                    "%s warm-up failed (%s: %s); retrying in %.0f s",
                    type(cache).__name__, type(exc).__name__, exc, RETRY_S,
                )  # fmt: skip
                retry_at[i] = time.monotonic() + RETRY_S
                continue
            cache.warmed_for = opening
            took = time.monotonic() - started
            log.info("%s warmed: %d entries in %.1f s", type(cache).__name__, held, took)
        await asyncio.sleep(CHECK_S)
