"""A 10k-image catalogue on the embedded server (the size `make run` loads): the start-up reconcile
finishes, repairs what it should, and the database's CPU returns to idle afterwards (no query
shape left spinning). The server is this test's own process, so its CPU time can be read."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
from pymongo import MongoClient
from service_helpers import running_service, service_settings, wait_until

from bench.catalogue_builder import build_catalogue
from service.embedded_db import EmbeddedDatabase

SIZE = 10_000
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, from /proc/PID/stat (fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_share(pid: int, window_s: float = 2.0) -> float:
    """Share of one core the process used over the next window_s seconds."""
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(window_s)  # the measurement window itself, not a wait for an event
    return (cpu_seconds(pid) - before) / (time.monotonic() - start)


def test_reconcile_of_10k_finishes_and_the_database_goes_idle(data_dir: Path, tmp_path: Path) -> None:
    database = EmbeddedDatabase(tmp_path / "db", durable=False)
    uri = database.start()
    try:
        built = build_catalogue(
            uri, "large", SIZE, data_dir / "index", data_dir / "model.pt", missing=20, stale=15, orphans=30
        )
        settings = service_settings(data_dir, uri, "large", ORPHAN_GRACE_SECONDS=60, MONGO_TIMEOUT_MS=2000)
        with running_service(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
            ready = wait_until(
                lambda: (
                    (r := client.get("/health/ready")).status_code == 200 and r.json()["reconciled"] and r
                ),
                timeout_s=300,
                what="the start-up reconcile of 10k records",
            )
            assert ready.json()["index_size"] == SIZE  # 20 embedded and added, 15 stale ids removed
            # The service answered during and after reconcile; a search by id works.
            hits = client.post("/search", json={"id": built.missing[0], "k": 3}).json()["results"]
            assert built.missing[0] in [h["id"] for h in hits]  # (ids sharing its bytes tie with it)
            assert client.get(f"/images/{built.missing[0]}").json()["status"] == "indexed"
            # The orphan sweep runs on its own, right after the start-up reconcile.
            wait_until(
                lambda: client.get("/health/ready").json()["orphan_sweep_seconds"] is not None,
                timeout_s=300,
                what="the first orphan sweep",
            )
            with MongoClient(uri) as mongo:
                db = mongo["large"]
                for bucket in ("content", "thumbnails"):
                    assert db[f"{bucket}.files"].count_documents({}) == SIZE  # the 30 orphans are gone
                    assert (
                        db[f"{bucket}.chunks"].count_documents({"files_id": {"$in": built.orphans[:20]}}) == 0
                    )
            # Nothing keeps the server busy once reconcile is done: its CPU falls back to idle.
            wait_until(
                lambda: cpu_share(database.pid) < 0.10,
                timeout_s=120,
                interval_s=0,
                what="the database's CPU to return to idle",
            )
    finally:
        database.stop()
