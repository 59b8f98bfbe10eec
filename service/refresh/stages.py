"""The refresh's stages: `python -m training.moco` (or simclr / instdisc) with no `--data`, or `--catalogue`.

    train on the catalogue -> re-embed the whole catalogue -> build an index version (not current)
    -> evaluate it against the current version -> publish (switch CURRENT) -> the service swaps

Every stage records its result in `<out>/refresh.json` before the next one starts, so a killed
refresh resumes where it stopped (training itself resumes from its checkpoint), and nothing the
service reads changes until the last stage: a kill at any point leaves it on the previous version.

The quality guard compares weighted kNN top-1 (k=200, tau=0.07) of the new and the current model
on the same held-out slice of the labelled catalogue (a hashed 10% of the ids; memory: the other
labelled records), and refuses to publish a model that is worse by more than `--quality-margin`
unless `--force-publish`.
A run ends in `publish`, `refused` or `not_published` (`--no-publish`); the next run archives it to
`refresh-history.jsonl` and starts afresh, except that `--force-publish` after a refusal publishes
the refused version (as the refusal message promises) instead of training another model.

For crash testing, REFRESH_CRASH_AFTER=<stage> (train, embed, index, evaluate) makes the process
`os._exit(CRASH_EXIT_CODE)` right after that stage is recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index.build import build_tuned_index
from index.choose import DEFAULT_MAX_MEMORY, parse_bytes
from index.embeddings import Embeddings, load_embeddings, save_embeddings
from index.encoder_file import EncoderError, read_encoder_record
from index.knn import KNNClassifier
from index.store import ENCODER_FILE as VERSION_ENCODER_FILE
from index.store import IndexStore, IndexStoreError
from index.synced_store import open_store
from service.refresh import catalogue_source  # noqa: F401  (registers --data catalogue)
from service.settings import Settings
from training import distributed as dist
from training.cli import build_trainer
from training.config import SERVED_ENCODER, ConfigError, RunConfig, setting
from training.data.datasets import ImageDataset, held_out_mask, load_dataset
from training.embed import embed_in_shards
from training.encoder import Encoder
from training.errors import CommandRefused
from training.inference import write_inference_encoder

STATE_FILE = "refresh.json"
EMBEDDINGS_FILE = "embeddings.npz"
ENCODER_FILE = "encoder.pt"
FINAL_STAGES = ("publish", "refused", "not_published")
CRASH_ENV = "REFRESH_CRASH_AFTER"
CRASH_EXIT_CODE = 75
CALIBRATION_IMAGES = 2000  # catalogue images the deploy-time encoder's tolerance is checked on
MIN_HELD_OUT = 10  # fewer labelled queries (or memory rows) than this: the guard is skipped


@dataclass(frozen=True)
class RefreshOptions:
    """The refresh's own settings (flags by training.flags' generic mapping)."""

    catalogue: bool = setting(False, "refresh from the catalogue (implied without --data)")
    no_publish: bool = setting(False, "stop after evaluation; the new version is not made current")
    force_publish: bool = setting(False, "publish even when the quality guard says worse")
    quality_margin: float = setting(
        0.01, "largest drop in held-out kNN top-1 (absolute, 0.01 = 1 point) still published"
    )
    index_type: str = setting("auto", "index.build --type for the new version")
    target_recall: float = setting(0.95, "index.build --target-recall")


class RefreshRefused(CommandRefused):
    """The quality guard kept the current version (message says why; exit 3)."""


def version_encoder(store: IndexStore, version: str | None) -> Path | None:
    """The encoder file that comes with an index version (None without one): read from the
    version directory, without loading the FAISS index itself."""
    if version is None:
        return None
    path = store.version_dir(version) / VERSION_ENCODER_FILE
    return path if path.is_file() else None


def current_input_size(index_dir: Path, storage_url: str | None = None) -> int | None:
    """The input size of the encoder in the current index version (None when there is none)."""
    try:
        store = open_store(index_dir, storage_url)
        encoder_path = version_encoder(store, store.current_version())
        return int(read_encoder_record(encoder_path)["input_size"]) if encoder_path else None
    except (IndexStoreError, EncoderError, OSError):
        return None


def served_encoder(index_dir: Path, storage_url: str | None = None) -> Path:
    """The encoder file of the current index version (what the service serves): `--init current`.
    ConfigError when there is none to start from."""
    try:
        store = open_store(index_dir, storage_url)
        path = version_encoder(store, store.current_version())
    except IndexStoreError as exc:
        raise ConfigError(f"--init {SERVED_ENCODER}: {exc}") from None
    if path is None:
        raise ConfigError(
            f"--init {SERVED_ENCODER}: the service has no index version with an encoder yet "
            f"(index under {index_dir}); give --init FILE"
        )
    return path


class RefreshState:
    """`<out>/refresh.json`: which stages are done and what they produced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def done(self, stage: str) -> bool:
        return stage in self.data.get("stages", {})

    def result(self, stage: str) -> dict[str, Any]:
        return self.data["stages"][stage]

    def record(self, stage: str, result: dict[str, Any]) -> None:
        self.data.setdefault("stages", {})[stage] = result
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)
        if os.environ.get(CRASH_ENV) == stage:
            os._exit(CRASH_EXIT_CODE)

    def forget(self, stage: str) -> None:
        self.data.get("stages", {}).pop(stage, None)

    @property
    def finished(self) -> bool:
        return any(self.done(stage) for stage in FINAL_STAGES)


