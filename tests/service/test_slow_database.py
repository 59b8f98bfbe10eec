"""A database that is slow, not down, must not turn the operations it is still serving into errors.

The driver's heartbeat times out after its connect timeout and then clears the pool, cancelling
every operation in flight ("operation cancelled", a 503 for a request whose write may have taken
effect). Here the server answers the service's client (and only it: the failpoint is scoped to its
appName) 2.5 s late, heartbeats included, with heartbeats every 0.5 s and a server-selection (and
formerly heartbeat) limit of 1 s: the operations must finish, and a stopped server must still fail
fast.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from service.db import Database
from service.embedded_db import free_port, secantusd_executable, wait_for_ping

APP_NAME = "ssl-retrieval-service"  # the service's client, as Database.connect names it
LATE_MS = 2500


@pytest.fixture
def test_commands_server() -> Iterator[str]:
    """A SecantusDB of its own, with test commands (failpoints) enabled."""
    port = free_port()
    process = subprocess.Popen(
        [
            secantusd_executable(), "--host", "127.0.0.1", "--port", str(port), "--storage-path", ":memory:",
            "--enable-test-commands", "--log-level", "WARNING",
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    try:
        wait_for_ping(uri, process, 120)
        yield uri
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:  # SecantusDB's graceful stop can wedge (seen once in CI)
            process.kill()
            process.wait()


def test_a_slow_server_does_not_cancel_operations_in_flight(test_commands_server: str) -> None:
    uri = test_commands_server
    with MongoClient(uri, appname="test-admin") as admin:
        admin.slow.images.insert_many([{"_id": i} for i in range(1, 4)])

        async def scenario() -> None:
            db = Database.connect(f"{uri}&heartbeatFrequencyMS=500", "slow", 1000)
            try:
                assert await db.images.count_documents({}) == 3  # connected, server known
                admin.admin.command(
                    "configureFailPoint", "failCommand", mode="alwaysOn",
                    data={
                        "failCommands": ["hello", "isMaster", "find", "insert"], "appName": APP_NAME,
                        "blockConnection": True, "blockTimeMS": LATE_MS,
                    },
                )  # fmt: skip
                started = time.monotonic()
                found, _ = await asyncio.gather(
                    db.images.find({}, {"_id": 1}).to_list(),
                    db.images.insert_one({"_id": 4}),
                )
                assert time.monotonic() - started >= LATE_MS / 1000  # the failpoint did hold them
                assert {1, 2, 3} <= {d["_id"] for d in found}  # the insert ran alongside: 4 may be there
                admin.admin.command("configureFailPoint", "failCommand", mode="off")
                assert admin.slow.images.count_documents({}) == 4
            finally:
                await db.close()

        asyncio.run(scenario())


def test_a_stopped_server_still_fails_fast(tmp_path: Path) -> None:
    """The other side: connections refused mean down, and a request learns it within the
    server-selection limit, not after the long operation limit. The server is killed, not asked to
    stop: its graceful stop once took over 60 s in CI (inside SecantusDB), and refused connections
    are the same either way."""
    port = free_port()
    process = subprocess.Popen(
        [secantusd_executable(), "--host", "127.0.0.1", "--port", str(port), "--storage-path", str(tmp_path)],
        stdin=subprocess.DEVNULL,
    )
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"

    async def scenario() -> None:
        db = Database.connect(uri, "down", 300)
        try:
            assert await db.images.count_documents({}) == 0
            process.kill()
            process.wait(60)
            started = time.monotonic()
            with pytest.raises(PyMongoError):
                await db.images.find_one({"_id": 1})
            assert time.monotonic() - started < 10  # seconds, against the 30 s operation limit
        finally:
            await db.close()

    try:
        wait_for_ping(uri, process, 120)
        asyncio.run(scenario())
    finally:
        process.kill()
        process.wait(60)
