"""Reconcile the catalogue with the loaded index; run at start-up and after every swap.

The index's own id set is the truth about what is indexed:
  * records not in the index (pending, indexed before a crash, added while a refresh built the new
    version) are embedded from their stored bytes and added, then marked indexed;
  * index ids without a record (deleted, or a crash between record delete and index remove) are removed;
  * GridFS files without a record older than a grace period (a crash between the bytes and the
    record) are deleted; a record whose bytes are gone cannot be embedded and is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from tqdm import tqdm

from service.catalogue import INDEXED, delete_files, mark_indexed, read_file
from service.db import Database
from service.engine import Engine, Loaded
from service.imaging import ImageRejected, decode_image
from service.indexing import index_images

log = logging.getLogger("service.reconcile")
BATCH = 64
ORPHAN_GRACE = timedelta(minutes=10)  # an upload in progress has bytes but no record for a moment


@dataclass
class ReconcileReport:
    added: int = 0
    removed: int = 0
    marked_indexed: int = 0
    orphan_files_deleted: int = 0
    unreadable: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"added {self.added}, removed {self.removed} stale ids, marked {self.marked_indexed} indexed, "
            f"deleted {self.orphan_files_deleted} orphan files, {len(self.unreadable)} unreadable"
        )


async def reconcile(engine: Engine, db: Database) -> ReconcileReport | None:
    loaded = engine.loaded
    if loaded is None:
        return None
    report = ReconcileReport()
    index_ids = set((await engine.run_in_thread(loaded.index.ids)).tolist())
    record_status = {int(d["_id"]): d.get("status") async for d in db.images.find({}, {"status": 1})}

    stale = sorted(index_ids - record_status.keys())
    report.removed = await engine.remove(stale) if stale else 0

    indexed_but_pending = [i for i, s in record_status.items() if i in index_ids and s != INDEXED]
    await mark_indexed(db, indexed_but_pending, loaded.model_version, loaded.version)
    report.marked_indexed = len(indexed_but_pending)

    missing = sorted(i for i in record_status if i not in index_ids)
    with tqdm(total=len(missing), desc="reconcile", unit="img", disable=len(missing) < BATCH) as progress:
        for start in range(0, len(missing), BATCH):
            chunk = missing[start : start + BATCH]
            report.added += await _embed_and_add(engine, db, loaded, chunk, report)
            progress.update(len(chunk))

    report.orphan_files_deleted = await _delete_orphan_files(db)
    if (
        report.added
        or report.removed
        or report.marked_indexed
        or report.orphan_files_deleted
        or report.unreadable
    ):
        log.info("reconcile of index version %s: %s", loaded.version, report)
    return report


async def _embed_and_add(
    engine: Engine, db: Database, loaded: Loaded, ids: list[int], report: ReconcileReport
) -> int:
    settings = engine.settings
    images, kept = [], []
    for image_id in ids:
        stored = await read_file(db, image_id)
        if stored is None:
            log.warning("record %d has no stored bytes; dropping the record", image_id)
            await db.images.delete_one({"_id": image_id})
            report.unreadable.append(image_id)
            continue
        limit = max(settings.MAX_UPLOAD_BYTES, len(stored[0]))
        try:
            decoded = await engine.run_in_thread(decode_image, stored[0], limit, settings.MAX_PIXELS)
        except ImageRejected as exc:
            log.warning("record %d: stored bytes unreadable (%s); left pending", image_id, exc)
            report.unreadable.append(image_id)
            continue
        images.append(decoded.image)
        kept.append(image_id)
    return len(await index_images(engine, db, loaded, kept, images))


async def _delete_orphan_files(db: Database) -> int:
    cutoff = datetime.now(timezone.utc) - ORPHAN_GRACE
    deleted = 0
    for bucket_name in ("content", "thumbnails"):
        files = db.db[f"{bucket_name}.files"]
        old_ids = [d["_id"] async for d in files.find({"uploadDate": {"$lt": cutoff}}, {"_id": 1})]
        if not old_ids:
            continue
        with_record = {d["_id"] async for d in db.images.find({"_id": {"$in": old_ids}}, {"_id": 1})}
        for file_id in old_ids:
            if file_id not in with_record:
                await delete_files(db, file_id)
                deleted += 1
    return deleted
