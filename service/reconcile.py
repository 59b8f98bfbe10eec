"""Reconcile the catalogue with the loaded index (start-up, after every swap), and sweep orphans.

The index's own id set is the truth about what is indexed:
  * records not in the index (pending, indexed before a crash, added while a refresh built the new
    version) are added from their stored vector when the loaded model computed it, else embedded
    from their stored bytes, then marked indexed;
  * index ids without a record (deleted, or a crash between record delete and index remove) are removed;
  * a record whose bytes are gone cannot be embedded and is dropped.
`sweep_orphans` (on its own schedule, first after the start-up reconcile) deletes GridFS files and
chunks that no record owns once they are older than a grace period (a crash between the bytes and
the record).

Every query here is a single streamed scan matched against a sorted id array, or an
`$in` of at most ID_CHUNK ids: nothing whose cost grows with the catalogue times a list. Each
pass runs under `pymongo.timeout`, so the server cancels (maxTimeMS) a scan nobody waits for.
The sweep, which runs while the service answers requests, makes no scan at all: it walks the id
space by point lookups with pauses (a scan holds the embedded server for seconds at 100k).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pymongo
from tqdm import tqdm

from service.catalogue import (
    PENDING,
    delete_files,
    delete_many_files,
    mark_indexed,
    read_file,
    stored_vectors,
)
from service.db import (
    CONTENT_BUCKET,
    ID_ONLY,
    THUMBNAIL_BUCKET,
    Database,
    chunked,
    paced_id_windows,
    stream_docs,
)
from service.engine import Engine, Loaded
from service.imaging import ImageRejected, decode_image
from service.indexing import index_images, index_vectors

log = logging.getLogger("service.reconcile")
BATCH = 64
DEFAULT_ORPHAN_GRACE = timedelta(minutes=10)  # an upload in progress has bytes but no record for a moment
BUCKETS = (CONTENT_BUCKET, THUMBNAIL_BUCKET)
SCAN_TIMEOUT_S = 300.0  # server-side limit of one background scan (100k records take seconds)
STEP_TIMEOUT_S = 60.0  # server-side limit of one step of the orphan sweep (a few point lookups)
DEFAULT_SWEEP_DUTY = 0.5  # the orphan sweep keeps the database busy at most half of the time


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

    @property
    def changed(self) -> bool:
        return bool(
            self.added or self.removed or self.marked_indexed or self.orphan_files_deleted or self.unreadable
        )


def _members(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is each of `ids` in `sorted_ids`, its position there) by binary search."""
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), bool), np.zeros(len(ids), np.int64)
    position = np.searchsorted(sorted_ids, ids).clip(0, len(sorted_ids) - 1)
    return sorted_ids[position] == ids, position


async def reconcile(
    engine: Engine, db: Database, scan_timeout_s: float = SCAN_TIMEOUT_S
) -> ReconcileReport | None:
    loaded = engine.loaded
    if loaded is None:
        return None
    report = ReconcileReport()
    # The index ids first: any id in them was added after its record was written, so the record
    # scan that follows sees it unless it was deleted meanwhile (then removing it is right).
    index_ids = np.sort(await engine.run_in_thread(loaded.index.ids)).astype(np.int64)
    seen = np.zeros(len(index_ids), bool)
    missing: list[int] = []
    indexed_but_pending: list[int] = []
    with pymongo.timeout(scan_timeout_s):
        async for batch in stream_docs(db.images):  # ids only: a projected field costs ~25% more
            ids = np.fromiter((int(d["_id"]) for d in batch), np.int64, len(batch))
            present, position = _members(index_ids, ids)
            seen[position[present]] = True
            missing += ids[~present].tolist()
        # Records not marked indexed, from the status index (a `$ne` would scan every record): the
        # ones the index holds lost their mark in a crash; the others are in `missing` already.
        async for batch in stream_docs(db.images, {"status": {"$in": [PENDING, None]}}):
            ids = np.fromiter((int(d["_id"]) for d in batch), np.int64, len(batch))
            indexed_but_pending += ids[_members(index_ids, ids)[0]].tolist()

    stale = index_ids[~seen].tolist()
    if stale:  # re-check the few candidates by point lookups before removing anything
        still = set()
        for chunk in chunked(stale):
            still |= {int(d["_id"]) async for d in db.images.find({"_id": {"$in": chunk}}, {"_id": 1})}
        stale = [i for i in stale if i not in still]
        report.removed = await engine.remove(stale) if stale else 0

    # No vector at hand for these (the index may not give its vectors back): marked without one.
    await mark_indexed(db, indexed_but_pending, loaded.model_version, loaded.version)
    report.marked_indexed = len(indexed_but_pending)

    with tqdm(total=len(missing), desc="reconcile", unit="img", disable=len(missing) < BATCH) as progress:
        for start in range(0, len(missing), BATCH):
            chunk = missing[start : start + BATCH]
            report.added += await _embed_and_add(engine, db, loaded, chunk, report)
            progress.update(len(chunk))

    if report.changed:
        log.info("reconcile of index version %s: %s", loaded.version, report)
    return report


