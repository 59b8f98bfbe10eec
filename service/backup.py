"""Back up and restore the whole catalogue: records, image bytes and thumbnails (GridFS), the id
counter, and the current index version with its encoder.

    python -m service.backup create DIR     # while the service runs (or not)
    python -m service.backup restore DIR    # into an empty database and an empty INDEX_DIR

Settings (MONGO_URI, MONGO_DB, DATA_DIR, INDEX_DIR) come from the environment as for the service;
without MONGO_URI it attaches to the embedded database a running service announced, or starts it.

Consistent while the service keeps running: the index version is immutable once published and is
copied first; then the records are read in one scan, and only the records whose bytes and
thumbnail are then found are kept (an image deleted meanwhile is left out whole), so every record
in a backup has its bytes. Records added after the copied index version are in the backup and the
restored service's reconcile embeds them, as it does after any swap. The backup is written to
DIR.partial and renamed to DIR when complete. Collections are stored as concatenated BSON, the
format of mongodump's .bson files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bson
import pymongo
from tqdm import tqdm

from index.store import CURRENT_FILE, IndexStore
from service.catalogue import insert_own_documents
from service.connection import catalogue_connection
from service.db import (
    CONTENT_BUCKET,
    COUNTERS,
    ID_CHUNK,
    IMAGE_ID_COUNTER,
    IMAGES,
    THUMBNAIL_BUCKET,
    Database,
    stream_docs,
)
from service.settings import Settings

FORMAT = 1
MANIFEST = "backup.json"
COLLECTIONS = [
    IMAGES,
    f"{CONTENT_BUCKET}.files",
    f"{CONTENT_BUCKET}.chunks",
    f"{THUMBNAIL_BUCKET}.files",
    f"{THUMBNAIL_BUCKET}.chunks",
]
INSERT_BATCH = 500
SCAN_TIMEOUT_S = 900.0


class BackupError(RuntimeError):
    """A backup or restore that cannot go ahead (message says why; nothing was changed)."""


def _write_bson(path: Path, documents: list[dict[str, Any]]) -> None:
    with open(path, "ab") as out:
        for document in documents:
            out.write(bson.encode(document))


def _read_bson(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as source:
        yield from bson.decode_file_iter(source)


def _copy_current_index(index_dir: Path, target: Path) -> str | None:
    """Copy CURRENT's version directory (index + encoder + manifest); retried if it is pruned
    mid-copy (a newer one became CURRENT meanwhile)."""
    store = IndexStore(index_dir)
    for _ in range(5):
        version = store.current_version()
        if version is None:
            return None
        destination = target / "versions" / version
        try:
            shutil.copytree(store.version_dir(version), destination)
        except FileNotFoundError:
            shutil.rmtree(destination, ignore_errors=True)
            continue
        (target / CURRENT_FILE).write_text(version + "\n", encoding="utf-8")
        return version
    raise BackupError(f"the index in {index_dir} kept changing while it was copied; try again")


async def create(db: Database, index_dir: Path, directory: Path, progress: bool = True) -> dict[str, Any]:
    if directory.exists() and any(directory.iterdir()):
        raise BackupError(f"{directory} exists and is not empty; give a new directory")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "db").mkdir(parents=True)
    version = _copy_current_index(index_dir, partial / "index")
    kept = 0
    with pymongo.timeout(SCAN_TIMEOUT_S), tqdm(desc="backup", unit="img", disable=not progress) as bar:
        async for batch in stream_docs(db.images, {}, None):  # whole records
            for start in range(0, len(batch), ID_CHUNK):
                records = batch[start : start + ID_CHUNK]
                kept += await _back_up_chunk(db, records, partial / "db")
            bar.update(len(batch))
        counter = await db.counters.find_one({"_id": IMAGE_ID_COUNTER})
    _write_bson(partial / "db" / f"{COUNTERS}.bson", [counter] if counter else [])
    manifest = {
        "format": FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "database": db.db.name,
        "records": kept,
        "index_version": version,
        "model_version": IndexStore(partial / "index").read_manifest(version).get("encoder_version")
        if version
        else None,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if directory.exists():
        directory.rmdir()
    os.replace(partial, directory)
    return manifest


async def _back_up_chunk(db: Database, records: list[dict], out: Path) -> int:
    """Write the records whose bytes and thumbnail exist, with those files; returns how many."""
    ids = [int(r["_id"]) for r in records]
    found: dict[str, list[dict]] = {}
    for bucket in (CONTENT_BUCKET, THUMBNAIL_BUCKET):
        found[f"{bucket}.files"] = await db.db[f"{bucket}.files"].find({"_id": {"$in": ids}}).to_list()
        found[f"{bucket}.chunks"] = (
            await db.db[f"{bucket}.chunks"]
            .find({"files_id": {"$in": ids}})
            .sort([("files_id", 1), ("n", 1)])
            .to_list()
        )
    complete = {int(f["_id"]) for f in found[f"{CONTENT_BUCKET}.files"]} & {
        int(f["_id"]) for f in found[f"{THUMBNAIL_BUCKET}.files"]
    }
    for name, documents in found.items():
        key = "_id" if name.endswith(".files") else "files_id"
        _write_bson(out / f"{name}.bson", [d for d in documents if int(d[key]) in complete])
    kept = [r for r in records if int(r["_id"]) in complete]
    _write_bson(out / f"{IMAGES}.bson", kept)
    return len(kept)


async def restore(db: Database, index_dir: Path, directory: Path, progress: bool = True) -> dict[str, Any]:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise BackupError(f"{directory} is not a backup (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise BackupError(
            f"{directory} has backup format {manifest.get('format')}, this version reads {FORMAT}"
        )
    if await db.images.find_one({}, {"_id": 1}) is not None:
        raise BackupError(f"database {db.db.name!r} already holds images; restore into an empty one")
    if IndexStore(index_dir).current_version() is not None:
        raise BackupError(f"{index_dir} already holds an index; restore into an empty INDEX_DIR")
    await db.prepare()  # indexes first, as the service has them
    with pymongo.timeout(SCAN_TIMEOUT_S), tqdm(desc="restore", unit="doc", disable=not progress) as bar:
        for name in COLLECTIONS:  # bytes before records, as the service writes them
            if name == IMAGES:
                continue
            await _insert_file(db, name, directory / "db" / f"{name}.bson", bar)
        await _insert_file(db, IMAGES, directory / "db" / f"{IMAGES}.bson", bar)
        for counter in _read_bson(directory / "db" / f"{COUNTERS}.bson"):
            await db.counters.update_one(
                {"_id": counter["_id"]}, {"$max": {"seq": counter.get("seq", 0)}}, upsert=True
            )
    version = manifest.get("index_version")
    if version:
        source = directory / "index" / "versions" / version
        destination = index_dir / "versions" / version
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, destination)
        IndexStore(index_dir).set_current(version)
    return manifest


async def _insert_file(db: Database, name: str, path: Path, bar: tqdm) -> None:
    """Insert a collection's documents; the database was empty, so a duplicate key is a retried
    write of our own (SecantusDB does not deduplicate them), anything else is an error."""
    batch: list[dict] = []
    for document in _read_bson(path) if path.is_file() else ():
        batch.append(document)
        if len(batch) == INSERT_BATCH:
            await _insert(db, name, batch)
            bar.update(len(batch))
            batch = []
    if batch:
        await _insert(db, name, batch)
        bar.update(len(batch))


async def _insert(db: Database, name: str, documents: list[dict]) -> None:
    if errors := await insert_own_documents(db.db[name], documents):
        raise BackupError(f"could not restore {name}: {errors[0].get('errmsg', errors[0])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.backup", description=__doc__.split("\n\n")[0])
    parser.add_argument("verb", choices=["create", "restore"], help="create a backup, or restore one")
    parser.add_argument("directory", type=Path, help="the backup directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    async def run(uri: str, settings: Settings) -> dict[str, Any]:
        db = Database.connect(
            uri, settings.MONGO_DB, settings.MONGO_TIMEOUT_MS, journal=settings.MONGO_JOURNAL
        )
        try:
            verb = create if args.verb == "create" else restore
            return await verb(db, settings.index_dir, args.directory, progress=not args.no_progress)
        finally:
            await db.close()

    try:
        with catalogue_connection() as (uri, settings):
            manifest = asyncio.run(run(uri, settings))
    except (BackupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line, not a traceback wall
        message = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"error: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1
    done = "backed up" if args.verb == "create" else "restored"
    print(
        f"{done} {manifest['records']} images, index version {manifest['index_version']} "
        f"(model {manifest['model_version']}) {'to' if args.verb == 'create' else 'from'} {args.directory}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
