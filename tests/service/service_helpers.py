"""Helpers for the service tests: a tiny random encoder, Fashion-MNIST as PNG bytes, and the
service running under uvicorn on a free port in a background thread (real HTTP)."""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image

from service.__main__ import GRACEFUL_SHUTDOWN_S
from service.catalogue import Limits
from service.db import Database
from service.embedded_db import free_port
from service.engine import Engine, Loaded
from service.main import create_app
from service.random_model import write_random_encoder
from service.settings import Settings
from training.data.datasets import load_fashion_mnist


def make_tiny_encoder(path: Path, seed: int = 0) -> Path:
    """A randomly initialised ResNet-18 (width 1/4, small stem, 1 channel, 28 px) encoder file."""
    return write_random_encoder(path, width=0.25, seed=seed)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


_FMNIST: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}


def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images Nx28x28 uint8, labels N, class names), cached per process."""
    if split not in _FMNIST:
        dataset = load_fashion_mnist(split, 28)
        _FMNIST[split] = (dataset.images[:, 0].numpy(), dataset.labels.numpy(), list(dataset.class_names))
    return _FMNIST[split]


def fashion_mnist_pngs(start: int, count: int, split: str = "test") -> list[tuple[bytes, str]]:
    images, labels, names = fashion_mnist(split)
    return [(png_bytes(images[i]), names[int(labels[i])]) for i in range(start, start + count)]


def with_engine(
    settings: Settings, body: Callable[[Engine, Database, Loaded, Limits], Awaitable[Any]]
) -> Any:
    """Run `body` with an engine that loaded the current version, a prepared database and the
    upload limits, as the service's write paths get them (no HTTP); returns what `body` returns."""

    async def go() -> Any:
        engine = Engine(settings)
        db = Database.connect(settings.MONGO_URI, settings.MONGO_DB, settings.MONGO_TIMEOUT_MS)
        try:
            await db.prepare()
            await engine.load_current()
            limits = Limits(settings.MAX_UPLOAD_BYTES, settings.MAX_PIXELS, settings.THUMBNAIL_SIZE)
            return await body(engine, db, engine.require(), limits)
        finally:
            await db.close()
            engine.shutdown()

    return asyncio.run(go())


def service_settings(tmp_path: Path, mongo_uri: str | None, db_name: str, **overrides) -> Settings:
    values = {
        "MONGO_URI": mongo_uri,
        "MONGO_DB": db_name,
        "DATA_DIR": tmp_path,
        "RELOAD_POLL_SECONDS": 0.5,
        "PUBLISH_DEBOUNCE_SECONDS": 0.5,
        "MONGO_TIMEOUT_MS": 1000,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@contextmanager
def running_service(settings: Settings, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve the app over real HTTP on a free loopback port; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(  # shut down as `python -m service` does
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:  # uvicorn exposes no start event; poll its flag with a deadline
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    if thread.is_alive():  # say where the shutdown is stuck, not only what it left behind
        raise RuntimeError(f"the service did not stop within 60 s; its threads:\n{thread_stacks()}")


def thread_stacks() -> str:
    """Every thread's stack in this process, named."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )


@contextmanager
def service_client(settings: Settings) -> Iterator[httpx.Client]:
    """`running_service` with an httpx client on its base URL."""
    with running_service(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned) or fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


async def until(predicate, what: str, timeout_s: float = 20.0):
    """Await `predicate()` (async) until it returns a truthy value, or fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def upload(client: httpx.Client, items: list[tuple[bytes, str]], label: str | None = None, **form) -> dict:
    files = [("files", (name, data, "image/png")) for data, name in items]
    data = dict(form)
    if label is not None:
        data["label"] = label
    response = client.post("/images", files=files, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def upload_labelled(client: httpx.Client, items: list[tuple[bytes, str]], **form) -> list[int]:
    """Upload (bytes, label) items, 32 per request and one label per request; returns the new
    catalogue ids in the items' order."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for position, (_, label) in enumerate(items):
        by_label[label].append(position)
    ids = [0] * len(items)
    for label, positions in by_label.items():
        for start in range(0, len(positions), 32):
            chunk = positions[start : start + 32]
            reply = upload(client, [(items[p][0], f"fmnist-{p}.png") for p in chunk], label=label, **form)
            for position, item in zip(chunk, reply["items"], strict=True):
                ids[position] = item["id"]
    return ids


CATALOGUE_SIZE = 300


@dataclass
class Catalogue:
    client: httpx.Client
    ids: list[int]  # catalogue ids in Fashion-MNIST test-split order 0..CATALOGUE_SIZE-1
    labels: list[str]
    images: list[bytes]
    data_dir: Path
