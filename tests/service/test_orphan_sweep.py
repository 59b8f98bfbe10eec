"""The orphan sweep against a real database: it deletes the GridFS leftovers that no record owns
once they are past the grace period (files and chunks, both buckets) and nothing else: not a file
whose record exists, not a young one (an upload between its bytes and its record), not an id
allocated after it started. It walks the id space by point lookups and pauses between them so that
it keeps the database busy at most its duty share of the time."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest
from pymongo import MongoClient
from pymongo.asynchronous.collection import AsyncCollection

from service.catalogue import _gridfs_documents
from service.db import CONTENT_BUCKET, ID_CHUNK, THUMBNAIL_BUCKET, Database, paced_id_windows
from service.reconcile import sweep_orphans

BUCKETS = (CONTENT_BUCKET, THUMBNAIL_BUCKET)
OLD = datetime.now(timezone.utc) - timedelta(days=1)


async def _store_files(db: Database, ids: list[int], uploaded: datetime) -> None:
    """Bytes and thumbnail under each of `ids` in the service's GridFS layout, dated `uploaded`."""
    for bucket in BUCKETS:
        files, chunks = [], []
        for image_id in ids:
            file, parts = _gridfs_documents(image_id, f"{image_id}.png", b"png bytes", "image/png")
            files.append(file | {"uploadDate": uploaded})
            chunks += parts
        await db.db[f"{bucket}.files"].insert_many(files)
        await db.db[f"{bucket}.chunks"].insert_many(chunks)


def test_sweep_deletes_old_orphans_and_nothing_else(mongo_uri: str, mongo_db_name: str) -> None:
    async def scenario() -> None:
        db = Database.connect(mongo_uri, mongo_db_name, 5000)
        try:
            await db.prepare()
            # Spread over several windows, with whole windows of records between the orphans.
            ids = await db.allocate_ids(3 * ID_CHUNK + 10)
            orphans = [ids[0], ids[ID_CHUNK + 5], ids[-1]]  # old bytes, no record
            young = ids[2]  # an upload in progress: bytes written just now, no record yet
            owned = [i for i in ids if i not in orphans and i != young]
            await _store_files(db, [i for i in ids if i != young], OLD)
            await _store_files(db, [young], datetime.now(timezone.utc))
            await db.images.insert_many([{"_id": i, "sha256": str(i)} for i in owned])

            assert await sweep_orphans(db, timedelta(minutes=10), duty=1.0) == len(orphans)

            for name in BUCKETS:
                kept = {int(d["_id"]) async for d in db.db[f"{name}.files"].find({}, {"_id": 1})}
                assert kept == set(owned) | {young}, name
                chunk_owners = {
                    int(d["files_id"]) async for d in db.db[f"{name}.chunks"].find({}, {"files_id": 1})
                }
                assert chunk_owners == set(owned) | {young}, name
            # Its record arrives: the young upload is complete and a later sweep keeps it too.
            await db.images.insert_one({"_id": young, "sha256": str(young)})
            assert await sweep_orphans(db, timedelta(0), duty=1.0) == 0
            assert await db.content.open_download_stream(young) is not None
        finally:
            await db.close()

    asyncio.run(scenario())


def test_sweep_keeps_a_file_whose_record_arrives_during_the_walk(
    mongo_uri: str, mongo_db_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old file whose record is written while the sweep runs (a slow upload retried past the
    grace period): the record is re-checked just before the delete. Another client writes the
    record at the moment the sweep looks up the files' age."""

    async def scenario() -> None:
        db = Database.connect(mongo_uri, mongo_db_name, 5000)
        try:
            await db.prepare()
            [late, orphan] = await db.allocate_ids(2)
            await _store_files(db, [late, orphan], OLD)
            with MongoClient(mongo_uri) as other:
                real_find = AsyncCollection.find

                def find_and_race(self: AsyncCollection, *args, **kwargs):
                    if self.name == f"{THUMBNAIL_BUCKET}.files":  # the age lookup of the last bucket
                        other[mongo_db_name].images.update_one(
                            {"_id": late}, {"$setOnInsert": {"sha256": "late"}}, upsert=True
                        )
                    return real_find(self, *args, **kwargs)

                monkeypatch.setattr(AsyncCollection, "find", find_and_race)
                assert await sweep_orphans(db, timedelta(minutes=10), duty=1.0) == 1
                monkeypatch.undo()
            left = {int(d["_id"]) async for d in db.db[f"{CONTENT_BUCKET}.files"].find({}, {"_id": 1})}
            assert left == {late}
        finally:
            await db.close()

    asyncio.run(scenario())


def test_id_windows_cover_the_allocated_ids_and_pause_for_their_duty(
    mongo_uri: str, mongo_db_name: str
) -> None:
    async def scenario() -> None:
        db = Database.connect(mongo_uri, mongo_db_name, 5000)
        try:
            await db.prepare()
            allocated = await db.allocate_ids(2 * ID_CHUNK + 3)
            duty, busy = 0.25, 0.02
            windows, gaps = [], []
            resumed = None
            async for window in paced_id_windows(db, duty):
                if resumed is not None:
                    gaps.append(time.monotonic() - resumed)
                windows.append(window)
                time.sleep(busy)  # the caller's work on the window (blocking: measured as busy)
                resumed = time.monotonic()
            await db.allocate_ids(5)  # allocated after the walk began: a later walk covers them
            assert [i for w in windows for i in w] == allocated
            assert max(len(w) for w in windows) == ID_CHUNK
            # After `busy` seconds of work, a pause of busy * (1 - duty) / duty before the next
            # window (asyncio may wake up to one clock tick early).
            assert len(gaps) == len(windows) - 1
            assert min(gaps) >= busy * (1 - duty) / duty - 0.005
            with pytest.raises(ValueError, match="duty"):
                async for _ in paced_id_windows(db, 0.0):
                    pass
        finally:
            await db.close()

    asyncio.run(scenario())
