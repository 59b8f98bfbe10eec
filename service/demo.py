"""The first-run demo behind `make run`: a trained model and a labelled catalogue, when missing.

    python -m service.demo [--count 10000]

1. No index version and no encoder at MODEL_CHECKPOINT: install the committed demo encoder
   (service/assets/demo-encoder.pt, trained by this project's own command: see its model card).
2. An empty catalogue: ingest the Fashion-MNIST test split (labelled) with `service.ingest`.
Both steps are skipped when their result exists, so a second `make run` goes straight to serving.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from pathlib import Path

from pymongo import MongoClient

from index.synced_store import open_store
from service.connection import attach_or_start
from service.ingest import fashion_mnist_items, ingest
from service.settings import Settings
from training.data.datasets import DataError
from training.inference import calibration_images, write_inference_encoder

ASSETS = Path(__file__).parent / "assets"
DEMO_ENCODER = ASSETS / "demo-encoder.pt"
MODEL_CARD = ASSETS / "MODEL_CARD.md"


def ensure_model(settings: Settings) -> str:
    """What serves queries: an existing index version, an existing model, or the demo encoder."""
    current = open_store(settings.index_dir, settings.INDEX_STORAGE_URL).current_version()
    if current is not None:
        return f"index version {current}"
    if settings.model_checkpoint.is_file():
        return f"model {settings.model_checkpoint}"
    settings.model_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    # Copy, then rename: replicas starting together on one volume never read half a file.
    partial = settings.model_checkpoint.with_name(f".{settings.model_checkpoint.name}.{os.getpid()}.tmp")
    shutil.copyfile(DEMO_ENCODER, partial)
    os.replace(partial, settings.model_checkpoint)
    installed = f"demo encoder installed at {settings.model_checkpoint} (model card: {MODEL_CARD})"
    return f"{installed}; {deploy_form(settings)}"


def deploy_form(settings: Settings) -> str:
    """Write the demo encoder's deploy-time form next to it (the fastest here of ONNX Runtime,
    TorchScript, and bf16 where native and Fashion-MNIST test images stay within tolerance); the
    first published version carries it to the service."""
    try:
        calibration = calibration_images("fashion-mnist:test", settings.model_checkpoint)
    except (DataError, OSError) as exc:  # no data set here: the service folds the encoder in fp32
        return f"deploy form: fp32 (no calibration images: {exc})"
    record = write_inference_encoder(settings.model_checkpoint, calibration)
    agreement = record["agreement"]
    return (
        f"deploy form: {record['dtype']} in {record['runtime']}, mean cosine "
        f"{agreement['mean_cosine']:.5f} to fp32, top-10 overlap {agreement['top10_overlap']:.3f}"
    )


def catalogue_size(settings: Settings) -> int:
    uri, started = attach_or_start(settings)
    try:
        client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=settings.MONGO_TIMEOUT_MS)
        try:
            return client[settings.MONGO_DB]["images"].estimated_document_count()
        finally:
            client.close()
    finally:
        if started is not None:
            started.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="Fashion-MNIST test images to ingest")
    parser.add_argument("--model-only", action="store_true", help="only step 1 (e.g. in a container)")
    args = parser.parse_args(argv)
    settings = Settings()
    print(f"model: {ensure_model(settings)}")
    if args.model_only:
        return 0
    size = catalogue_size(settings)
    if size:
        print(f"catalogue: {size} images already in {settings.MONGO_DB}")
        return 0
    print(f"catalogue: empty; ingesting {args.count} labelled Fashion-MNIST test images")
    items = list(fashion_mnist_items("test", args.count))
    summary = asyncio.run(ingest(settings, items, [], "fashion-mnist:test"))
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
