"""The catalogue in MongoDB as a training data set (`--data catalogue[:MONGO_URI]` in a refresh).

Reading needs only a URI and a database name; which database the service uses (its settings, the
embedded server) is the service's to say: `service/refresh/catalogue_source.py` registers the
`catalogue` spec on top of `load_catalogue`, so the spec exists where the refresh runs.

Records come from the service's `images` collection and their bytes from the GridFS bucket
`content` (see service/catalogue.py). Each image is decoded once: the decoded uint8 tensors are
cached on disk per (database, size), keyed by record id and content hash, so a refresh
re-reads and re-decodes only the images added since the last one, and drops deleted ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training.data.datasets import DataError, ImageDataset
from training.data.images import ImageDecodeError, load_uint8

IMAGES = "images"
CONTENT_CHUNKS = "content.chunks"
READ_BATCH = 256


def _cache_path(cache_dir: Path, db_name: str, size: int) -> Path:
    """One cache per database and size (not per URI: the embedded server's port changes). Entries
    are keyed by id and content hash, so a stale entry is never used, only left unused."""
    return cache_dir / f"catalogue-{db_name}-{size}px.pt"


def _read_cache(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return dict(zip(cached["keys"], cached["images"], strict=True))
    except Exception:  # a corrupt cache is only a lost speed-up: rebuild it
        return {}


def _write_cache(path: Path, decoded: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    keys = list(decoded)
    torch.save({"keys": keys, "images": [decoded[k] for k in keys]}, tmp)
    os.replace(tmp, path)


def _contents(db: Any, ids: list[int]) -> Iterator[tuple[int, bytes]]:
    """(id, bytes) for GridFS files `ids`, read in bulk from the chunks collection (one query per
    batch instead of two round trips per file)."""
    chunks = db[CONTENT_CHUNKS]
    for start in range(0, len(ids), READ_BATCH):
        batch = ids[start : start + READ_BATCH]
        parts: dict[int, list[tuple[int, bytes]]] = {}
        for chunk in chunks.find({"files_id": {"$in": batch}}, {"files_id": 1, "n": 1, "data": 1}):
            parts.setdefault(int(chunk["files_id"]), []).append((int(chunk["n"]), bytes(chunk["data"])))
        for image_id in batch:
            pieces = sorted(parts.get(image_id, []))
            yield image_id, b"".join(data for _, data in pieces)


def load_catalogue(
    uri: str,
    db_name: str,
    crop_size: int,
    cache_dir: str | os.PathLike | None = None,
    timeout_ms: int = 5000,
) -> ImageDataset:
    """Every catalogue record with readable bytes, in id order; labels from the records' `label`.

    Images are decoded as RGB; a catalogue whose images are all grey comes back with one channel.
    """
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms)
    try:
        db = client[db_name]
        records = list(db[IMAGES].find({}, {"_id": 1, "sha256": 1, "label": 1}).sort("_id", 1))
        if not records:
            raise DataError(
                f"catalogue {db_name} at {uri} is empty: ingest images first "
                "(python -m service.ingest PATH, or POST /images)"
            )
        cache_path = _cache_path(Path(cache_dir or "data/cache"), db_name, crop_size)
        cached = _read_cache(cache_path)
        key_of = {int(r["_id"]): f"{int(r['_id'])}:{r.get('sha256', '')}" for r in records}
        missing = [image_id for image_id, key in key_of.items() if key not in cached]
        decoded = {key: cached[key] for key in key_of.values() if key in cached}
        for image_id, data in tqdm(
            _contents(db, missing), total=len(missing), desc="decoding catalogue", unit="img",
            disable=len(missing) < 500,
        ):  # fmt: skip
            try:
                decoded[key_of[image_id]] = load_uint8(data, 3, crop_size)
            except ImageDecodeError:  # left out; counted in the data set's `skipped`
                continue
        if missing:
            _write_cache(cache_path, decoded)
    except PyMongoError as exc:
        raise DataError(f"cannot read the catalogue at {uri}: {exc}") from exc
    finally:
        client.close()

    kept = [r for r in records if key_of[int(r["_id"])] in decoded]
    if not kept:
        raise DataError(f"catalogue {db_name}: none of the {len(records)} images could be decoded")
    class_names = sorted({r["label"] for r in kept if isinstance(r.get("label"), str) and r["label"]})
    class_index = {name: i for i, name in enumerate(class_names)}
    images = torch.stack([decoded[key_of[int(r["_id"])]] for r in kept])  # Nx3xSxS
    if torch.equal(images[:, :1].expand_as(images), images):
        images = images[:, :1].contiguous()
    return ImageDataset(
        name=f"catalogue:{db_name}",
        images=images,
        labels=torch.tensor([class_index.get(r.get("label"), -1) for r in kept], dtype=torch.int64),
        ids=torch.tensor([int(r["_id"]) for r in kept], dtype=torch.int64),
        class_names=class_names,
        skipped=len(records) - len(kept),
    )
