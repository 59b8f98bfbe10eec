"""Shared fixtures: a real MongoDB-wire-protocol server over TCP for the whole session.

Uses MONGO_URI when set (e.g. a real mongod); otherwise starts SecantusDB as a child process on a
free port (in-memory storage) and waits for a ping. Each test gets its own database name.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient

from service.embedded_db import EmbeddedDatabase
from service.random_model import write_random_encoder


@pytest.fixture(scope="session")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised encoder file (ResNet-18 x0.25, small stem, 1 channel, 28 px)."""
    return write_random_encoder(tmp_path_factory.mktemp("encoder") / "model.pt", width=0.25)


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