def start_or_resume(out: Path, force_publish: bool = False) -> RefreshState:
    """Resume an unfinished refresh in `out`; after a finished one, archive it and start afresh.
    `force_publish` after a refusal resumes instead, so the refused version gets published."""
    state = RefreshState(out / STATE_FILE)
    if force_publish and state.done("refused") and not state.done("publish"):
        state.forget("refused")
    if state.finished:
        history = out.parent / "refresh-history.jsonl"
        with open(history, "a") as f:
            f.write(json.dumps(state.data, default=str) + "\n")
        shutil.rmtree(out)
        state = RefreshState(out / STATE_FILE)
    out.mkdir(parents=True, exist_ok=True)
    if not state.data:
        state.data = {"started_at": datetime.now(timezone.utc).isoformat(), "stages": {}}
    return state


def held_out_accuracy(
    vectors: np.ndarray, labels: np.ndarray, ids: np.ndarray, k: int, tau: float
) -> float | None:
    """Weighted kNN top-1 of the held-out labelled slice (`held_out_mask`) against the other
    labelled rows (None when there are too few labels on either side)."""
    labelled = labels >= 0
    held = labelled & held_out_mask(ids)
    memory = labelled & ~held
    if held.sum() < MIN_HELD_OUT or memory.sum() < MIN_HELD_OUT:
        return None
    classifier = KNNClassifier.from_vectors(vectors[memory], labels[memory], k=k, tau=tau)
    return classifier.evaluate(vectors[held], labels[held])["top1"]


def embed_catalogue(
    encoder_path: Path, data_spec: str, device: torch.device
) -> tuple[ImageDataset, np.ndarray, str]:
    """(data set, NxD vectors, model version): the whole catalogue, sharded over ranks."""
    encoder = Encoder.load(encoder_path, device)
    data = load_dataset(data_spec, encoder.input_size, in_channels=encoder.in_channels)
    vectors = embed_in_shards(
        lambda batch: torch.from_numpy(encoder.embed(batch)), data.images, desc=f"embedding {data.name}"
    )
    return data, vectors.cpu().numpy(), encoder.version


