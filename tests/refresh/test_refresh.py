"""The refresh loop end to end: `python -m training.moco` (catalogue mode) against a running service
on a real MongoDB-wire server over real HTTP, plus its pieces (held-out kNN, catalogue loading)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gridfs import GridFSBucket
from pymongo import MongoClient
from refresh_helpers import CATALOGUE_SIZE, CatalogueDb, run_refresh
from service_helpers import fashion_mnist, fashion_mnist_pngs, wait_until

import training.data.catalogue as catalogue_module
from index.encoder_file import encoder_version
from index.search_index import SearchIndex
from index.store import IndexStore
from service.refresh.stages import CRASH_EXIT_CODE, held_out_accuracy, start_or_resume
from training.data.datasets import ImageDataset, held_out_mask, load_dataset, split_held_out
from training.data.images import load_uint8
from training.encoder import Encoder, read_encoder_record

# The guard's vote: tau as in Wu et al. 2018, but k = 20, not the paper's 200: on a 300-image catalogue
# (~270 memory rows) k = 200 lets nearly every image vote and the guard sees class frequencies only.
GUARD_K, TAU = 20, 0.07
# The guard's worse model embeds at one size: with the small-image default's second size (3/4) the
# same three steps of a 1/8-width network reach the served 1/4-width random encoder (58% vs 55%).
ONE_SCALE = ("--embedding-scales", "1")
SETTLE_S = 90  # start-up reconcile embeds the whole catalogue on a shared 2-core machine
SEARCHES_PER_WORKER = 3000  # bound on the background load


# --- helpers ---------------------------------------------------------------------------------------


def refresh_dir(data_dir: Path) -> Path:
    return data_dir / "refresh" / "moco-v2"  # DATA_DIR/refresh/<method>


def refresh_state(data_dir: Path) -> dict:
    return json.loads((refresh_dir(data_dir) / "refresh.json").read_text())


def settled(client: httpx.Client, store: IndexStore) -> dict | None:
    """/version once the service has published its start-up reconcile (whole catalogue in CURRENT,
    CURRENT = what it serves), so nothing of its own moves CURRENT while a refresh runs."""
    served = client.get("/version").json()
    current = store.current_version()
    if served["index_size"] != CATALOGUE_SIZE or current != served["index_version"]:
        return None
    return served if store.read_manifest(current)["ntotal"] == CATALOGUE_SIZE else None


def search(http: httpx.Client, image: bytes) -> httpx.Response:
    return http.post("/search", files={"file": ("q.png", image, "image/png")}, data={"k": "5"})


def assert_finds_itself(client: httpx.Client, catalogue: CatalogueDb, position: int) -> None:
    reply = search(client, catalogue.images[position])
    assert reply.status_code == 200, reply.text
    first = reply.json()["results"][0]
    assert first["id"] == catalogue.ids[position] and first["score"] == pytest.approx(1.0, abs=1e-4)


def direct_weighted_knn_top1(
    vectors: np.ndarray, labels: np.ndarray, ids: np.ndarray, k: int, tau: float
) -> float:
    """Wu et al. 2018 written out: each held-out query's k most similar labelled memory rows vote
    exp(s/tau) for their class; top-1 = share of queries whose best class is their own."""
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    held = (labels >= 0) & held_out_mask(ids)
    memory = (labels >= 0) & ~held
    similarities = vectors[held].astype(np.float64) @ vectors[memory].astype(np.float64).T  # QxM
    memory_labels = labels[memory]
    correct = 0
    for query_similarities, true_label in zip(similarities, labels[held], strict=True):
        nearest = np.argsort(-query_similarities)[:k]
        votes = np.zeros(labels.max() + 1)
        for j in nearest:
            votes[memory_labels[j]] += np.exp(query_similarities[j] / tau)
        correct += int(votes.argmax() == true_label)
    return correct / int(held.sum())


def catalogue_vectors(
    encoder_path: Path, catalogue: CatalogueDb
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, labels, ids) of the catalogue embedded by an encoder from the uploaded bytes."""
    encoder = Encoder.load(encoder_path)
    images = torch.stack(
        [load_uint8(data, encoder.in_channels, encoder.input_size) for data in catalogue.images]
    )
    names = sorted(set(catalogue.labels))
    labels = np.array([names.index(label) for label in catalogue.labels])
    return encoder.embed(images), labels, np.array(catalogue.ids)


