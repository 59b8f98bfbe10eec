"""Shared fixtures: a real MongoDB-wire-protocol server over TCP for the whole session.

Uses MONGO_URI when set (e.g. a real mongod); otherwise starts SecantusDB as a child process on a
free port (in-memory storage) and waits for a ping. Each test gets its own database name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient

from service.embedded_db import EmbeddedDatabase, free_port
from service.random_model import write_random_encoder
from training.inference import write_inference_encoder


@pytest.fixture(scope="session")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised encoder file (ResNet-18 x0.25, small stem, 1 channel, 28 px), with
    its deploy form beside it (`encoder_files.install_encoder` copies both)."""
    path = write_random_encoder(tmp_path_factory.mktemp("encoder") / "model.pt", width=0.25)
    write_inference_encoder(path, None)
    return path


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    uri = os.environ.get("MONGO_URI")
    if uri:
        yield uri
        return
    server = EmbeddedDatabase(":memory:")
    try:
        yield server.start()
    finally:
        server.stop()


# The longest test files first: `make test` runs two pytest-xdist workers that take whole files
# (--dist loadfile) in collection order, so the long ones start early instead of leaving one worker
# alone on them at the end. Measured with --durations on the 2-core machine.
LONGEST_FILES = (
    "refresh/test_refresh.py",
    "training/test_distributed_engine.py",
    "training/test_engine.py",
    "service/test_crash_consistency.py",
    "service/test_supervision.py",
    "training/test_distributed_methods.py",
    "service/test_replicas.py",
    "training/test_embed.py",
    "service/test_large_catalogue.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((n for n, name in enumerate(LONGEST_FILES) if path.endswith(name)), len(LONGEST_FILES))

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


def _unique_db_name() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


def _drop(uri: str, name: str) -> None:
    client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=2000)
    try:
        client.drop_database(name)
    except Exception:  # best effort: the server may be the one a test just stopped
        pass
    finally:
        client.close()


@pytest.fixture
def mongo_db_name(mongo_uri: str) -> Iterator[str]:
    """A fresh database name for one test, dropped afterwards."""
    name = _unique_db_name()
    yield name
    _drop(mongo_uri, name)


@pytest.fixture(scope="module")
def module_db_name(mongo_uri: str) -> Iterator[str]:
    """A fresh database name shared by one test module (for an expensive catalogue)."""
    name = _unique_db_name()
    yield name
    _drop(mongo_uri, name)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server (real HTTP, conditional writes) on a free port, with bucket `index-store`."""
    boto3 = pytest.importorskip("boto3", reason="boto3 is a dev dependency (make setup installs it)")
    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency (make setup installs it)")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                client.create_bucket(Bucket="index-store")
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # polling a starting server's port, bounded by the deadline
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
