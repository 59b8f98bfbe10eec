"""The service as a real process (`python -m service`), for tests that kill it with real signals,
and the consistency checks that follow a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import httpx
import numpy as np
from pymongo import MongoClient
from service_helpers import wait_until

from index.store import IndexStore
from service.embedded_db import free_port


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it no longer holds anything but its pid)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


class ServiceProcess:
    """`python -m service` on a free port with DATA_DIR and settings from `env`; its log is kept."""

    def __init__(self, data_dir: Path, **env: str | float | None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {**os.environ, "DATA_DIR": str(data_dir), "PORT": str(self.port)}
        for key, value in env.items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = str(value)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = data_dir / f"service-{self.port}.log"

    def start(self, ready_timeout_s: float = 300) -> ServiceProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "--log-level", "info"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(
                self.ready, timeout_s=ready_timeout_s, interval_s=0.2, what=f"the service (log: {self.log})"
            )
        except BaseException:
            self.stop()  # never leave a half-started service (and its database) behind
            raise
        return self

    def ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"the service exited with {self.process.returncode}: {self.log.read_text()[-3000:]}"
            )
        try:
            return httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def reconciled(self) -> bool:
        try:
            body = httpx.get(f"{self.url}/health/ready", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(body.get("reconciled")) and body.get("orphan_sweep_seconds") is not None

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def embedded_db(self) -> dict:
        return json.loads((self.data_dir / "db.json").read_text())


def catalogue_state(uri: str, db_name: str) -> dict[str, set[int]]:
    """Ids of records, of each bucket's files documents and of its chunks' files."""
    with MongoClient(uri) as mongo:
        db = mongo[db_name]
        state = {"records": {int(d["_id"]) for d in db.images.find({}, {"_id": 1})}}
        for bucket in ("content", "thumbnails"):
            state[f"{bucket}.files"] = {int(d["_id"]) for d in db[f"{bucket}.files"].find({}, {"_id": 1})}
            state[f"{bucket}.chunks"] = {
                int(d["files_id"]) for d in db[f"{bucket}.chunks"].find({}, {"files_id": 1})
            }
    return state


def assert_consistent(
    uri: str, db_name: str, data_dir: Path, present: Iterable[int] = (), gone: Iterable[int] = ()
) -> dict[str, set[int]]:
    """After a crash, a restart, reconcile and the clean-up window (service stopped, so its last
    changes are published): nothing half-present, the published index holds exactly the records,
    every acknowledged upload is there and every acknowledged delete is gone everywhere."""
    state = catalogue_state(uri, db_name)
    records = state["records"]
    for name, ids in state.items():
        assert ids == records, (
            f"{name} differs from the records: "
            f"extra {sorted(ids - records)[:10]}, missing {sorted(records - ids)[:10]}"
        )
    index_ids = set(IndexStore(data_dir / "index").load().ids().astype(np.int64).tolist())
    assert index_ids == records, (
        f"index extra {sorted(index_ids - records)[:10]}, missing {sorted(records - index_ids)[:10]}"
    )
    assert set(present) <= records, f"acknowledged uploads lost: {sorted(set(present) - records)[:10]}"
    assert not set(gone) & records, f"acknowledged deletes still there: {sorted(set(gone) & records)[:10]}"
    return state