class SearchLoad:
    """Background POST /search traffic (bounded) recording every outcome and the models that answered."""

    def __init__(self, base_url: str, catalogue: CatalogueDb, workers: int = 2) -> None:
        self.catalogue = catalogue
        self.stop = threading.Event()
        self.outcomes: Counter = Counter()
        self.models: Counter = Counter()
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(base_url, worker), daemon=True)
            for worker in range(workers)
        ]

    def __enter__(self) -> SearchLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _run(self, base_url: str, worker: int) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            for n in range(SEARCHES_PER_WORKER):
                if self.stop.wait(0.02):  # paced: the refresh needs the CPUs too
                    return
                position = (worker * 7 + n * 13) % CATALOGUE_SIZE
                try:
                    reply = search(http, self.catalogue.images[position])
                except httpx.HTTPError as exc:
                    self.outcomes["transport error"] += 1
                    self.failures.append(repr(exc))
                    continue
                self.outcomes[reply.status_code] += 1
                if reply.status_code != 200:
                    self.failures.append(reply.text)
                    continue
                body = reply.json()
                self.models[body["model_version"]] += 1
                first = body["results"][0] if body["results"] else None
                if first is None or first["id"] != self.catalogue.ids[position]:
                    self.failures.append(f"image {position} did not find itself first: {first}")


# --- the refresh against a running service ----------------------------------------------------------


def test_refresh_publishes_a_version_the_running_service_swaps_to_under_load(
    catalogue: CatalogueDb, data_dir: Path, service_on
) -> None:
    store = IndexStore(data_dir / "index")
    with service_on() as client:
        before = wait_until(lambda: settled(client, store), timeout_s=SETTLE_S, what="the service to settle")
        with SearchLoad(str(client.base_url), catalogue) as load:
            wait_until(lambda: load.outcomes[200] >= 10, what="searches before the refresh")
            result = run_refresh(data_dir, catalogue, "--force-publish")
            assert result.returncode == 0, result.stderr
            state = refresh_state(data_dir)
            version = state["stages"]["publish"]["version"]
            new_model = state["stages"]["embed"]["model_version"]
            served = wait_until(
                lambda: (v := client.get("/version").json())["index_version"] == version and v,
                what="the service to load the refreshed version",
            )
            wait_until(lambda: load.models[new_model] >= 10, what="searches answered by the new model")

        assert list(state["stages"]) == ["train", "embed", "index", "evaluate", "publish"]
        assert served["model_version"] == new_model != before["model_version"]
        assert served["index_size"] == CATALOGUE_SIZE and store.current_version() == version
        assert load.failures == [] and set(load.outcomes) == {200}, (load.outcomes, load.failures[:3])
        assert load.models[before["model_version"]] >= 10
        manifest = store.read_manifest(version)
        assert manifest["created_by"] == "refresh (moco-v2)" and manifest["ntotal"] == CATALOGUE_SIZE
        encoder = read_encoder_record(store.version_dir(version) / "encoder.pt")
        # the served model's input: 28 px catalogue images trained at their size, embedded at twice it
        assert (encoder["train_size"], encoder["input_size"], encoder["in_channels"]) == (28, 56, 1)
        for position in (0, 101, 299):
            assert_finds_itself(client, catalogue, position)


