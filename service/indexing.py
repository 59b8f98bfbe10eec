"""Embedding catalogue images and adding them to the loaded index (after their record exists),
then marking them indexed: the last two steps of the write order, shared by uploads, reconcile
and `service.ingest`."""

from __future__ import annotations

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
    batch = await engine.run_in_thread(
        _model_inputs, [image for _, image in todo], encoder.in_channels, encoder.input_size
    )
    vectors = await engine.embed(loaded, batch)  # NxD
    added = await engine.add(loaded, vectors, [i for i, _ in todo])
    if not added:
        return []
    still_there = {int(d["_id"]) async for d in db.images.find({"_id": {"$in": added}}, {"_id": 1})}
    gone = [i for i in added if i not in still_there]
    if gone:
        await engine.remove(gone)
    kept = [i for i in added if i in still_there]
    await mark_indexed(db, kept, loaded.model_version, loaded.version)
    return kept
