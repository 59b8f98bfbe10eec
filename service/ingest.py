"""Bulk ingest into the catalogue: bytes + records into MongoDB, embeddings into the index, publish.

    python -m service.ingest PATH [--labels-from-dirs] [--tags a b] [--source NAME]
    python -m service.ingest --fashion-mnist [--split train|test] [--limit N]

Uses the same write path as `POST /images` (`service.pipeline`: batches of 256 decoded, thumbnailed
and embedded in worker threads while the previous batch is written in the crash-safe order), so it
is idempotent (content hash: a second run adds nothing) and resumable after a kill (records
stored but not yet indexed are indexed on the next run, or by the service's reconcile). Settings
(MONGO_URI, DATA_DIR, ...) come from the environment as for the service; without MONGO_URI it
attaches to the embedded database a running service announced, or starts it (service.connection).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from service.catalogue import ImageMetadata, Limits
from service.connection import attach_or_start
from service.db import Database
from service.engine import Engine
from service.pipeline import BatchResult, Source, batched, run_pipeline
from service.reconcile import reconcile
from service.settings import Settings
from service.validation import InvalidValue, parse_label, parse_tags
from training.data.datasets import load_fashion_mnist
from training.data.images import IMAGE_SUFFIXES

BATCH = 256  # images per database round trip and forward pass
PREPARE_WORKERS = 2  # threads decoding, thumbnailing and embedding ahead of the writes
PIPELINE_DEPTH = 2  # batches prepared ahead: memory stays at (depth + 1) batches
log = logging.getLogger("service.ingest")


@dataclass
class Item:
    name: str
    data: bytes | None  # None: read from `path` when its batch comes
    path: Path | None = None
    label: str | None = None


@dataclass
class Summary:
    added: int = 0
    already_present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def lines(self) -> list[str]:
        out = [f"added {self.added}, already present {self.already_present}, skipped {len(self.skipped)}"]
        reasons = Counter(reason.split(":")[0] for _, reason in self.skipped)
        out += [f"  skipped ({count}): {reason}" for reason, count in reasons.most_common()]
        out += [f"    {name}: {reason}" for name, reason in self.skipped[:10]]
        return out


def folder_items(root: Path, labels_from_dirs: bool) -> Iterator[Item]:
    """Image files under root (sorted, so runs are reproducible); label = parent directory name."""
    paths = (
        [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    )
    for path in paths:
        label = path.parent.name if labels_from_dirs and path.parent != root else None
        yield Item(str(path.relative_to(root) if path != root else path.name), None, path, label)


def fashion_mnist_items(split: str, limit: int | None) -> Iterator[Item]:
    dataset = load_fashion_mnist(split, 28)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(dataset.images[i, 0].numpy(), mode="L").save(buffer, format="PNG")
        label = dataset.class_names[int(dataset.labels[i])]
        yield Item(f"fashion-mnist-{split}-{i:05d}.png", buffer.getvalue(), None, label)


def _read(item: Item) -> bytes:
    return item.data if item.data is not None else item.path.read_bytes()


async def ingest(
    settings: Settings,
    items: list[Item],
    tags: list[str],
    source: str | None,
    progress: bool = True,
    batch_size: int = BATCH,
) -> Summary:
    uri, embedded = await asyncio.to_thread(attach_or_start, settings)  # see service.connection
    db = Database.connect(uri, settings.MONGO_DB, settings.MONGO_TIMEOUT_MS)
    engine = Engine(settings)
    summary = Summary()
    try:
        await db.prepare()
        await engine.load_current()
        loaded = engine.require()
        limits = Limits(settings.MAX_UPLOAD_BYTES, settings.MAX_PIXELS, settings.THUMBNAIL_SIZE)
        sources = (
            Source(item.name, partial(_read, item), ImageMetadata(item.label, tuple(tags), source))
            for item in items
        )
        with (
            tqdm(total=len(items), desc="ingest", unit="img", disable=not progress) as bar,
            ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="ingest-prepare") as workers,
        ):

            def count(result: BatchResult) -> None:
                summary.added += sum(s.created for s in result.stored)
                summary.already_present += sum(not s.created for s in result.stored)
                summary.skipped.extend(result.skipped)
                bar.update(result.sources)

            await run_pipeline(
                engine, db, loaded, batched(sources, batch_size), limits, workers, PIPELINE_DEPTH, count
            )
        await publish(engine, db)
    finally:
        await db.close()
        engine.shutdown()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    return summary


async def publish(engine: Engine, db: Database, attempts: int = 3) -> None:
    """Publish; when someone else published meanwhile, load theirs, reconcile our records into it, retry."""
    for _ in range(attempts):
        version = await engine.publish_if_due(force=True)
        if version is not None:
            print(f"published index version {version} ({engine.require().index.ntotal} vectors)")
            return
        if not engine.has_unpublished_changes:
            return
        await engine.load_current()
        await reconcile(engine, db)
    raise RuntimeError("could not publish: the index version kept changing; run again")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, help="an image file or a directory of images")
    parser.add_argument(
        "--labels-from-dirs", action="store_true", help="label = the image's parent directory"
    )
    parser.add_argument("--tags", nargs="*", default=[], help="tags for every image")
    parser.add_argument("--source", help="source recorded with every image (default: the path or data set)")
    parser.add_argument("--fashion-mnist", action="store_true", help="ingest Fashion-MNIST (labelled)")
    parser.add_argument(
        "--split", choices=["train", "test"], default="test", help="Fashion-MNIST split (test)"
    )
    parser.add_argument("--limit", type=int, help="at most this many images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH, help=f"images per write and forward pass (default: {BATCH})"
    )
    args = parser.parse_args(argv)
    if (args.path is None) == (not args.fashion_mnist):
        parser.error("give either PATH or --fashion-mnist")
    if args.path is not None and not args.path.exists():
        parser.error(f"{args.path} does not exist")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        tags = parse_tags(args.tags)
        if args.fashion_mnist:
            items = list(fashion_mnist_items(args.split, args.limit))
            source = args.source or f"fashion-mnist:{args.split}"
        else:
            items = list(folder_items(args.path, args.labels_from_dirs))[: args.limit]
            source = args.source or str(args.path)
        for item in items:
            item.label = parse_label(item.label)
    except InvalidValue as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not items:
        print("error: no images found", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(ingest(Settings(), items, tags, source, not args.no_progress, args.batch_size))
    except Exception as exc:  # one clear line, not a traceback wall
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
