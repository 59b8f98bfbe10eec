"""Embedding catalogue images and adding them to the loaded index (after their record exists),
then marking them indexed: the last two steps of the write order, shared by uploads, reconcile
and `service.ingest`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from service.catalogue import mark_indexed
from service.db import Database
from service.engine import Engine, Loaded
from service.imaging import model_input


def _model_inputs(images: list[Image.Image], channels: int, size: int) -> torch.Tensor:
    return torch.stack([model_input(image, channels, size) for image in images])  # NxCxSxS uint8


async def index_images(
    engine: Engine, db: Database, loaded: Loaded, ids: list[int], images: list[Image.Image]
) -> list[int]:
    """Embed + add the images whose ids are not in the index yet; returns the ids added (and still
    catalogued: a record deleted meanwhile is taken out of the index again)."""
    if not ids:
        return []
    unique = dict(zip(ids, images, strict=True))  # one batch may name the same record twice
    ids, images = list(unique), list(unique.values())
    present = await engine.run_in_thread(loaded.index.contains, ids)
    todo = [(i, image) for i, image, p in zip(ids, images, present.tolist(), strict=True) if not p]
    if not todo:
        return []
    encoder = loaded.encoder
    with engine.indexing([i for i, _ in todo]):  # the change-stream watcher waits instead of re-embedding
        batch = await engine.run_in_thread(
            _model_inputs, [image for _, image in todo], encoder.in_channels, encoder.input_size
        )
        vectors = await engine.embed(loaded, batch)  # NxD
        return await index_vectors(engine, db, loaded, [i for i, _ in todo], vectors)


async def index_vectors(
    engine: Engine, db: Database, loaded: Loaded, ids: list[int], vectors: np.ndarray
) -> list[int]:
    """Add already computed vectors (rows of NxD `vectors`) for the ids not in the index yet, then
    mark their records indexed with their vectors (what other replicas add instead of embedding
    again); returns the ids added and still catalogued. One round trip when no
    record vanished meanwhile: the update matches only existing records, and only when it matched
    fewer than it was given are the missing ones looked up and taken out of the index again."""
    rows = {image_id: row for row, image_id in enumerate(ids)}  # one batch may name a record twice
    added = await engine.add(loaded, vectors[list(rows.values())], list(rows))
    if not added:
        return []
    added_rows = vectors[[rows[i] for i in added]]  # NxD, row i for added[i]
    matched = await mark_indexed(db, added, loaded.model_version, loaded.version, added_rows)
    if matched == len(added):
        return added
    still_there = {int(d["_id"]) async for d in db.images.find({"_id": {"$in": added}}, {"_id": 1})}
    gone = [i for i in added if i not in still_there]
    if gone:
        await engine.remove(gone)
    return [i for i in added if i in still_there]
