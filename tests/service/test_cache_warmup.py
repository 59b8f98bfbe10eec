"""The search caches filled ahead of searches, against a real database: the background warm-up
(service.cache_warmup) reads records and thumbnails up to the caches' budgets, with GridFS's own
bytes, and its entries are invalidated like any other; through the running service, an uploaded
image's thumbnail is in memory from its upload on, and a delete or a metadata change made
afterwards is what searches and thumbnail reads see."""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
from gridfs import GridFSBucket
from pymongo import MongoClient
from service_helpers import fashion_mnist_pngs, until, upload, wait_until
from test_thumbnail_cache import _png_like, _store, _store_in_bulk

from service.cache_warmup import WARM_BATCH, warm_records, warm_thumbnails
from service.db import THUMBNAIL_BUCKET, Database
from service.record_cache import RecordCache
from service.thumbnail_cache import ENTRY_OVERHEAD, ThumbnailCache


async def _watching(db: Database, cache: RecordCache | ThumbnailCache) -> None:
    cache.ensure_watching(db)

    async def opened() -> bool:
        return cache.watching

    await until(opened, "the cache's change stream to open")


def test_records_warm_up_to_capacity_and_follow_changes(mongo_uri: str, mongo_db_name: str) -> None:
    count = WARM_BATCH + 44  # more than one batch
    with MongoClient(mongo_uri) as mongo:
        images = mongo[mongo_db_name].images
        images.insert_many(
            [{"_id": i, "label": f"c{i % 3}", "tags": ["t"], "sha256": str(i)} for i in range(1, count + 1)]
        )

        async def scenario() -> None:
            db = Database.connect(mongo_uri, mongo_db_name, 5000)
            everything, small = RecordCache(), RecordCache(capacity=100)
            try:
                for cache in (everything, small):
                    await _watching(db, cache)
                assert await warm_records(db, everything) == count
                assert await warm_records(db, small) == 100  # stops at its capacity
                assert len(small) == 100 and all(i in range(1, count + 1) for i in small._records)

                found = await everything.records(db, [1, 2, count], {})
                assert everything.misses == 0 and everything.hits == 3  # no database read
                assert {i: r["label"] for i, r in found.items()} == {1: "c1", 2: "c2", count: f"c{count % 3}"}

                # Another client relabels 1 and deletes 2 after the warm-up: the cache follows.
                images.update_one({"_id": 1}, {"$set": {"label": "lion"}})
                images.delete_one({"_id": 2})

                async def changed() -> bool:
                    found = await everything.records(db, [1, 2], {})
                    return found.get(1, {}).get("label") == "lion" and 2 not in found

                await until(changed, "the update and the delete to reach the warmed cache")
            finally:
                everything.stop()
                small.stop()
                await db.close()

        asyncio.run(scenario())


def test_thumbnails_warm_up_within_the_byte_budget(mongo_uri: str, mongo_db_name: str) -> None:
    small = {i: _png_like(i) for i in range(1, WARM_BATCH + 21)}  # more than one batch of chunks
    large = {900: _png_like(900, 2500), 901: _png_like(901, 2500)}  # several chunks each
    with MongoClient(mongo_uri) as mongo:
        _store_in_bulk(mongo, mongo_db_name, small)
        _store(mongo, mongo_db_name, large, chunk_size=1000)
        chunks = mongo[mongo_db_name][f"{THUMBNAIL_BUCKET}.chunks"]
        chunks.delete_one({"files_id": 901, "n": 1})  # half deleted: never served
        chunks.delete_many({"files_id": 7})
        stored = {i: d for i, d in {**small, **large}.items() if i not in (7, 901)}

        async def scenario() -> None:
            db = Database.connect(mongo_uri, mongo_db_name, 5000)
            everything = ThumbnailCache()
            budget = 50 * (300 + ENTRY_OVERHEAD)
            capped = ThumbnailCache(max_bytes=budget)
            try:
                for cache in (everything, capped):
                    await _watching(db, cache)
                assert await warm_thumbnails(db, everything) == len(stored)
                held = await everything.thumbnails(db, list(stored))
                assert everything.misses == 0  # all from memory
                assert {i: t.data for i, t in held.items()} == stored

                assert await warm_thumbnails(db, capped) == 50  # stops at its byte budget
                assert capped.size <= budget
                kept = list(capped._thumbnails)
                assert all(capped._thumbnails[i].data == stored[i] for i in kept)
                # Warmed entries are the least recently used: a search's thumbnails push them out.
                await capped.thumbnails(db, [900])
                assert 900 in capped and capped.size <= budget and len(capped) < 51

                GridFSBucket(mongo[mongo_db_name], bucket_name=THUMBNAIL_BUCKET).delete(3)

                async def evicted() -> bool:
                    return 3 not in await everything.thumbnails(db, [3])

                await until(evicted, "the deletion to reach the warmed cache")
            finally:
                everything.stop()
                capped.stop()
                await db.close()

        asyncio.run(scenario())


