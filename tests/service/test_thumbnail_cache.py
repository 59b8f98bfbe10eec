"""service.thumbnail_cache and the batched GridFS read under it, against a real database: the bytes
are GridFS's own (also for files of several chunks), hits come from memory once the change stream
is open, a delete made by another client evicts, half-deleted files are left out, and the memory
cap holds."""

from __future__ import annotations

import asyncio

from bson import Binary
from gridfs import GridFSBucket
from pymongo import MongoClient
from service_helpers import until

from service.catalogue import read_thumbnails
from service.db import THUMBNAIL_BUCKET, Database
from service.thumbnail_cache import ENTRY_OVERHEAD, Thumbnail, ThumbnailCache


def _png_like(image_id: int, size: int = 300) -> bytes:
    return bytes((image_id * 7 + i) % 251 for i in range(size))


def _store(mongo: MongoClient, name: str, files: dict[int, bytes], chunk_size: int = 255 * 1024) -> None:
    bucket = GridFSBucket(mongo[name], bucket_name=THUMBNAIL_BUCKET, chunk_size_bytes=chunk_size)
    for image_id, data in files.items():
        bucket.upload_from_stream_with_id(image_id, f"{image_id}.png", data)


def _store_in_bulk(mongo: MongoClient, name: str, files: dict[int, bytes]) -> None:
    """One-chunk files in GridFS's layout, written in two inserts (80 uploads are slow here)."""
    db = mongo[name]
    db[f"{THUMBNAIL_BUCKET}.files"].insert_many(
        [{"_id": i, "length": len(d), "chunkSize": 255 * 1024} for i, d in files.items()]
    )
    db[f"{THUMBNAIL_BUCKET}.chunks"].insert_many(
        [{"files_id": i, "n": 0, "data": Binary(d)} for i, d in files.items()]
    )


def test_batched_read_returns_gridfs_bytes_and_skips_half_deleted_files(
    mongo_uri: str, mongo_db_name: str
) -> None:
    small = {i: _png_like(i) for i in range(1, 81)}  # more than one `$in` chunk of ids
    large = {500: _png_like(500, 2500)}  # several GridFS chunks, written by GridFS itself
    with MongoClient(mongo_uri) as mongo:
        _store_in_bulk(mongo, mongo_db_name, small)
        _store(mongo, mongo_db_name, large, chunk_size=1000)
        mongo[mongo_db_name][f"{THUMBNAIL_BUCKET}.chunks"].delete_many({"files_id": 7})  # files doc stays
        mongo[mongo_db_name][f"{THUMBNAIL_BUCKET}.chunks"].delete_one({"files_id": 500, "n": 1})

        async def scenario() -> dict[int, bytes]:
            db = Database.connect(mongo_uri, mongo_db_name, 2000)
            try:
                return await read_thumbnails(db, [*small, 500, 501, 10**12])
            finally:
                await db.close()

        found = asyncio.run(scenario())
        assert found == {i: data for i, data in small.items() if i != 7}

        _store(mongo, mongo_db_name, {600: _png_like(600, 2500)}, chunk_size=1000)

        async def whole() -> dict[int, bytes]:
            db = Database.connect(mongo_uri, mongo_db_name, 2000)
            try:
                return await read_thumbnails(db, [600])
            finally:
                await db.close()

        assert asyncio.run(whole()) == {600: _png_like(600, 2500)}


def test_cache_serves_from_memory_and_forgets_what_another_client_deletes(
    mongo_uri: str, mongo_db_name: str
) -> None:
    files = {i: _png_like(i) for i in range(1, 6)}
    with MongoClient(mongo_uri) as mongo:
        _store(mongo, mongo_db_name, files)

        async def scenario() -> None:
            db = Database.connect(mongo_uri, mongo_db_name, 2000)
            cache = ThumbnailCache()
            try:
                first = await cache.thumbnails(db, [1, 2, 3, 99])
                assert {i: t.data for i, t in first.items()} == {i: files[i] for i in (1, 2, 3)}
                assert first[1].etag == Thumbnail.of(files[1]).etag and first[1].etag != first[2].etag

                async def warm() -> bool:  # from memory once the change stream is open
                    before = cache.hits
                    await cache.thumbnails(db, [1, 2, 3])
                    return cache.hits == before + 3

                await until(warm, "the change stream to open and the cache to serve")
                assert len(cache) == 3

                GridFSBucket(mongo[mongo_db_name], bucket_name=THUMBNAIL_BUCKET).delete(2)

                async def evicted() -> bool:
                    return 2 not in await cache.thumbnails(db, [1, 2, 3])

                await until(evicted, "the deletion to reach the cache")
                assert sorted(await cache.thumbnails(db, [1, 2, 3])) == [1, 3]
            finally:
                cache.stop()
                await db.close()

        asyncio.run(scenario())


def test_memory_cap_evicts_the_least_recently_used(mongo_uri: str, mongo_db_name: str) -> None:
    files = {i: _png_like(i, 1000) for i in range(1, 9)}
    cost = 1000 + ENTRY_OVERHEAD
    with MongoClient(mongo_uri) as mongo:
        _store(mongo, mongo_db_name, files)

        async def scenario() -> None:
            db = Database.connect(mongo_uri, mongo_db_name, 2000)
            cache = ThumbnailCache(max_bytes=3 * cost)
            try:

                async def serving() -> bool:
                    await cache.thumbnails(db, [1])
                    return cache.watching and len(cache) == 1

                await until(serving, "the change stream to open")
                await cache.thumbnails(db, [2, 3])
                await cache.thumbnails(db, [1])  # 1 is now the most recently used
                await cache.thumbnails(db, [4])
                assert cache.size == 3 * cost <= cache.max_bytes
                before = cache.hits
                assert sorted(await cache.thumbnails(db, [1, 3, 4])) == [1, 3, 4]
                assert cache.hits == before + 3  # 2 went first
                assert 2 in await cache.thumbnails(db, [2])  # read again from the database
                assert cache.size <= cache.max_bytes and len(cache) == 3
            finally:
                cache.stop()
                await db.close()

        asyncio.run(scenario())