def test_a_neighbours_refresh_fine_tunes_the_served_encoder_and_publishes_it(
    catalogue: CatalogueDb, data_dir: Path, service_on
) -> None:
    """`python -m training.neighbours` in catalogue mode starts from the served encoder (`--init`
    defaults to `current` there): it mines the catalogue's own neighbours with it, fine-tunes it
    and publishes the result."""
    store = IndexStore(data_dir / "index")
    tiny = ("--batch-size", "32", "--epochs", "1", "--max-steps", "3", "--knn-every", "0", "--workers", "1")
    command = ("training.neighbours", *tiny, "--no-progress", "--no-tensorboard")
    with service_on() as client:
        before = wait_until(lambda: settled(client, store), timeout_s=SETTLE_S, what="the service to settle")
        served = store.load().encoder_path
        result = run_refresh(data_dir, catalogue, "--force-publish", command=command)
        assert result.returncode == 0, result.stderr
        started_from = re.search(r"init=(\S+) \[catalogue\]", result.stdout)
        assert started_from, result.stdout
        assert encoder_version(Path(started_from[1])) == encoder_version(served)
        assert f"mined the top 10 neighbours of {CATALOGUE_SIZE} images" in result.stdout
        version = json.loads((data_dir / "refresh" / "neighbours" / "refresh.json").read_text())["stages"][
            "publish"
        ]["version"]
        now = wait_until(
            lambda: (v := client.get("/version").json())["index_version"] == version and v,
            what="the service to load the fine-tuned version",
        )
        assert (
            now["model_version"].startswith("neighbours-") and now["model_version"] != before["model_version"]
        )
        assert store.read_manifest(version)["created_by"] == "refresh (neighbours)"
        trained = read_encoder_record(store.version_dir(version) / "encoder.pt")
        start = read_encoder_record(served)
        assert trained["network"]["kwargs"] == start["network"]["kwargs"]  # the served network, fine-tuned
        assert not torch.equal(
            trained["state_dict"]["backbone.conv1.weight"], start["state_dict"]["backbone.conv1.weight"]
        )
        assert_finds_itself(client, catalogue, 7)


def test_quality_guard_refuses_a_worse_model_then_force_publish_publishes_it(
    catalogue: CatalogueDb, data_dir: Path, service_on
) -> None:
    store = IndexStore(data_dir / "index")
    with service_on() as client:
        before = wait_until(lambda: settled(client, store), timeout_s=SETTLE_S, what="the service to settle")
        # The new model: 1/8 width, three MoCo steps from random weights, one size; measured at 42%
        # held-out top-1 against 55% for the served 1/4-width random encoder: a genuinely worse model.
        refused = run_refresh(data_dir, catalogue, "--knn-k", str(GUARD_K), *ONE_SCALE)
        assert refused.returncode == 3, refused.stderr
        assert "Traceback" not in refused.stderr
        message = refused.stderr.strip().splitlines()[-1]
        assert message.startswith("refused: not published: held-out kNN top-1: new ")
        assert f"stays on {before['index_version']}" in message and "--force-publish" in message
        state = refresh_state(data_dir)
        verdict, written = state["stages"]["evaluate"], state["stages"]["index"]["version"]
        assert verdict["current_version"] == before["index_version"] and not verdict["better_or_equal"]
        assert verdict["new_top1"] < verdict["current_top1"] - 0.01
        assert verdict["current_top1"] > 0.4  # random ResNet features: far above chance (10 classes)
        # The guard's figure for the current model, recomputed directly from the uploaded bytes.
        vectors, labels, ids = catalogue_vectors(store.load().encoder_path, catalogue)
        assert verdict["current_top1"] == pytest.approx(
            direct_weighted_knn_top1(vectors, labels, ids, GUARD_K, TAU)
        )
        assert store.current_version() == before["index_version"]
        assert written in store.versions() and written != before["index_version"]
        assert client.get("/version").json()["index_version"] == before["index_version"]
        assert_finds_itself(client, catalogue, 5)

        # As the message says: --force-publish publishes the refused version, without training again.
        checkpoint = refresh_dir(data_dir) / "checkpoint.pt"
        trained_at = checkpoint.stat().st_mtime_ns
        forced = run_refresh(data_dir, catalogue, "--knn-k", str(GUARD_K), *ONE_SCALE, "--force-publish")
        assert forced.returncode == 0, forced.stderr
        assert refresh_state(data_dir)["stages"]["publish"]["version"] == written
        assert checkpoint.stat().st_mtime_ns == trained_at
        wait_until(
            lambda: client.get("/version").json()["index_version"] == written, what="the forced version"
        )


