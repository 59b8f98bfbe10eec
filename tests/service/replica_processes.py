"""Service replicas as real `python -m service` processes (for change streams, the lease, kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pymongo import MongoClient
from service_helpers import wait_until

from service.embedded_db import free_port

ROOT = Path(__file__).resolve().parents[2]


def require_change_streams(mongo_uri: str) -> None:
    """Change streams need a replica set (SecantusDB is a one-node one; a standalone mongod is not)."""
    client: MongoClient = MongoClient(mongo_uri, serverSelectionTimeoutMS=2000)
    try:
        if not client.admin.command("hello").get("setName"):
            pytest.skip("MONGO_URI is a standalone server: change streams need a replica set")
    finally:
        client.close()


@dataclass
class Replica:
    name: str
    process: subprocess.Popen
    url: str
    log: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def replication(self) -> dict:
        return self.client.get("/replication").json()

    def top_id(self, png: bytes) -> int | None:
        """The best match for an image on this replica (None when its index is empty)."""
        reply = self.client.post("/search", files={"file": ("q.png", png, "image/png")}, data={"k": "1"})
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        return results[0]["id"] if results else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self.client.close()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@dataclass
class ReplicaSet:
    """Starts replicas on one database and one DATA_DIR (so one index store); stops them all."""

    mongo_uri: str
    db_name: str
    data_dir: Path
    running: list[Replica] = field(default_factory=list)

    def start(self, name: str, **settings: str | float) -> Replica:
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "MONGO_URI": self.mongo_uri,
            "MONGO_DB": self.db_name,
            "DATA_DIR": str(self.data_dir),
            "REPLICA_ID": name,
            "RELOAD_POLL_SECONDS": "0.5",
            "PUBLISH_DEBOUNCE_SECONDS": "0.5",
            "PUBLISHER_LEASE_SECONDS": "2",
            "INDEX_KEEP_VERSIONS": "100",
            "INFERENCE_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            **{key: str(value) for key, value in settings.items()},
        }
        log = self.data_dir / f"replica-{name}-{port}.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "service", "--port", str(port), "--log-level", "info"],
                cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        replica = Replica(name, process, f"http://127.0.0.1:{port}", log)
        self.running.append(replica)

        def ready() -> bool:
            if process.poll() is not None:
                tail = replica.log_tail()
                raise AssertionError(f"replica {name} exited with {process.returncode}:\n{tail}")
            try:
                return replica.client.get("/health/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout_s=120, interval_s=0.2, what=f"replica {name} to be ready")
        return replica

    def stop_all(self) -> None:
        for replica in self.running:
            if replica.process.poll() is None:
                replica.kill(signal.SIGTERM)
        self.running.clear()
