"""The index steps of the write order, shared by uploads, reconcile and `service.ingest`:
`store_and_index` writes records that carry the vectors already computed, then adds them to the
loaded index; `index_images` / `index_vectors` add records that exist already (pending, or indexed
by another model) and then mark them indexed with their vectors."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from service.catalogue import (
    Embedded,
    ImageMetadata,
    PreparedImage,
    StoredImage,
    mark_indexed,
    store_prepared_many,
)
from service.db import Database, chunked
from service.engine import Engine, Loaded
from service.imaging import model_input


def model_inputs(images: list[Image.Image], channels: int, size: int) -> torch.Tensor:
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
            model_inputs, [image for _, image in todo], encoder.in_channels, encoder.input_size
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
    return await _drop_deleted(engine, db, added)


async def store_and_index(
    engine: Engine,
    db: Database,
    loaded: Loaded | None,
    prepared: list[PreparedImage],
    metadata: list[ImageMetadata],
    vectors: np.ndarray | None,
) -> tuple[list[StoredImage], set[int]]:
    """Store validated images and index them; returns what was stored and the ids added to the
    index by this call. With `vectors` (NxD, row i for prepared[i], computed by `loaded`'s model)
    new records are written with their vectors, "indexed", and then added: inserts only, no update
    per record (an update costs SecantusDB 3-5x an insert). Records that existed already (the same
    bytes stored before, perhaps by a run killed before its index step) go through `index_vectors`.
    Without a model or vectors the records are written "pending" for reconcile to index."""
    if loaded is None or vectors is None:
        return await store_prepared_many(db, prepared, metadata), set()
    removals = engine.removals  # taken before the records exist: any delete of them runs after
    embedded = Embedded(vectors, loaded.model_version, loaded.version)
    stored = await store_prepared_many(db, prepared, metadata, embedded)
    new = [i for i, item in enumerate(stored) if item.created]
    old = [i for i, item in enumerate(stored) if not item.created]
    indexed: set[int] = set()
    if new:
        added = await engine.add(loaded, vectors[new], [stored[i].id for i in new])
        if added and engine.removals != removals:
            # A delete ran meanwhile: if it took one of these records before this add, its index
            # step found nothing to remove, so look the records up and take the deleted ones out.
            added = await _drop_deleted(engine, db, added)
        indexed |= set(added)
    if old:
        indexed |= set(await index_vectors(engine, db, loaded, [stored[i].id for i in old], vectors[old]))
    return stored, indexed


async def _drop_deleted(engine: Engine, db: Database, added: list[int]) -> list[int]:
    """Remove from the index the ids among `added` whose record is gone; returns the others."""
    still_there: set[int] = set()
    for chunk in chunked(added):
        still_there |= {int(d["_id"]) async for d in db.images.find({"_id": {"$in": chunk}}, {"_id": 1})}
    gone = [i for i in added if i not in still_there]
    if gone:
        await engine.remove(gone)
    return [i for i in added if i in still_there]
