"""A bounded pipeline for storing many images: CPU work overlapped with database writes.

    prepare (worker threads)                      write (event loop, one batch at a time)
    read, decode, check, hash, thumbnail,   -->   GridFS bytes + thumbnails, then records that
    model input, embed the whole batch            carry their vectors, then index add

While batch n is written, batches n+1 .. n+depth are prepared in `workers` threads; at most
`depth + 1` batches exist at once (memory stays bounded whatever the number of images), and
batches are written in order. Each batch goes through the write order of
`indexing.store_and_index`, so a crash at any point leaves what a crash of `POST /images` leaves:
bytes without a record (removed by the orphan sweep), or a record with its vector not yet in the
index (added from that vector by reconcile or the next run).

Used by `python -m service.ingest`; `POST /images` writes its one batch (up to MAX_FILES_PER_REQUEST
files) through the same `store_and_index`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from service.catalogue import ImageMetadata, Limits, PreparedImage, StoredImage, prepare_image
from service.db import Database
from service.engine import Engine, Loaded
from service.imaging import ImageRejected, model_input
from service.indexing import store_and_index
from training.encoder import Encoder

T = TypeVar("T")


@dataclass
class Source:
    """One image to store: its name, its bytes (or an OSError when they cannot be read) and metadata."""

    name: str
    read: Callable[[], bytes]
    metadata: ImageMetadata


@dataclass
class PreparedBatch:
    sources: int  # how many sources this batch covered (for progress)
    prepared: list[PreparedImage] = field(default_factory=list)
    metadata: list[ImageMetadata] = field(default_factory=list)
    vectors: np.ndarray | None = None  # NxD, row i for prepared[i]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


@dataclass
class BatchResult:
    stored: list[StoredImage]
    indexed: set[int]
    skipped: list[tuple[str, str]]
    sources: int


def prepare_batch(sources: list[Source], limits: Limits, encoder: Encoder) -> PreparedBatch:
    """Everything a batch needs before the database (CPU work: runs in a worker thread)."""
    batch = PreparedBatch(len(sources))
    inputs = []
    for source in sources:
        try:
            prepared = prepare_image(source.read(), source.name, limits)
        except (OSError, ImageRejected) as exc:
            batch.skipped.append((source.name, str(exc).removeprefix(f"{source.name}: ")))
            continue
        batch.prepared.append(prepared)
        batch.metadata.append(source.metadata)
        inputs.append(model_input(prepared.decoded.image, encoder.in_channels, encoder.input_size))
    if inputs:
        batch.vectors = encoder.embed(torch.stack(inputs))  # NxD: one forward pass per batch
    return batch


async def write_batch(engine: Engine, db: Database, loaded: Loaded, batch: PreparedBatch) -> BatchResult:
    """The write order: bytes, records with their vectors, then the index."""
    if not batch.prepared:
        return BatchResult([], set(), batch.skipped, batch.sources)
    stored, indexed = await store_and_index(engine, db, loaded, batch.prepared, batch.metadata, batch.vectors)
    return BatchResult(stored, indexed, batch.skipped, batch.sources)


async def run_pipeline(
    engine: Engine,
    db: Database,
    loaded: Loaded,
    batches: Iterable[list[Source]],
    limits: Limits,
    executor: Executor,
    depth: int = 2,
    on_batch: Callable[[BatchResult], None] | None = None,
) -> None:
    """Prepare `batches` in `executor` (up to `depth` ahead) while writing them in order."""
    loop = asyncio.get_running_loop()
    remaining: Iterator[list[Source]] = iter(batches)
    in_flight: deque[asyncio.Future[PreparedBatch]] = deque()

    def submit_next() -> None:
        sources = next(remaining, None)
        if sources is not None:
            in_flight.append(loop.run_in_executor(executor, prepare_batch, sources, limits, loaded.encoder))

    for _ in range(max(1, depth)):
        submit_next()
    try:
        while in_flight:
            prepared = await in_flight.popleft()
            submit_next()  # keeps `depth` batches preparing while this one is written
            result = await write_batch(engine, db, loaded, prepared)
            if on_batch is not None:
                on_batch(result)
    finally:
        for future in in_flight:  # an error stops the pipeline: nothing more is written
            future.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