def run_refresh(config: RunConfig, options: RefreshOptions) -> int:
    settings = Settings()
    device = dist.init_distributed(config.device)
    out = Path(config.out)
    if dist.is_main_process():
        state = start_or_resume(out, force_publish=options.force_publish)
    else:
        state = RefreshState(out / STATE_FILE)
    dist.barrier()
    say = print if dist.is_main_process() else (lambda *a, **k: None)

    # 1. Train (the engine resumes from <out>/checkpoint.pt after a kill).
    if not state.done("train"):
        summary = build_trainer(dataclasses.replace(config, resume="auto"), device).fit()
        if summary.get("stopped_by") == "signal":  # a budget's end is a finished training stage
            return 130
        if dist.is_main_process():
            state.record("train", {k: v for k, v in summary.items() if k != "history"})
    dist.barrier()
    encoder_path = out / ENCODER_FILE

    # 2. Re-embed the whole catalogue (including images added while training ran).
    embeddings_path = out / EMBEDDINGS_FILE
    if not RefreshState(out / STATE_FILE).done("embed"):
        data, vectors, model_version = embed_catalogue(encoder_path, config.data, device)
        if dist.is_main_process():
            save_embeddings(
                embeddings_path,
                Embeddings(
                    vectors, data.ids.numpy(), model_version, data.labels.numpy(), data.class_names or None
                ),
            )
            # The deploy-time form the service will run (the fastest of ONNX Runtime, TorchScript,
            # and bf16 where native and within tolerance on held-out images); index.store copies
            # it into the version with the encoder.
            write_inference_encoder(encoder_path, data.subset(CALIBRATION_IMAGES).images)
            state.record("embed", {"vectors": len(data), "model_version": model_version})
            say(f"embedded {len(data)} catalogue images with {model_version}")
    dist.barrier()
    if not dist.is_main_process():
        return 0

    store = open_store(settings.index_dir, settings.INDEX_STORAGE_URL)  # the service's storage too
    emb = load_embeddings(embeddings_path)

    # 3. Build and write a new version, not yet current.
    if not state.done("index"):
        index = build_tuned_index(
            emb.vectors, emb.ids, labels=emb.labels, class_names=emb.class_names,
            index_type=options.index_type, max_memory_bytes=parse_bytes(DEFAULT_MAX_MEMORY),
            target_recall=options.target_recall,
        )  # fmt: skip
        version = store.publish(
            index,
            encoder_path=encoder_path,
            extra_manifest={"created_by": f"refresh ({config.method})", "train": state.result("train")},
            make_current=False,
        )
        state.record(
            "index", {"version": version, "recall": index.manifest.get("recall", {}).get("measured")}
        )
        say(f"built index version {version} ({index.index_type}, {index.ntotal} vectors)")
    version = state.result("index")["version"]

    # 4. Evaluate against the current version on the same held-out slice.
    if not state.done("evaluate"):
        state.record("evaluate", evaluate_against_current(store, emb, config, options, device))
    verdict = state.result("evaluate")
    say(verdict["summary"])
    if options.no_publish:
        state.record("not_published", {"at": datetime.now(timezone.utc).isoformat()})
        say(f"--no-publish: version {version} is written but not current (index.store set_current to use it)")
        return 0
    if not verdict["better_or_equal"] and not options.force_publish:
        state.record("refused", {"at": datetime.now(timezone.utc).isoformat()})
        raise RefreshRefused(
            f"not published: {verdict['summary']}; the service stays on {verdict['current_version']} "
            "(--force-publish to publish anyway)"
        )

    # 5. Publish: one atomic switch of CURRENT; the service notices it and swaps.
    store.set_current(version)
    state.record("publish", {"version": version, "at": datetime.now(timezone.utc).isoformat()})
    say(f"published index version {version}; the running service swaps to it within its poll interval")
    return 0


def evaluate_against_current(
    store: IndexStore, emb: Embeddings, config: RunConfig, options: RefreshOptions, device: torch.device
) -> dict:
    """kNN top-1 of the new embeddings and of the current version's model on the same catalogue."""
    started = time.perf_counter()
    k, tau, margin = config.knn_k, config.knn_tau, options.quality_margin
    new = held_out_accuracy(emb.vectors, emb.labels, emb.ids, k, tau) if emb.labels is not None else None
    current_version = store.current_version()
    current = None
    if current_version is not None and new is not None:
        encoder_path = version_encoder(store, current_version)
        if encoder_path is not None:
            data, vectors, _ = embed_catalogue(encoder_path, config.data, device)
            current = held_out_accuracy(vectors, data.labels.numpy(), data.ids.numpy(), k, tau)
    better = new is None or current is None or new >= current - margin
    if new is None:
        text = "quality guard skipped: too few labelled catalogue images to hold out"
    elif current is None:
        text = f"held-out kNN top-1 {new:.2%} (no current model to compare with)"
    else:
        text = (
            f"held-out kNN top-1: new {new:.2%} vs current {current:.2%} "
            f"({'within' if better else 'worse than'} the {margin:.2%} margin)"
        )
    return {
        "new_top1": new,
        "current_top1": current,
        "current_version": current_version,
        "better_or_equal": better,
        "summary": text,
        "seconds": round(time.perf_counter() - started, 2),
    }