@pytest.mark.parametrize(
    ("crash_env", "crash_at", "exit_code"),
    [("REFRESH_CRASH_AFTER", "embed", CRASH_EXIT_CODE), ("INDEX_STORE_CRASH_AT", "renamed", 86)],
    ids=["after-embedding", "inside-index-publish"],
)
def test_killed_refresh_leaves_the_service_alone_and_resumes(
    catalogue: CatalogueDb, data_dir: Path, service_on, crash_env: str, crash_at: str, exit_code: int
) -> None:
    store = IndexStore(data_dir / "index")
    out = refresh_dir(data_dir)
    with service_on() as client:
        before = wait_until(lambda: settled(client, store), timeout_s=SETTLE_S, what="the service to settle")
        versions_before = set(store.versions())
        crashed = run_refresh(data_dir, catalogue, "--force-publish", env={crash_env: crash_at})
        assert crashed.returncode == exit_code, crashed.stderr
        assert list(refresh_state(data_dir)["stages"]) == ["train", "embed"]
        assert store.current_version() == before["index_version"]
        assert client.get("/version").json()["index_version"] == before["index_version"]
        assert_finds_itself(client, catalogue, 7)
        kept = {name: (out / name).stat().st_mtime_ns for name in ("checkpoint.pt", "embeddings.npz")}
        stages_kept = {s: refresh_state(data_dir)["stages"][s] for s in ("train", "embed")}

        resumed = run_refresh(data_dir, catalogue, "--force-publish")
        assert resumed.returncode == 0, resumed.stderr
        assert "embedded" not in resumed.stdout  # neither trained nor embedded again:
        assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
        state = refresh_state(data_dir)
        assert {s: state["stages"][s] for s in stages_kept} == stages_kept
        version = state["stages"]["publish"]["version"]
        assert version not in versions_before and store.current_version() == version
        if crash_at == "renamed":  # the killed publish left a complete version that never became current
            assert len(set(store.versions()) - versions_before) == 2
        wait_until(
            lambda: client.get("/version").json()["index_version"] == version, what="the resumed version"
        )
        assert_finds_itself(client, catalogue, 7)


def test_budgeted_no_publish_refresh_writes_a_version_that_is_not_current_and_ends_the_run(
    catalogue: CatalogueDb, data_dir: Path
) -> None:
    store = IndexStore(data_dir / "index")
    random_model = Encoder.load(data_dir / "model.pt")
    current = store.publish(
        SearchIndex.empty_flat(random_model.embed_dim), encoder_path=data_dir / "model.pt"
    )

    # A training budget that runs out after the first step ends the training stage, not the refresh.
    result = run_refresh(data_dir, catalogue, "--no-publish", "--time-budget", "1e-6")
    assert result.returncode == 0, result.stderr
    state = refresh_state(data_dir)
    assert state["stages"]["train"]["stopped_by"] == "time_budget" and state["stages"]["train"]["steps"] == 1
    written = state["stages"]["index"]["version"]
    assert list(state["stages"]) == ["train", "embed", "index", "evaluate", "not_published"]
    assert f"--no-publish: version {written} is written but not current" in result.stdout
    assert state["stages"]["evaluate"]["current_version"] == current
    assert store.current_version() == current and written in store.versions()
    assert store.load(written).ntotal == CATALOGUE_SIZE

    # The run is over: the next refresh archives it and starts afresh instead of publishing it.
    fresh = start_or_resume(refresh_dir(data_dir))
    assert fresh.data["stages"] == {}
    history = (data_dir / "refresh" / "refresh-history.jsonl").read_text().splitlines()
    assert [json.loads(line)["stages"]["index"]["version"] for line in history] == [written]


# --- the pieces ------------------------------------------------------------------------------------


