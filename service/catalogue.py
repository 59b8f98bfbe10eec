"""The catalogue write and read paths: image bytes in GridFS, one record per image in `images`.

`store_prepared_many` is the one function that stores "images + their records", shared by
`POST /images` and `python -m service.ingest`. Write order (a crash loses nothing and leaves no
orphan that the reconcile step cannot repair): GridFS bytes, then the records, then the index.
A record is written with its vector when the caller embedded the image first (`Embedded`: status
"indexed", `vector` as float32 little-endian bytes, tagged by `model_version`), so storing an image
costs the database inserts only; the caller then adds the vectors to the index. A crash between
the record and the index leaves a record that the index lacks, which reconcile adds from its
stored vector (the index's id set, not `status`, is the truth about what is indexed). Without a
model loaded the record is written "pending" and indexed later (reconcile, then `mark_indexed`).
Replicas add a record from its stored vector instead of embedding its bytes again
(service.watcher); the vector never leaves the service (`public_record`, `RECORD_PROJECTION`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from bson import Binary
from gridfs.errors import CorruptGridFile, NoFile
from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import AutoReconnect, BulkWriteError, NetworkTimeout

from service.db import CONTENT_BUCKET, ID_CHUNK, THUMBNAIL_BUCKET, Database, chunked
from service.imaging import DecodedImage, decode_image, make_thumbnail

GRIDFS_CHUNK_SIZE = 255 * 1024  # GridFS's default chunk size
DUPLICATE_KEY = 11000
PENDING = "pending"
INDEXED = "indexed"
VECTOR = "vector"  # the record's embedding under its `model_version` (float32 little-endian bytes)
RECORD_PROJECTION = {VECTOR: 0}  # what reads of whole records leave out: nobody outside needs it
VECTOR_FIELDS = {VECTOR: 1, "model_version": 1}


@dataclass
class ImageMetadata:
    label: str | None = None
    tags: tuple[str, ...] = ()
    source: str | None = None


@dataclass
class Limits:
    max_bytes: int
    max_pixels: int
    thumbnail_size: int


@dataclass(frozen=True)
class Embedded:
    """Vectors computed before their records are written: row i for the i-th image, tagged by the
    model that computed them and the index version they are added to."""

    vectors: np.ndarray  # NxD float32
    model_version: str
    index_version: str


@dataclass
class StoredImage:
    record: dict[str, Any]
    created: bool  # False: the same bytes were already stored, `record` is the existing one
    decoded: DecodedImage

    @property
    def id(self) -> int:
        return int(self.record["_id"])


@dataclass
class PreparedImage:
    """Validated upload, ready to store: nothing has been written yet."""

    data: bytes
    filename: str
    decoded: DecodedImage
    thumbnail: bytes  # PNG


def prepare_image(data: bytes, filename: str, limits: Limits) -> PreparedImage:
    """Validate and decode (CPU work: call from a thread). Raises ImageRejected."""
    decoded = decode_image(data, limits.max_bytes, limits.max_pixels, filename or "upload")
    return PreparedImage(data, filename, decoded, make_thumbnail(decoded.image, limits.thumbnail_size))


async def store_prepared(db: Database, prepared: PreparedImage, metadata: ImageMetadata) -> StoredImage:
    """Store bytes + thumbnail + a pending record (indexed later: reconcile or `mark_indexed`); the
    same bytes again return the existing record."""
    return (await store_prepared_many(db, [prepared], [metadata]))[0]


def _gridfs_documents(image_id: int, filename: str, data: bytes, media_type: str) -> tuple[dict, list[dict]]:
    """The files document and chunk documents GridFS itself would write (same layout, same chunk
    size), so GridFSBucket reads them back; written in bulk instead of two round trips per file."""
    files = {
        "_id": image_id,
        "length": len(data),
        "chunkSize": GRIDFS_CHUNK_SIZE,
        "uploadDate": datetime.now(timezone.utc),
        "filename": filename,
        "metadata": {"contentType": media_type},
    }
    chunks = [
        {"files_id": image_id, "n": n, "data": Binary(data[start : start + GRIDFS_CHUNK_SIZE])}
        for n, start in enumerate(range(0, max(len(data), 1), GRIDFS_CHUNK_SIZE))
    ]
    return files, chunks


def _record(
    image_id: int, prepared: PreparedImage, metadata: ImageMetadata, embedded: Embedded | None, row: int
) -> dict[str, Any]:
    decoded = prepared.decoded
    record = {
        "_id": image_id,
        "filename": prepared.filename,
        "sha256": decoded.sha256,
        "media_type": decoded.media_type,
        "width": decoded.width,
        "height": decoded.height,
        "size": len(prepared.data),
        "label": metadata.label,
        "tags": list(metadata.tags),
        "source": metadata.source,
        "created_at": datetime.now(timezone.utc),
        "status": PENDING,
        "model_version": None,
        "index_version": None,
    }
    if embedded is not None:
        record |= {
            "status": INDEXED,
            "model_version": embedded.model_version,
            "index_version": embedded.index_version,
            VECTOR: encode_vector(embedded.vectors[row]),
        }
    return record


TRANSIENT = (AutoReconnect, NetworkTimeout)  # the write may or may not have been applied
WRITE_ATTEMPTS = 4


async def insert_own_documents(collection: AsyncCollection, documents: list[dict[str, Any]]) -> list[dict]:
    """Insert documents whose unique keys carry ids allocated to this call alone, safely when a
    write times out or is retried: the server may have applied an attempt whose answer was lost
    (SecantusDB does not deduplicate retried writes as MongoDB does), so a duplicate key on a
    document we sent is our own earlier attempt, not a failure. Transient errors are retried here
    (the same documents, the same `_id`s). Returns the write errors that are not duplicate keys."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            await collection.insert_many(documents, ordered=False)
            return []
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            return [e for e in errors if e.get("code") != DUPLICATE_KEY]
        except TRANSIENT:
            if attempt == WRITE_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.2 * 2**attempt)
    return []


