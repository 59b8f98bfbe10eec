"""A lease in MongoDB that elects the one replica allowed to publish index versions.

One document per lease in the `leases` collection:
  {_id: "index-publisher", holder: "<host>:<pid>:<random>" | None, expires_at: <UTC>, term: <int>,
   acquired_at: <UTC>, renewed_at: <UTC>}

Every operation is one conditional `find_one_and_update`, atomic on the server:
  * renew:   filter {holder: me}                    -> push expires_at forward
  * acquire: filter {expires_at < now} (or no holder) -> holder = me, term + 1
so two replicas can never both win the same term. The document is created once, up front, with an
upsert of an expired lease (racing upserts of a missing document can both insert).

A holder trusts its lease for `ttl` seconds measured on its own monotonic clock from the moment it
*sent* the successful renewal, never from the server's reply, so it stops publishing before any
other replica can take over (given wall clocks that agree to well under the ttl; NTP is assumed).
The index store's CURRENT compare-and-switch under its lock is the second fence: even a paused
holder that wakes up late cannot overwrite a version someone else published.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection

LEASES = "leases"
PUBLISHER_LEASE = "index-publisher"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def replica_id() -> str:
    """Unique per process, readable in logs: host, pid and a random suffix (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Lease:
    collection: AsyncCollection
    name: str = PUBLISHER_LEASE
    holder: str = field(default_factory=replica_id)
    ttl_s: float = 10.0
    term: int | None = None  # the term we hold, None when we hold nothing
    _valid_until: float = 0.0  # monotonic deadline of our current term

    def held(self) -> bool:
        """True while our last successful renewal is younger than the ttl (local clock only)."""
        return self.term is not None and time.monotonic() < self._valid_until

    async def ensure_document(self) -> None:
        await self.collection.update_one(
            {"_id": self.name},
            {"$setOnInsert": {"holder": None, "expires_at": EPOCH, "term": 0}},
            upsert=True,
        )

    async def acquire_or_renew(self) -> bool:
        """Renew our lease, or take it over if it has expired. Returns whether we hold it now."""
        sent = time.monotonic()
        now = datetime.now(timezone.utc)
        expires = now + timedelta(seconds=self.ttl_s)
        document = await self.collection.find_one_and_update(
            {"_id": self.name, "holder": self.holder},
            {"$set": {"expires_at": expires, "renewed_at": now}},
            return_document=ReturnDocument.AFTER,
        )
        if document is None:
            document = await self.collection.find_one_and_update(
                {"_id": self.name, "$or": [{"expires_at": {"$lt": now}}, {"holder": None}]},
                {
                    "$set": {
                        "holder": self.holder,
                        "expires_at": expires,
                        "acquired_at": now,
                        "renewed_at": now,
                    },
                    "$inc": {"term": 1},
                },
                return_document=ReturnDocument.AFTER,
            )
        if document is None:
            self.term = None
            return False
        self.term = int(document["term"])
        self._valid_until = sent + self.ttl_s
        return True

    async def reclaim(self, timeout_s: float = 5.0) -> bool:
        """Whether we hold the lease, after one bounded renewal attempt if our local term has lapsed
        (renewals that ran late on a busy machine); it succeeds only for the holder or when the
        lease is free or expired, never against a live holder."""
        if self.held():
            return True
        try:
            async with asyncio.timeout(timeout_s):
                return await self.acquire_or_renew()
        except TimeoutError:
            return False

    async def release(self) -> None:
        """Give the lease up at once (clean shutdown) so another replica need not wait for expiry."""
        if self.term is None:
            return
        self.term = None
        await self.collection.update_one(
            {"_id": self.name, "holder": self.holder}, {"$set": {"holder": None, "expires_at": EPOCH}}
        )

    async def current(self) -> dict | None:
        """The lease document as the database has it (for /replication and tests)."""
        return await self.collection.find_one({"_id": self.name})
