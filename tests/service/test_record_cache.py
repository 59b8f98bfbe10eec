"""service.record_cache against a real database: hits are served from memory, a change made by
another client is seen (change stream invalidation), and filters give what the database gives."""

from __future__ import annotations

import asyncio

from pymongo import MongoClient
from service_helpers import until

from service.db import Database
from service.record_cache import RecordCache


def test_cache_serves_hits_and_follows_changes_made_elsewhere(mongo_uri: str, mongo_db_name: str) -> None:
    with MongoClient(mongo_uri) as mongo:
        mongo[mongo_db_name].images.insert_many(
            [
                {"_id": 1, "label": "cat", "tags": ["a", "b"], "sha256": "1"},
                {"_id": 2, "label": "dog", "tags": ["a"], "sha256": "2"},
                {"_id": 3, "label": None, "tags": [], "sha256": "3"},
            ]
        )

        async def scenario() -> None:
            db = Database.connect(mongo_uri, mongo_db_name, 2000)
            cache = RecordCache()
            try:
                first = await cache.records(db, [1, 2, 3], {})
                assert {i: r["label"] for i, r in first.items()} == {1: "cat", 2: "dog", 3: None}

                async def warm() -> bool:  # served from memory once the change stream is open
                    before = cache.hits
                    await cache.records(db, [1, 2, 3], {})
                    return cache.hits == before + 3

                await until(warm, "the change stream to open and the cache to serve")

                # Filters on cached records agree with the database's own evaluation.
                for mongo_filter, expected in (
                    ({"label": "cat"}, [1]),
                    ({"tags": {"$all": ["a"]}}, [1, 2]),
                    ({"tags": {"$all": ["a", "b"]}}, [1]),
                    ({"label": {"$type": "string"}}, [1, 2]),
                    ({"label": "dog", "tags": {"$all": ["b"]}}, []),
                ):
                    hits_before = cache.hits
                    assert sorted(await cache.records(db, [1, 2, 3], mongo_filter)) == expected
                    assert cache.hits == hits_before + 3
                    database = mongo[mongo_db_name].images.find({"_id": {"$in": [1, 2, 3]}, **mongo_filter})
                    assert sorted(d["_id"] for d in database) == expected

                # Another client relabels record 1 and deletes record 2: the cache follows.
                mongo[mongo_db_name].images.update_one({"_id": 1}, {"$set": {"label": "lion"}})
                mongo[mongo_db_name].images.delete_one({"_id": 2})

                async def changed() -> bool:
                    found = await cache.records(db, [1, 2, 3], {})
                    return found.get(1, {}).get("label") == "lion" and 2 not in found

                await until(changed, "the update and the deletion to reach the cache")
                assert sorted(await cache.records(db, [1, 2, 3], {"label": "cat"})) == []
            finally:
                cache.stop()
                await db.close()

        asyncio.run(scenario())


def test_without_its_change_stream_the_cache_serves_nothing(mongo_uri: str, mongo_db_name: str) -> None:
    with MongoClient(mongo_uri) as mongo:
        mongo[mongo_db_name].images.insert_one({"_id": 7, "label": "cat", "tags": [], "sha256": "7"})

        async def scenario() -> None:
            db = Database.connect(mongo_uri, mongo_db_name, 2000)
            cache = RecordCache()
            try:
                cache._records[7] = {"_id": 7, "label": "stale", "tags": []}  # as if left from before
                assert not cache.watching
                found = await cache.records(db, [7], {})  # the stream is not open yet: database
                assert found[7]["label"] == "cat"
                # An unsupported filter always reads the database.
                assert await cache.records(db, [7], {"label": {"$in": ["cat"]}}) == {7: found[7]}
            finally:
                cache.stop()
                await db.close()

        asyncio.run(scenario())
