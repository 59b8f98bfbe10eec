"""The loaded model + index, and everything that changes them: bootstrap, reload, add, remove, publish.

`Loaded` is an immutable snapshot (encoder, index, version). A request takes one reference at its
start and finishes on it; a reload builds the next snapshot fully, then swaps the single
reference (an atomic assignment), so in-flight requests never see a half-loaded version.
Index mutations (add/remove) happen in place on the loaded index and are republished, debounced,
as a new version through `IndexStore.publish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import faiss
import numpy as np
import torch

from index.search_index import SearchIndex
from index.store import ENCODER_FILE, CurrentMovedError
from index.synced_store import open_store
from service.batcher import EmbeddingBatcher
from service.record_cache import RecordCache
from service.settings import Settings
from service.thumbnail_cache import ThumbnailCache
from training.encoder import Encoder, EncoderError, read_encoder_record
from training.inference import ensure_inference_encoder, load_deploy_encoder

log = logging.getLogger("service.engine")
T = TypeVar("T")


@dataclass(frozen=True)
class Loaded:
    encoder: Encoder
    index: SearchIndex
    version: str  # the index version this in-memory index was loaded from or last published as

    @property
    def model_version(self) -> str:
        return self.encoder.version


# A forward pass on one intra-op thread up to this much work per image: each layer of a pass that
# spreads over threads wakes them, which costs a small encoder more than it saves. Measured here
# (bench/intra_op_threads.py; bench/RESULTS.md, "One intra-op thread for small encoders"): one image
# per pass through a two-thread pool at concurrency-1 pacing took 4.2 ms on one thread against 6.5
# on two for the demo encoder (29 MMACs), 15.7 against 20.5 ms for ResNet-18 x1 at 28 px (456
# MMACs), and 75.9 against 49.1 ms at 96 px (5 GMACs), where two threads win.
SINGLE_THREAD_MAX_MACS = 1_000_000_000


def intra_op_threads(encoder: Encoder, configured: int, default: int) -> int:
    """Torch threads for `encoder`'s forward passes: `configured` when set (> 0), else 1 for a
    small encoder and `default` (torch's own choice, one per core) for a large one."""
    if configured > 0:
        return configured
    return 1 if encoder.macs_per_image <= SINGLE_THREAD_MAX_MACS else default


def _search(
    index: SearchIndex, queries: np.ndarray, k: int, threads: int, expand: int
) -> tuple[np.ndarray, np.ndarray]:
    faiss.omp_set_num_threads(threads)
    return index.search(queries, k, expand=expand)


class NotReady(RuntimeError):
    """No model/index is loaded yet (message says why): HTTP 503."""


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._torch_threads = torch.get_num_threads()  # torch's default (one per core), before FAISS's
        # FAISS's idle OpenMP threads spin and starve torch's on a small machine (a 1-query search
        # gains nothing from them); request concurrency comes from the thread pool instead. OpenMP
        # counts threads per calling thread, so the pool's searches set it too (`search`).
        faiss.omp_set_num_threads(settings.FAISS_THREADS)
        self.store = open_store(settings.index_dir, settings.INDEX_STORAGE_URL)
        self.executor = ThreadPoolExecutor(settings.INFERENCE_THREADS, thread_name_prefix="inference")
        self.batcher = EmbeddingBatcher(self.executor, settings.EMBED_BATCH_MAX)
        self.records = RecordCache()  # label + tags of hot search results, invalidated on change
        self.thumbnails = ThumbnailCache(settings.THUMBNAIL_CACHE_BYTES)  # their PNGs, likewise
        self.loaded: Loaded | None = None
        self.problem: str | None = "the model and index are not loaded yet"
        # Serialises version changes (bootstrap, reload, publish) with each other.
        self.version_lock = asyncio.Lock()
        # Held while the index is mutated or written to disk, so a publish never sees half an add.
        self.mutation_lock = asyncio.Lock()
        self._changed_at: float | None = None  # monotonic time of the first unpublished change
        # Calls of `remove` so far: a writer that adds ids after their records exist compares it
        # before and after, to learn whether a delete may have run before its add (see indexing).
        self.removals = 0
        self._last_change: float = 0.0
        # Set by service.replica: whether this process may republish now (it holds the publisher
        # lease), and what every republished version records (lease term, change-stream token).
        self.may_publish: Callable[[], bool] = lambda: True
        self.publish_extras: Callable[[], dict[str, Any]] = dict
        # Ids being embedded and added right now (by reconcile: uploads write their vectors with
        # the insert): the change-stream watcher waits for them instead of embedding them twice.
        self._indexing: dict[int, asyncio.Future[None]] = {}
        self._serving = 0  # searches and classifications in flight: background scans wait for them
        # HNSW compaction (a rebuild without deleted vectors, minutes at 1M) runs on its own thread,
        # beside searches and mutations; a swap to another version or shutdown stops it between chunks.
        self._compactor = ThreadPoolExecutor(1, thread_name_prefix="compaction")
        self.compaction: asyncio.Task[None] | None = None  # the latest one (await it to wait)
        self._stop_compaction = threading.Event()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around a search or classification, so background work (cache warm-up) yields to it."""
        self._serving += 1
        try:
            yield
        finally:
            self._serving -= 1

    def busy(self) -> bool:
        return self._serving > 0

    # ----------------------------------------------------------------- threads
    async def run_in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """CPU work (decoding, inference, FAISS) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def search(
        self, loaded: Loaded, queries: np.ndarray, k: int, expand: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each NxK, of the loaded index for NxD `queries`, ranked with alpha query
        expansion over the top `expand` when > 0, on a pool thread with FAISS_THREADS OpenMP threads
        (that thread's count: the encoder sets its own before a pass)."""
        return await self.run_in_thread(
            _search, loaded.index, queries, k, self.settings.FAISS_THREADS, expand
        )

    def require(self) -> Loaded:
        loaded = self.loaded
        if loaded is None:
            raise NotReady(self.problem or "the model and index are not loaded")
        return loaded

    # ----------------------------------------------------------------- loading
    async def load_current(self) -> bool:
        """Load the newest published version if it differs from the loaded one; bootstrap an empty
        index when none exists but a model does. Returns True when a new snapshot was swapped in."""
        async with self.version_lock:
            version = await self.run_in_thread(self.store.current_version)
            if version is None:
                version = await self._bootstrap()
                if version is None:
                    return False
            if self.loaded is not None and self.loaded.version == version:
                return False
            try:
                loaded = await self.run_in_thread(self._load_version, version)
            except Exception as exc:  # a broken version must not take the service down
                self.problem = f"index version {version} could not be loaded: {exc}"
                log.error("%s", self.problem)
                return False
            # A pass on one thread leaves the pool's other threads to batches of their own.
            threads = loaded.encoder.threads or 1
            self.batcher.max_in_flight = max(1, self.settings.INFERENCE_THREADS // threads)
            previous, self.loaded, self.problem = self.loaded, loaded, None
            self._changed_at = None
            self._stop_compaction.set()  # a compaction of the previous index is wasted work now
            log.info(
                "loaded index version %s (%s, %d vectors, dim %d) with model %s%s",
                version, loaded.index.index_type, loaded.index.ntotal, loaded.index.dim, loaded.model_version,
                f" (was {previous.version})" if previous else "",
            )  # fmt: skip
            return True

    def _fit_threads(self, encoder: Encoder) -> None:
        """Intra-op threads for this encoder's passes, which the encoder applies in whichever pool
        thread runs one (OpenMP counts threads per calling thread)."""
        encoder.threads = intra_op_threads(encoder, self.settings.INTRA_OP_THREADS, self._torch_threads)
        log.info(
            "model %s: %.0f MMACs per image, %d intra-op thread(s) per forward pass in %s",
            encoder.version, encoder.macs_per_image / 1e6, encoder.threads,
            getattr(encoder, "runtime", "the training graph"),
        )  # fmt: skip

    def _load_version(self, version: str) -> Loaded:
        index = self.store.load(version)
        encoder_path = index.encoder_path
        if encoder_path is None:
            raise EncoderError(f"index version {version} has no encoder file")
        encoder = load_deploy_encoder(encoder_path)  # folded eval graph in its fastest stored form
        if encoder.embed_dim != index.dim:
            raise EncoderError(f"encoder dimension {encoder.embed_dim} != index dimension {index.dim}")
        self._fit_threads(encoder)  # counts its work here, off the event loop (one pass of a blank image)
        if self.settings.SEARCH_EXPAND:
            index.prepare_vector_reads()  # before the swap: the first expanded search does not build it
        return Loaded(encoder, index, version)

    async def _bootstrap(self) -> str | None:
        """No index version yet: publish an empty flat index of the model's dimension (the catalogue
        then fills it through reconcile). Without a model, say so for readiness."""
        checkpoint = self.settings.model_checkpoint
        if not checkpoint.is_file():
            self.problem = (
                f"no model: no index version in {self.settings.index_dir} and no encoder file at "
                f"{checkpoint} (train one, e.g. python -m training.moco, or set MODEL_CHECKPOINT)"
            )
            return None
        try:
            record = await self.run_in_thread(read_encoder_record, checkpoint)
        except EncoderError as exc:
            self.problem = str(exc)
            return None
        # Its deploy form goes with the version (unless one is there already), so every replica
        # loads the compiled form instead of folding the training graph at each start.
        await self.run_in_thread(ensure_inference_encoder, checkpoint)
        empty = SearchIndex.empty_flat(int(record["embed_dim"]))
        version = await self.run_in_thread(
            self._publish_blocking, empty, checkpoint, {"created_by": "bootstrap"}
        )
        log.info(
            "no index version existed: published an empty flat index %s for model %s",
            version,
            record["version"],
        )
        return version

    def _publish_blocking(
        self, index: SearchIndex, encoder_path: Any, extra: dict[str, Any], expected_current: Any = None
    ) -> str:
        """Publish; with `expected_current` (a version name) only if CURRENT still names it."""
        checks = {} if expected_current is None else {"expected_current": expected_current}
        result = self.store.publish(index, encoder_path=encoder_path, extra_manifest=extra, **checks)
        return result if isinstance(result, str) else str(self.store.current_version())

    # ----------------------------------------------------------------- embedding and mutation
    async def embed(self, loaded: Loaded, images: torch.Tensor) -> np.ndarray:
        """float32 NxD for uint8 NxCxSxS images (micro-batched with concurrent requests)."""
        return await self.batcher.embed(loaded.encoder, images)

    async def add(self, loaded: Loaded, vectors: np.ndarray, ids: list[int]) -> list[int]:
        """Add the vectors whose ids are not in the index yet; returns the ids added."""
        async with self.mutation_lock:
            current = self.loaded
            if current is None or current.index is not loaded.index:
                return []  # swapped meanwhile: the reconcile after the swap adds them
            present = await self.run_in_thread(loaded.index.contains, np.asarray(ids, dtype=np.int64))
            keep = [i for i, p in enumerate(present.tolist()) if not p]
            if keep:
                await self.run_in_thread(
                    loaded.index.add, vectors[keep], np.asarray(ids, dtype=np.int64)[keep]
                )
                self._note_change()
            return [ids[i] for i in keep]

    async def remove(self, ids: list[int]) -> int:
        self.removals += 1  # counted whatever it removes: a no-op may be a delete that came too early
        loaded = self.loaded
        if loaded is None or not ids:
            return 0
        async with self.mutation_lock:
            removed = await self.run_in_thread(
                functools.partial(loaded.index.remove, np.asarray(ids, dtype=np.int64), compact=False)
            )
            if removed:
                self._note_change()
        if loaded.index.needs_compaction:
            self.start_compaction(loaded)
        return int(removed)

    def start_compaction(self, loaded: Loaded) -> asyncio.Task[None] | None:
        """Compact the loaded HNSW graph in the background unless a compaction is running."""
        if self.compaction is not None and not self.compaction.done():
            return None
        self._stop_compaction = threading.Event()
        self.compaction = asyncio.get_running_loop().create_task(self._compact(loaded, self._stop_compaction))
        return self.compaction

    async def _compact(self, loaded: Loaded, stop: threading.Event) -> None:
        index, started = loaded.index, time.monotonic()
        deleted = index.deleted_count
        log.info(
            "compacting the HNSW graph: %d deleted of %d stored vectors", deleted, deleted + index.ntotal
        )
        try:
            swapped = await asyncio.get_running_loop().run_in_executor(
                self._compactor, functools.partial(index.compact, stop=stop)
            )
        except Exception:  # the old graph stays in service; the next remove tries again
            log.exception("compacting the HNSW graph failed")
            return
        if swapped and self.loaded is not None and self.loaded.index is index:
            self._note_change()  # publish the smaller graph
            log.info("compacted the HNSW graph in %.1f s", time.monotonic() - started)

    @contextlib.contextmanager
    def indexing(self, ids: list[int]) -> Iterator[None]:
        """Mark `ids` as being embedded and added by the caller until the block ends."""
        loop = asyncio.get_running_loop()
        mine = {i: loop.create_future() for i in ids if i not in self._indexing}
        self._indexing.update(mine)
        try:
            yield
        finally:
            for image_id, done in mine.items():
                self._indexing.pop(image_id, None)
                done.set_result(None)

    async def wait_indexing(self, ids: list[int]) -> None:
        """Until none of `ids` is being indexed by someone else in this process."""
        pending = [self._indexing[i] for i in ids if i in self._indexing]
        if pending:
            await asyncio.gather(*pending)

    def _note_change(self) -> None:
        now = time.monotonic()
        self._last_change = now
        if self._changed_at is None:
            self._changed_at = now

    @property
    def has_unpublished_changes(self) -> bool:
        return self._changed_at is not None

    # ----------------------------------------------------------------- publishing
    async def publish_if_due(self, force: bool = False) -> str | None:
        """Republish the in-memory index as a new version once changes have been quiet for
        PUBLISH_DEBOUNCE_SECONDS (or 6x that since the first change, so a steady stream still gets
        published), or at once with `force` (shutdown)."""
        if self._changed_at is None or not self.may_publish():
            return None
        now, debounce = time.monotonic(), self.settings.PUBLISH_DEBOUNCE_SECONDS
        quiet = now - self._last_change >= debounce
        overdue = now - self._changed_at >= 6 * debounce
        if not (force or quiet or overdue):
            return None
        async with self.version_lock:
            loaded = self.loaded
            if loaded is None or self._changed_at is None or not self.may_publish():
                return None
            current = await self.run_in_thread(self.store.current_version)
            if current != loaded.version:
                # Someone else published meanwhile: theirs wins; reload + reconcile re-add our changes.
                log.warning(
                    "not republishing: CURRENT moved to %s under us (loaded %s)", current, loaded.version
                )
                return None
            async with self.mutation_lock:
                self._changed_at = None
                encoder_path = loaded.index.encoder_path
                extra = {
                    "created_by": "service",
                    "based_on": loaded.version,
                    "model_version": loaded.model_version,
                    **self.publish_extras(),  # read under the mutation lock: it describes this index
                }
                try:  # the check above is advisory; the store re-checks under its cross-process lock
                    version = await self.run_in_thread(
                        self._publish_blocking, loaded.index, encoder_path, extra, loaded.version
                    )
                except CurrentMovedError as exc:
                    self._changed_at = self._changed_at or time.monotonic()
                    log.warning("not republishing: %s", exc)
                    return None
            # The in-memory index now *is* that version: no reload needed for our own publish.
            self._rebase(loaded, version)
            pruned = await self.run_in_thread(self.store.prune, self.settings.INDEX_KEEP_VERSIONS)
            if pruned:
                log.info("pruned %d old index version(s)", len(pruned))
            log.info("published index version %s (%d vectors)", version, loaded.index.ntotal)
            return version

    def _rebase(self, loaded: Loaded, version: str) -> None:
        """Name `version` as what the loaded index is (the parent of our next publish), without
        reloading; our next publish copies the encoder from it, so older versions can be pruned."""
        loaded.index.manifest["version"] = version
        loaded.index.encoder_path = self.store.version_dir(version) / ENCODER_FILE
        self.loaded = replace(loaded, version=version)

    async def adopt(self, version: str) -> bool:
        """Take a peer's republish of our model as our base instead of loading it (service.replica:
        a replica that follows the catalogue already holds what it contains)."""
        async with self.version_lock:
            loaded = self.loaded
            if loaded is None or loaded.version == version:
                return False
            async with self.mutation_lock:
                self._rebase(loaded, version)
            log.info("adopted index version %s (a peer's republish of our model)", version)
            return True

    def shutdown(self) -> None:
        self.records.stop()
        self.thumbnails.stop()
        self._stop_compaction.set()
        self._compactor.shutdown(wait=True, cancel_futures=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
        # A pool thread's torch.set_num_threads also set the count new threads start with: put the
        # process's default back for whatever runs after (tests run engines in-process).
        torch.set_num_threads(self._torch_threads)