def test_held_out_accuracy_matches_the_direct_weighted_knn() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    labels = rng.integers(0, 5, size=800)
    vectors = (centres[labels] + 1.2 * rng.normal(size=(800, 16))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.choice(10**9, size=800, replace=False).astype(np.int64)
    labels[rng.random(800) < 0.2] = -1  # unlabelled images neither vote nor get asked
    for k in (1, GUARD_K, 200):
        expected = direct_weighted_knn_top1(vectors, labels, ids, k, TAU)
        assert held_out_accuracy(vectors, labels, ids, k, TAU) == pytest.approx(expected, abs=1e-12)
    assert 0.3 < expected < 1.0  # a task that is neither trivial nor hopeless
    assert held_out_accuracy(vectors, np.full(800, -1), ids, 200, TAU) is None


def test_held_out_slice_is_a_tenth_spread_over_sequential_ids() -> None:
    ids = np.arange(1, 20_001)  # the catalogue's ids: a counter
    held = held_out_mask(ids)
    assert 0.09 < held.mean() < 0.11
    per_hundred = held.reshape(-1, 100).sum(1)  # `id % 1000 < 100` would give 100 or 0 here
    assert per_hundred.min() >= 1 and per_hundred.max() <= 25
    # Uploaded class by class (as `service.ingest --labels-from-dirs` does): classes stay represented.
    blocks = (ids[:300] - 1) // 30
    assert len(set(blocks[held[:300]])) >= 8
    assert np.array_equal(held_out_mask(ids), held)  # stable


def test_training_split_holds_out_a_tenth_of_a_sequential_catalogue() -> None:
    ids = torch.arange(1, 301)
    labels = (ids - 1) // 30  # uploaded class by class
    images = torch.zeros(300, 1, 2, 2, dtype=torch.uint8)
    catalogue = ImageDataset("catalogue", images, labels, ids, list("abcdefghij"))
    _, held_out = split_held_out(catalogue)
    # About a tenth, spread over the whole id range (not the first uploads): most classes appear.
    assert 15 <= len(held_out) <= 50
    assert len(set(held_out.labels.tolist())) >= 7


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count the catalogue's image decodes (the real decoder still runs)."""
    calls: Counter = Counter()

    def counting(data: bytes, channels: int, size: int):
        calls["decode"] += 1
        return load_uint8(data, channels, size)

    monkeypatch.setattr(catalogue_module, "load_uint8", counting)
    return calls


def test_catalogue_source_reads_every_record_once_then_from_its_cache(
    catalogue: CatalogueDb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {
        "MONGO_URI": catalogue.uri,
        "MONGO_DB": catalogue.db_name,
        "DATA_DIR": tmp_path,
    }.items():
        monkeypatch.setenv(key, str(value))
    decodes = count_decodes(monkeypatch)
    first = load_dataset("catalogue", 28)
    assert decodes["decode"] == CATALOGUE_SIZE
    assert first.ids.tolist() == sorted(catalogue.ids)
    by_id = dict(zip(catalogue.ids, range(CATALOGUE_SIZE), strict=True))
    order = [by_id[i] for i in first.ids.tolist()]
    assert [first.class_names[j] for j in first.labels.tolist()] == [catalogue.labels[p] for p in order]
    pixels = fashion_mnist("test")[0]
    assert first.in_channels == 1 and torch.equal(first.images[:, 0], torch.from_numpy(pixels[order]))
    assert list((tmp_path / "cache").iterdir()), "no decode cache written"

    second = load_dataset("catalogue", 28)
    assert decodes["decode"] == CATALOGUE_SIZE  # nothing decoded again
    assert torch.equal(second.images, first.images) and torch.equal(second.ids, first.ids)


def test_catalogue_drops_deleted_records_and_decodes_only_new_ones(
    mongo_uri: str, mongo_db_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = fashion_mnist_pngs(0, 13)
    with MongoClient(mongo_uri) as mongo:
        db = mongo[mongo_db_name]
        content = GridFSBucket(db, "content")

        def store_record(image_id: int, data: bytes, label: str) -> None:  # the service's layout
            content.upload_from_stream_with_id(image_id, f"{image_id}.png", data)
            db.images.insert_one(
                {"_id": image_id, "sha256": hashlib.sha256(data).hexdigest(), "label": label,
                 "status": "indexed", "created_at": datetime.now(timezone.utc)}
            )  # fmt: skip

        for image_id, (data, label) in enumerate(items[:12], start=1):
            store_record(image_id, data, label)
        decodes = count_decodes(monkeypatch)
        load = lambda: catalogue_module.load_catalogue(mongo_uri, mongo_db_name, 28, cache_dir=tmp_path)  # noqa: E731
        assert len(load()) == 12 and decodes["decode"] == 12

        db.images.delete_one({"_id": 5})
        after_delete = load()
        assert 5 not in after_delete.ids.tolist() and len(after_delete) == 11
        assert decodes["decode"] == 12

        store_record(13, *items[12])
        after_add = load()
        assert after_add.ids.tolist() == [i for i in range(1, 14) if i != 5]
        assert decodes["decode"] == 13  # only the new image
        assert after_add.class_names[int(after_add.labels[-1])] == items[12][1]