def test_a_warm_up_batch_read_across_an_invalidation_is_not_kept(mongo_uri: str, mongo_db_name: str) -> None:
    with MongoClient(mongo_uri) as mongo:
        mongo[mongo_db_name].images.insert_many(
            [{"_id": i, "label": "old", "tags": [], "sha256": str(i)} for i in range(1, 11)]
        )

        async def scenario() -> None:
            db = Database.connect(mongo_uri, mongo_db_name, 5000)
            cache = RecordCache()
            try:
                await _watching(db, cache)
                generation = cache.generation
                stale = [{"_id": 1, "label": "old", "tags": []}]
                cache.invalidate([1])  # what the change stream does when record 1 changes meanwhile
                assert cache.fill(stale, generation)  # refused silently: the warm-up goes on
                assert 1 not in cache
            finally:
                cache.stop()
                await db.close()

        asyncio.run(scenario())


def _cache_counts(client: httpx.Client, cache: str) -> tuple[float, float]:
    text = client.get("/metrics").text
    counts = dict(re.findall(rf'^cache_(hits|misses)\{{cache="{cache}"\}} (\S+)$', text, re.M))
    return float(counts["hits"]), float(counts["misses"])


def test_an_upload_is_served_from_memory_and_deletes_and_updates_are_seen(start_service) -> None:
    (first, label), (second, _) = fashion_mnist_pngs(0, 2)
    with start_service() as client:
        wait_until(lambda: client.get("/health/ready").json().get("caches_warm"), what="warm caches")
        image_id = upload(client, [(first, "a.png")], label=label)["ids"][0]
        other_id = upload(client, [(second, "b.png")], label="other")["ids"][0]

        hits, misses = _cache_counts(client, "thumbnails")
        reply = client.get(f"/images/{image_id}/thumbnail")
        assert reply.status_code == 200 and reply.content.startswith(b"\x89PNG")
        assert _cache_counts(client, "thumbnails") == (hits + 1, misses)  # no database read

        hits, misses = _cache_counts(client, "thumbnails")
        reply = client.post("/search", json={"id": image_id, "k": 2, "thumbnails": 2})
        # Where the request's time went, for browsers' dev tools and Resource Timing.
        assert re.fullmatch(r"body;dur=[0-9.]+, app;dur=[0-9.]+", reply.headers["server-timing"])
        found = reply.json()["results"]
        assert {r["id"]: r["label"] for r in found} == {image_id: label, other_id: "other"}
        assert all(r["thumbnail_data_url"].startswith("data:image/png;base64,") for r in found)
        assert _cache_counts(client, "thumbnails") == (hits + 2, misses)

        # The same bytes uploaded again with a new label: searches show it (the change stream).
        upload(client, [(first, "a.png")], label="relabelled")

        def relabelled() -> bool:
            results = client.post("/search", json={"id": other_id, "k": 2}).json()["results"]
            return {r["id"]: r["label"] for r in results}.get(image_id) == "relabelled"

        wait_until(relabelled, what="the new label in search results")

        assert client.delete(f"/images/{image_id}").status_code == 200
        assert client.get(f"/images/{image_id}/thumbnail").status_code == 404
        results = client.post("/search", json={"id": other_id, "k": 2, "thumbnails": 2}).json()["results"]
        assert [r["id"] for r in results] == [other_id]


def test_a_follower_ends_quietly_when_its_database_client_is_closed(mongo_uri, mongo_db_name, caplog) -> None:
    """A service's shutdown closes the client while the followers still run: a closed client never
    reopens, so the follower ends instead of logging a lost stream and retrying forever."""
    caplog.set_level(logging.INFO, logger="service.followed_cache")

    async def scenario() -> None:
        db = Database.connect(mongo_uri, mongo_db_name, 5000)
        cache = RecordCache()
        try:
            await _watching(db, cache)
            task = cache._task
            assert task is not None
        finally:
            await db.close()

        async def ended() -> bool:
            return task.done()

        await until(ended, "the follower to end after its client closed")
        assert not task.cancelled() and task.exception() is None and not cache.watching

    asyncio.run(scenario())
    assert not [r.getMessage() for r in caplog.records if " off (" in r.getMessage()]