async def _insert_records(db: Database, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Insert pending records; returns {sha256: the record that owns it} for the records that lost
    a race to a concurrent upload of the same bytes (their own GridFS files are deleted)."""
    if not records:
        return {}
    try:  # the common case: one attempt inserts them all, so all are ours and nothing is left to check
        await db.images.insert_many(records, ordered=False)
        return {}
    except (BulkWriteError, *TRANSIENT):
        pass  # some were refused (a sha256 taken meanwhile) or the answer was lost: sorted out below
    errors = await insert_own_documents(db.images, records)
    if errors:
        raise BulkWriteError({"writeErrors": errors, "nInserted": 0})
    # Every record is either ours (inserted now or by an attempt whose answer was lost) or the
    # sha256 belongs to another record: find out which, with short `$in` lists.
    ours = {int(r["_id"]) for r in records}
    present: set[int] = set()
    for chunk in chunked(ours):
        present |= {int(d["_id"]) async for d in db.images.find({"_id": {"$in": chunk}}, {"_id": 1})}
    losers = [r for r in records if int(r["_id"]) not in present]
    winners: dict[str, dict[str, Any]] = {}
    for record in losers:
        winner = await db.images.find_one({"sha256": record["sha256"]}, RECORD_PROJECTION)
        if winner is None:  # the other upload was deleted meanwhile: store ours after all
            if await insert_own_documents(db.images, [record]):
                raise RuntimeError(f"could not store the record for {record['filename']}")
            continue
        await delete_files(db, int(record["_id"]))
        winners[record["sha256"]] = winner
    return winners


async def store_prepared_many(
    db: Database,
    prepared: list[PreparedImage],
    metadata: list[ImageMetadata],
    embedded: Embedded | None = None,
) -> list[StoredImage]:
    """`store_prepared` for a batch, in a handful of round trips whatever its size: one query for
    the hashes already stored, one block of ids, then bulk inserts in the crash-safe order (bytes,
    thumbnails, then the records: see `sweep_orphans`). With `embedded` (row i for prepared[i])
    new records carry their vectors and are written "indexed"; the caller adds them to the index
    next (an existing record is returned as it is: the caller decides). Duplicates within the batch
    are stored once. Safe to retry after a timeout: ids are fresh per call, so a duplicate key is
    our own earlier write."""
    if embedded is not None and len(embedded.vectors) != len(prepared):
        raise ValueError(f"{len(prepared)} images but {len(embedded.vectors)} vectors")
    if not prepared:
        return []
    shas = [p.decoded.sha256 for p in prepared]
    existing: dict[str, dict[str, Any]] = {}
    for chunk in _chunks(sorted(set(shas))):
        found = db.images.find({"sha256": {"$in": chunk}}, RECORD_PROJECTION)
        existing |= {d["sha256"]: d async for d in found}
    first_of: dict[str, int] = {}
    new = [i for i, sha in enumerate(shas) if sha not in existing and first_of.setdefault(sha, i) == i]
    records: dict[str, dict[str, Any]] = {}
    if new:
        ids = await db.allocate_ids(len(new))
        documents = {CONTENT_BUCKET: ([], []), THUMBNAIL_BUCKET: ([], [])}
        for image_id, i in zip(ids, new, strict=True):
            item = prepared[i]
            for bucket, name, data, media_type in (
                (CONTENT_BUCKET, item.filename, item.data, item.decoded.media_type),
                (THUMBNAIL_BUCKET, f"{image_id}.png", item.thumbnail, "image/png"),
            ):
                files, chunks = _gridfs_documents(image_id, name, data, media_type)
                documents[bucket][0].append(files)
                documents[bucket][1].extend(chunks)
            records[shas[i]] = _record(image_id, item, metadata[i], embedded, i)
        for bucket, (files, chunks) in documents.items():
            # Files document first, then chunks: a chunk always has its files document, so the
            # orphan sweep finds every leftover by scanning files documents alone. Nobody reads the
            # file before the id is returned, which happens only once the record exists.
            for collection, docs in ((f"{bucket}.files", files), (f"{bucket}.chunks", chunks)):
                if errors := await insert_own_documents(db.db[collection], docs):
                    raise BulkWriteError({"writeErrors": errors, "nInserted": 0})
        for sha, winner in (await _insert_records(db, list(records.values()))).items():
            existing[sha] = winner
            del records[sha]
    stored = []
    for i, sha in enumerate(shas):
        created = sha in records and first_of.get(sha) == i
        record = records[sha] if sha in records else existing[sha]
        stored.append(StoredImage(record, created, prepared[i].decoded))
    return stored


def _chunks(values: list[str], size: int = ID_CHUNK) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


async def mark_indexed(
    db: Database, ids: list[int], model_version: str, index_version: str, vectors: np.ndarray | None = None
) -> int:
    """Mark records indexed by `model_version`, storing row i of NxD `vectors` with ids[i] (the
    vector replicas add instead of embedding again). Returns how many of the records still exist
    (matched), so callers can skip a lookup. Short batches (SecantusDB evaluates `$in` lists in
    Python); idempotent, so safe to retry.

    Without vectors (reconcile found the id in the index but the record pending: a crash between
    the two steps) only records not yet indexed are marked, and any vector they hold is removed,
    so no vector ever carries a model tag it was not computed by; a record someone marked indexed
    meanwhile keeps its vector."""
    status = {"status": INDEXED, "model_version": model_version, "index_version": index_version}
    matched = 0
    if vectors is None:
        update = {"$set": status, "$unset": {VECTOR: ""}}
        for chunk in chunked(ids):
            query = {"_id": {"$in": chunk}, "status": {"$ne": INDEXED}}
            matched += (await db.images.update_many(query, update)).matched_count
        return matched
    if len(vectors) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
    rows = np.ascontiguousarray(vectors, dtype="<f4")  # NxD
    for start in range(0, len(ids), ID_CHUNK):
        writes = [
            UpdateOne({"_id": int(image_id)}, {"$set": {**status, VECTOR: encode_vector(rows[start + i])}})
            for i, image_id in enumerate(ids[start : start + ID_CHUNK])
        ]
        matched += (await db.images.bulk_write(writes, ordered=False)).matched_count
    return matched


def encode_vector(vector: np.ndarray) -> Binary:
    """A D vector as stored in a record: float32 little-endian bytes."""
    return Binary(np.ascontiguousarray(vector, dtype="<f4").tobytes())


def decode_vector(stored: Any, dim: int) -> np.ndarray | None:
    """The D float32 vector of a record's `vector` field, or None when it is absent, of another
    dimension or not finite (a record written by another model or damaged: embed it instead)."""
    if not isinstance(stored, bytes | bytearray) or len(stored) != 4 * dim:
        return None
    vector = np.frombuffer(stored, dtype="<f4").astype(np.float32)
    return vector if np.isfinite(vector).all() else None


def usable_vector(fields: dict[str, Any], model_version: str, dim: int) -> np.ndarray | None:
    """The stored vector of a record (or of a change event's fields) when the model that computed
    it is `model_version`, else None."""
    if fields.get("model_version") != model_version:
        return None
    return decode_vector(fields.get(VECTOR), dim)


async def stored_vectors(db: Database, ids: list[int], model_version: str, dim: int) -> dict[int, np.ndarray]:
    """{id: stored vector} for the records among `ids` whose vector `model_version` computed."""
    found: dict[int, np.ndarray] = {}
    for chunk in chunked(ids):
        async for doc in db.images.find({"_id": {"$in": chunk}}, VECTOR_FIELDS):
            vector = usable_vector(doc, model_version, dim)
            if vector is not None:
                found[int(doc["_id"])] = vector
    return found


async def delete_files(db: Database, image_id: int) -> bool:
    """Bytes and thumbnail: chunks, then the files document, so that an interrupted delete leaves
    a files document (which the orphan sweep finds), never loose chunks. Idempotent: every step
    runs whatever the others find. True if anything was there."""
    found = False
    for bucket in (CONTENT_BUCKET, THUMBNAIL_BUCKET):
        chunks = await db.db[f"{bucket}.chunks"].delete_many({"files_id": image_id})
        files = await db.db[f"{bucket}.files"].delete_one({"_id": image_id})
        found = found or bool(files.deleted_count or chunks.deleted_count)
    return found


async def delete_many_files(db: Database, image_ids: list[int]) -> None:
    """`delete_files` for up to ID_CHUNK ids in four writes (same order: chunks, then files)."""
    for bucket in (CONTENT_BUCKET, THUMBNAIL_BUCKET):
        await db.db[f"{bucket}.chunks"].delete_many({"files_id": {"$in": image_ids}})
        await db.db[f"{bucket}.files"].delete_many({"_id": {"$in": image_ids}})


async def delete_image(db: Database, image_id: int) -> dict[str, Any] | None:
    """Record first (it disappears from results at once), then bytes and thumbnail; the caller then
    removes the index entry (a crash in between leaves an index id without a record: reconcile
    removes it). Every step runs whatever the earlier ones found, so a delete that is retried after
    a timeout, or repeated after a crash, finishes the job. Returns the record, `{"_id": id}` when
    only leftovers of an earlier attempt were there (it did take effect), None when nothing was."""
    record = await db.images.find_one_and_delete({"_id": image_id})
    leftovers = await delete_files(db, image_id)
    if record is None and leftovers:
        return {"_id": image_id}
    return record


async def read_file(db: Database, image_id: int, thumbnail: bool = False) -> tuple[bytes, str] | None:
    """(bytes, media type) from GridFS, or None when there is no such file."""
    bucket = db.thumbnails if thumbnail else db.content
    try:
        stream = await bucket.open_download_stream(image_id)
        data = await stream.read()
    except (NoFile, CorruptGridFile):  # Corrupt: a delete removed the chunks while they were read
        return None
    media_type = (stream.metadata or {}).get("contentType", "application/octet-stream")
    return data, media_type


async def read_thumbnails(db: Database, ids: list[int]) -> dict[int, bytes]:
    """{id: PNG bytes} for the ids whose thumbnail is stored: per ID_CHUNK ids, one query for the
    files documents and one for the chunks, concurrently (GridFS's own reader makes two sequential
    round trips per file). A file whose chunks do not add up to its length (a delete in progress)
    is left out, as `read_file` leaves it."""
    files = db.db[f"{THUMBNAIL_BUCKET}.files"]
    chunks = db.db[f"{THUMBNAIL_BUCKET}.chunks"]

    async def fetch(chunk: list[int]) -> dict[int, bytes]:
        lengths, parts = await asyncio.gather(
            files.find({"_id": {"$in": chunk}}, {"length": 1}, batch_size=len(chunk)).to_list(),
            chunks.find({"files_id": {"$in": chunk}}, {"_id": 0, "files_id": 1, "n": 1, "data": 1}).to_list(),
        )
        pieces: dict[int, dict[int, bytes]] = {}
        for part in parts:
            pieces.setdefault(int(part["files_id"]), {})[int(part["n"])] = bytes(part["data"])
        found = {}
        for doc in lengths:
            image_id = int(doc["_id"])
            numbered = pieces.get(image_id, {})
            if sorted(numbered) != list(range(len(numbered))):
                continue  # a chunk is missing: a delete in progress
            data = b"".join(numbered[n] for n in range(len(numbered)))
            if len(data) == doc["length"]:
                found[image_id] = data
        return found

    thumbnails: dict[int, bytes] = {}
    for part in await asyncio.gather(*(fetch(chunk) for chunk in chunked(ids))):
        thumbnails |= part
    return thumbnails


SEARCH_FIELDS = {"label": 1, "tags": 1}  # what a search result shows: less to send and decode


async def records_by_id(db: Database, ids: list[int], extra_filter: dict | None = None) -> dict[int, dict]:
    """{id: record (label and tags only)} for the ids that exist and pass `extra_filter`; short
    `$in` lists, concurrently (one long list costs its length squared on SecantusDB)."""

    async def fetch(chunk: list[int]) -> list[dict]:
        query: dict[str, Any] = {"_id": {"$in": chunk}, **(extra_filter or {})}
        return await db.images.find(query, SEARCH_FIELDS, batch_size=len(chunk)).to_list()

    found: dict[int, dict] = {}
    for docs in await asyncio.gather(*(fetch(chunk) for chunk in chunked(ids))):
        found |= {int(doc["_id"]): doc for doc in docs}
    return found


def metadata_filter(label: str | None, tags: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """A Mongo filter from already-validated plain strings (never user-supplied operators)."""
    query: dict[str, Any] = {}
    if label is not None:
        query["label"] = label
    if tags:
        query["tags"] = {"$all": list(tags)}
    return query


async def list_images(
    db: Database, label: str | None, tag: str | None, limit: int, cursor: int | None
) -> tuple[list[dict], int | None]:
    """A page in _id order after `cursor`; the next cursor is the last _id (None at the end)."""
    query = metadata_filter(label, [tag] if tag else None)
    if cursor is not None:
        query["_id"] = {"$gt": cursor}
    docs = await db.images.find(query, RECORD_PROJECTION).sort("_id", 1).limit(limit + 1).to_list()
    next_cursor = int(docs[limit - 1]["_id"]) if len(docs) > limit else None
    return docs[:limit], next_cursor


def public_record(doc: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a record."""
    image_id = int(doc["_id"])
    created = doc.get("created_at")
    return {
        "id": image_id,
        "filename": doc.get("filename"),
        "sha256": doc.get("sha256"),
        "media_type": doc.get("media_type"),
        "width": doc.get("width"),
        "height": doc.get("height"),
        "size": doc.get("size"),
        "label": doc.get("label"),
        "tags": doc.get("tags") or [],
        "source": doc.get("source"),
        "created_at": created.isoformat() if isinstance(created, datetime) else created,
        "status": doc.get("status"),
        "model_version": doc.get("model_version"),
        "index_version": doc.get("index_version"),
        "content_url": f"/images/{image_id}/content",
        "thumbnail_url": f"/images/{image_id}/thumbnail",
    }
