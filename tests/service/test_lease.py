"""The publisher lease against a real MongoDB-wire-protocol server: one holder per term, renewal,
takeover only after expiry, release, and a race of many contenders with exactly one winner."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from pymongo import AsyncMongoClient

from service.lease import LEASES, Lease


async def _with_collection(mongo_uri: str, db_name: str, body) -> None:
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True)
    try:
        await body(client[db_name][LEASES])
    finally:
        await client.close()


def test_one_holder_renewal_expiry_takeover_and_release(mongo_uri: str, mongo_db_name: str) -> None:
    async def body(collection) -> None:
        a, b = Lease(collection, holder="a", ttl_s=30), Lease(collection, holder="b", ttl_s=30)
        await a.ensure_document()
        await b.ensure_document()  # idempotent: the second upsert finds the document
        assert await a.acquire_or_renew() and a.held() and a.term == 1
        assert not await b.acquire_or_renew() and not b.held() and b.term is None
        assert await a.acquire_or_renew() and a.term == 1  # a renewal keeps the term
        # The holder stops renewing (e.g. killed): once the stored expiry has passed, b takes over.
        past = datetime.now(timezone.utc) - timedelta(seconds=1)
        await collection.update_one({"_id": a.name}, {"$set": {"expires_at": past}})
        assert await b.acquire_or_renew() and b.term == 2
        assert not await a.acquire_or_renew() and not a.held()  # a's renewal now fails
        document = await b.current()
        assert document["holder"] == "b" and document["term"] == 2
        await b.release()
        assert not b.held()
        assert await a.acquire_or_renew() and a.term == 3  # free at once after a release

    asyncio.run(_with_collection(mongo_uri, mongo_db_name, body))


def test_local_validity_ends_after_the_ttl(mongo_uri: str, mongo_db_name: str) -> None:
    async def body(collection) -> None:
        lease = Lease(collection, holder="short", ttl_s=0.3)
        await lease.ensure_document()
        assert await lease.acquire_or_renew() and lease.held()
        await asyncio.sleep(0.4)  # the lease's own ttl elapsing is the thing under test
        assert not lease.held()  # no renewal within the ttl: no longer trusted to publish

    asyncio.run(_with_collection(mongo_uri, mongo_db_name, body))


def test_racing_contenders_elect_exactly_one(mongo_uri: str, mongo_db_name: str) -> None:
    async def body(collection) -> None:
        for round_number in range(1, 4):  # new contenders each round (a holder may renew its own)
            contenders = [Lease(collection, holder=f"r{round_number}-{i}", ttl_s=30) for i in range(8)]
            await contenders[0].ensure_document()
            results = await asyncio.gather(*(c.acquire_or_renew() for c in contenders))
            winners = [c.holder for c, won in zip(contenders, results, strict=True) if won]
            assert len(winners) == 1, winners
            document = await contenders[0].current()
            assert document["term"] == round_number and document["holder"] == winners[0]
            await collection.update_one(
                {"_id": contenders[0].name}, {"$set": {"expires_at": datetime.now(timezone.utc)}}
            )  # expire it for the next round

    asyncio.run(_with_collection(mongo_uri, mongo_db_name, body))


def test_a_lapsed_local_term_is_reclaimed_unless_someone_else_took_the_lease(
    mongo_uri: str, mongo_db_name: str
) -> None:
    async def body(collection) -> None:
        a = Lease(collection, holder="a", ttl_s=0.3)
        await a.ensure_document()
        assert await a.acquire_or_renew() and a.term == 1
        await asyncio.sleep(0.4)  # renewals that ran late: the local term has lapsed
        assert not a.held()
        assert await a.reclaim() and a.held() and a.term in (1, 2)  # no one else holds it: ours again
        await asyncio.sleep(0.4)
        b = Lease(collection, holder="b", ttl_s=30)
        assert await b.acquire_or_renew()  # a's term expired in the database too: b takes over
        assert not await a.reclaim() and not a.held()  # never against a live holder
        assert (await b.current())["holder"] == "b"

    asyncio.run(_with_collection(mongo_uri, mongo_db_name, body))