async def _embed_and_add(
    engine: Engine, db: Database, loaded: Loaded, ids: list[int], report: ReconcileReport
) -> int:
    settings = engine.settings
    known = await stored_vectors(db, ids, loaded.model_version, loaded.index.dim)
    added = 0
    if known:  # computed by the loaded model already (by a replica, or before a crash): no embedding
        added = len(await index_vectors(engine, db, loaded, list(known), np.stack(list(known.values()))))
    images, kept = [], []
    for image_id in ids:
        if image_id in known:
            continue
        stored = await read_file(db, image_id)
        if stored is None:
            log.warning("record %d has no stored bytes; dropping the record", image_id)
            await db.images.delete_one({"_id": image_id})
            await delete_files(db, image_id)  # a thumbnail without its image is an orphan too
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
    return added + len(await index_images(engine, db, loaded, kept, images))


async def sweep_orphans(
    db: Database,
    grace: timedelta = DEFAULT_ORPHAN_GRACE,
    duty: float = DEFAULT_SWEEP_DUTY,
    step_timeout_s: float = STEP_TIMEOUT_S,
) -> int:
    """Delete GridFS files that no record owns and that are older than `grace`: left by a crash or
    a failed request between the bytes and the record. Returns the number of image ids whose
    leftovers were deleted.

    A gentle background walk, not a scan: file ids are image ids, so it visits every id ever
    allocated in windows of ID_CHUNK (`paced_id_windows`, busy at most `duty` of the time): one
    point lookup of the window in the records; only for the ids without one (deleted or never
    written), a lookup of their files documents in each bucket and their age; a re-check of the
    records of the few old ones (an upload may have written its record meanwhile), then the delete.
    (Chunks need no walk of their own: they are written after their files document and deleted
    before it, see catalogue, so a chunk always has one.) Each step runs under its own
    `pymongo.timeout`, so the server cancels (maxTimeMS) a lookup nobody waits for any more."""
    cutoff = datetime.now(timezone.utc) - grace
    deleted = 0
    async for window in paced_id_windows(db, duty):
        with pymongo.timeout(step_timeout_s):
            owned = {int(d["_id"]) async for d in db.images.find({"_id": {"$in": window}}, ID_ONLY)}
            unowned = [i for i in window if i not in owned]
            if not unowned:
                continue
            old: set[int] = set()
            for bucket in BUCKETS:  # `_id` alone in the filter: a point lookup; the age is checked here
                async for d in db.db[f"{bucket}.files"].find({"_id": {"$in": unowned}}, {"uploadDate": 1}):
                    if d.get("uploadDate") is not None and d["uploadDate"] < cutoff:
                        old.add(int(d["_id"]))
            if not old:
                continue
            candidates = sorted(old)
            owned_now = {int(d["_id"]) async for d in db.images.find({"_id": {"$in": candidates}}, ID_ONLY)}
            orphans = [i for i in candidates if i not in owned_now]
            if orphans:
                await delete_many_files(db, orphans)
                deleted += len(orphans)
    if deleted:
        log.info("deleted the GridFS leftovers of %d image id(s) without a record", deleted)
    return deleted
