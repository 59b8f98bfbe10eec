"""`SearchIndex`: one FAISS index plus everything needed to use it by catalogue id.

Every vector carries its int64 catalogue id: Flat and HNSW sit inside `IndexIDMap2`, the IVF types
store ids natively. Cosine similarity = inner product on L2-normalised vectors (inputs are
re-normalised defensively). HNSW cannot remove vectors, so removed ids go into a deleted set that
search filters out (over-fetching k + |deleted| so callers still get k results); when the deleted
set grows past `rebuild_fraction` of the graph, the graph is rebuilt from the live vectors.

Thread safety: every public method is safe to call from many threads. Searches share a
readers-writer lock (they run concurrently; FAISS releases the GIL), add/remove take it
exclusively. `compact` builds the new graph outside the lock (minutes at 1M vectors, while searches,
adds and removes go on against the old graph) and takes the write lock only to catch up with what
changed meanwhile and swap. An index loaded memory-mapped is read-only underneath; the first
add/remove copies it into owned memory (the mapped file is never written).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.expansion import DEFAULT_ALPHA, alpha_expanded, check_expansion, fused_ranking
from index.omp import omp_threads, threads_for
from index.rwlock import ReadWriteLock
from index.vectors import VectorError, as_id_array, as_query_matrix

INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
# Which search-time knob each type has (the one `index.build` tunes).
SEARCH_KNOB = {"flat": None, "ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}
DEFAULT_REBUILD_FRACTION = 0.2
PADDING_ID = -1
# `compact` inserts this many vectors per FAISS call, checking for a stop request between calls.
COMPACT_CHUNK = 16_384
# `vectors` and expanded searches read stored vectors this many at a time (bounds the copy's memory).
RECONSTRUCT_CHUNK = 4096


def new_hnsw(dim: int, params: dict[str, Any]) -> faiss.Index:
    """An empty HNSW index with ids (index.factory builds with it; `compact` rebuilds with it)."""
    hnsw = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = int(params["efConstruction"])
    hnsw.hnsw.efSearch = int(params.get("efSearch", 16))
    return faiss.IndexIDMap2(hnsw)


class DuplicateIdError(VectorError):
    """An id being added is already in the index."""


class SearchIndex:
    """A FAISS index addressed by catalogue id, with optional labels and the manifest of its version.

    Build one with `index.factory.build_index` (or `SearchIndex.empty_flat`), load one with
    `IndexStore.load`, publish one with `IndexStore.publish`.
    """

    def __init__(
        self,
        faiss_index: faiss.Index,
        index_type: str,
        *,
        params: dict[str, Any] | None = None,
        manifest: dict[str, Any] | None = None,
        labels: tuple[np.ndarray, np.ndarray] | None = None,
        class_names: list[str] | None = None,
        deleted_ids: np.ndarray | None = None,
        encoder_path: Path | None = None,
        memory_mapped: bool = False,
        rebuild_fraction: float = DEFAULT_REBUILD_FRACTION,
    ) -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; expected one of {INDEX_TYPES}")
        self._faiss = faiss_index
        self.index_type = index_type
        self.params: dict[str, Any] = dict(params or {})
        self.manifest: dict[str, Any] = dict(manifest or {})
        self.class_names = list(class_names) if class_names is not None else None
        self.encoder_path = Path(encoder_path) if encoder_path is not None else None
        self.rebuild_fraction = rebuild_fraction
        self._memory_mapped = memory_mapped
        self._lock = ReadWriteLock()
        self._compaction = threading.Lock()  # one `compact` at a time
        # One IVF direct map built at a time (`_ensure_direct_map`), never while a snapshot is written.
        self._direct_map_lock = threading.Lock()
        self._graph_generation = 0  # bumped whenever the FAISS index is replaced by a rebuild
        self._added_during_compaction: list[np.ndarray] | None = None  # while `compact` builds
        self._deleted: set[int] = set(
            np.asarray(deleted_ids if deleted_ids is not None else [], np.int64).tolist()
        )
        self._deleted_array = np.array(sorted(self._deleted), dtype=np.int64)
        self._live: set[int] = set(stored_ids(faiss_index).tolist()) - self._deleted
        label_ids, label_values = (
            labels if labels is not None else (np.empty(0, np.int64), np.empty(0, np.int64))
        )
        order = np.argsort(label_ids, kind="stable")
        self._label_ids = np.asarray(label_ids, np.int64)[order]
        self._label_values = np.asarray(label_values, np.int64)[order]

    @classmethod
    def empty_flat(cls, dim: int, **kwargs: Any) -> SearchIndex:
        """An exact (Flat, inner product) index with no vectors yet."""
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "flat", **kwargs)

    # ----------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return int(self._faiss.d)

    @property
    def ntotal(self) -> int:
        """Number of live (searchable) vectors."""
        return len(self._live)

    @property
    def deleted_count(self) -> int:
        """Removed ids still physically in an HNSW graph (always 0 for the other types)."""
        return len(self._deleted)

    @property
    def needs_compaction(self) -> bool:
        """Removed HNSW vectors exceed `rebuild_fraction` of the graph: time to `compact`."""
        return len(self._deleted) > self.rebuild_fraction * max(int(self._faiss.ntotal), 1)

    @property
    def memory_mapped(self) -> bool:
        return self._memory_mapped

    @property
    def has_labels(self) -> bool:
        return self._label_ids.size > 0

    @property
    def faiss_index(self) -> faiss.Index:
        """The underlying FAISS index (for benchmarks/persistence; do not mutate it directly)."""
        return self._faiss

    def default_search_params(self) -> dict[str, int]:
        """The tuned search-time knob of this type ({"nprobe": n}, {"efSearch": n} or {})."""
        knob = SEARCH_KNOB[self.index_type]
        return {knob: int(self.params[knob])} if knob and knob in self.params else {}

    # ----------------------------------------------------------------- ids and labels
    def ids(self) -> np.ndarray:
        """All live ids, sorted, int64."""
        with self._lock.read():
            return np.array(sorted(self._live), dtype=np.int64)

    def contains(self, ids: np.ndarray | list[int] | int) -> np.ndarray:
        """Boolean per id: is it live in the index?"""
        with self._lock.read():
            return np.array([int(i) in self._live for i in np.atleast_1d(ids)], dtype=bool)

    def __contains__(self, item: int) -> bool:
        return bool(self.contains(item)[0])

    def labels_for(self, ids: np.ndarray) -> np.ndarray:
        """int64 labels with the shape of `ids`; -1 where an id has no label (or is the padding id)."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock.read():
            if self._label_ids.size == 0:
                return np.full(ids.shape, -1, dtype=np.int64)
            pos = np.searchsorted(self._label_ids, ids).clip(max=self._label_ids.size - 1)
            found = self._label_ids[pos] == ids
            return np.where(found, self._label_values[pos], -1)

    def label_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of every labelled live vector, sorted by id."""
        with self._lock.read():
            return self._label_ids.copy(), self._label_values.copy()

    def deleted_ids(self) -> np.ndarray:
        with self._lock.read():
            return self._deleted_array.copy()

    # ----------------------------------------------------------------- search
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        params: dict[str, int] | None = None,
        expand: int = 0,
        alpha: float = DEFAULT_ALPHA,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine similarity. queries: float32 QxD (rows re-normalised).

        Returns (scores float32 QxK, ids int64 QxK), best first; where fewer than k vectors exist the
        tail is padded with id -1 and score -inf. `params` overrides the tuned knob for this call only,
        e.g. {"nprobe": 32} or {"efSearch": 128}.

        `expand` > 0 ranks by alpha query expansion (`index.expansion`): the query plus its top
        `expand` results weighted by similarity^alpha is searched again, and each result is ranked by
        the larger of its similarities to the two queries (an exact copy of the query stays first).
        The scores stay each result's cosine similarity to the query itself, so they need not
        descend along the ranking.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise VectorError(f"k must be a positive integer, got {k!r}")
        check_expansion(expand, alpha)
        matrix = as_query_matrix(queries, self.dim, "queries")
        with self._lock.read():  # both searches see the same vectors
            if not expand:
                return self._search_locked(matrix, int(k), params)
            first_scores, first_ids = self._search_locked(matrix, int(expand), params)  # Qxn
            first_vectors = self._stored_vectors(first_ids)  # QxnxD
            expanded = alpha_expanded(matrix, first_scores, first_vectors, first_ids != PADDING_ID, alpha)
            second_scores, second_ids = self._search_locked(expanded, int(k), params)  # QxK
            second_to_query = self._similarities_locked(matrix, second_ids)  # QxK
        candidates = np.concatenate([second_ids, first_ids], axis=1)  # Qx(K+n)
        to_query = np.concatenate([second_to_query, first_scores], axis=1)
        to_expanded = np.concatenate(
            [second_scores, np.einsum("qd,qnd->qn", expanded, first_vectors)], axis=1
        )  # Qx(K+n)
        scores, ids = fused_ranking(candidates, to_query, to_expanded, int(k), PADDING_ID)
        return scores, ids

    def _stored_vectors(self, ids: np.ndarray) -> np.ndarray:
        """QxKxD vectors of a QxK id table (under the held lock); zeros where the id is padding."""
        vectors = np.zeros((*ids.shape, self.dim), dtype=np.float32)
        found = ids != PADDING_ID
        vectors[found] = self._vectors_locked(ids[found])
        return vectors

    def _similarities_locked(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """QxK cosine similarities of each query to the stored vectors of its row of ids (under the
        held lock), -inf for padding; vectors read a chunk at a time, so a K of the whole index
        never holds K x D floats."""
        similarities = np.full(ids.shape, -np.inf, dtype=np.float32)
        rows, columns = np.nonzero(ids != PADDING_ID)
        for start in range(0, rows.size, RECONSTRUCT_CHUNK):
            row, column = rows[start : start + RECONSTRUCT_CHUNK], columns[start : start + RECONSTRUCT_CHUNK]
            vectors = self._vectors_locked(ids[row, column])  # chunk x D
            similarities[row, column] = np.einsum("nd,nd->n", vectors, queries[row])
        return similarities

    def vectors(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """The stored vectors of live `ids`, float32 NxD in their order (PQ codes decode lossily).
        Raises VectorError naming an id that is not live. IVF types keep an id->entry hash table
        (40 bytes per vector, measured at 1M) from the first call on."""
        id_array = np.asarray(ids, dtype=np.int64).reshape(-1)
        with self._lock.read():
            missing = [i for i in id_array.tolist() if i not in self._live]
            if missing:
                raise VectorError(f"{len(missing)} id(s) not in the index, e.g. {missing[:5]}")
            return self._vectors_locked(id_array)

    def prepare_vector_reads(self) -> None:
        """Build now what reading vectors by id needs (the IVF types' direct map), so the first
        expanded search of a freshly loaded version does not pay for it (56 ms at 1M vectors)."""
        if self.index_type in ("ivf", "ivfpq"):
            with self._lock.read():
                self._ensure_direct_map()

    def _vectors_locked(self, ids: np.ndarray) -> np.ndarray:
        """NxD vectors of stored ids, read in chunks (under the held lock)."""
        out = np.empty((ids.size, self.dim), dtype=np.float32)
        if self.index_type in ("ivf", "ivfpq"):
            self._ensure_direct_map()
        for start in range(0, ids.size, RECONSTRUCT_CHUNK):
            chunk = np.ascontiguousarray(ids[start : start + RECONSTRUCT_CHUNK])
            out[start : start + chunk.size] = self._faiss.reconstruct_batch(chunk)
        return out

    def _ensure_direct_map(self) -> None:
        """IVF lists are found by id only through a direct map; a hash table, since ids are arbitrary.
        FAISS keeps it current through add and remove. Made once per FAISS object (a copy made by
        `_ensure_owned` makes its own); searches never read it, so it is safe beside them."""
        ivf = faiss.extract_index_ivf(self._faiss)
        if ivf.direct_map.type == faiss.DirectMap.Hashtable:
            return
        with self._direct_map_lock:
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def _search_locked(
        self, matrix: np.ndarray, k: int, params: dict[str, int] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        num_queries = matrix.shape[0]
        scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
        ids = np.full((num_queries, k), PADDING_ID, dtype=np.int64)
        stored = int(self._faiss.ntotal)
        if stored == 0 or num_queries == 0:
            return scores, ids
        fetch = min(k + len(self._deleted), stored)
        with omp_threads(threads_for(num_queries)):
            found_scores, found_ids = self._faiss.search(matrix, fetch, params=self._faiss_params(params))
        if self._deleted:
            found_ids[np.isin(found_ids, self._deleted_array)] = PADDING_ID
        # Move the valid results of each row to its front, keeping their order (stable sort on the mask).
        order = np.argsort(found_ids == PADDING_ID, axis=1, kind="stable")[:, :k]  # Qxk
        take = min(k, fetch)
        ids[:, :take] = np.take_along_axis(found_ids, order, axis=1)
        scores[:, :take] = np.take_along_axis(found_scores, order, axis=1)
        scores[ids == PADDING_ID] = -np.inf
        return scores, ids

    def _faiss_params(self, overrides: dict[str, int] | None) -> faiss.SearchParameters | None:
        values = {**self.default_search_params(), **(overrides or {})}
        unknown = set(values) - {SEARCH_KNOB[self.index_type]}
        if unknown:
            raise VectorError(
                f"search parameter(s) {sorted(unknown)} do not apply to a {self.index_type} index"
            )
        if not values:
            return None
        for name, value in values.items():
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise VectorError(f"{name} must be a positive integer, got {value!r}")
        if self.index_type == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(values["efSearch"]))
        return faiss.SearchParametersIVF(nprobe=int(values["nprobe"]))

    # ----------------------------------------------------------------- mutation
    def add(self, vectors: np.ndarray, ids: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add vectors (NxD) under new unique int64 ids, with optional int64 labels (-1 = none).

        Raises DuplicateIdError (nothing added) if any id is already live.
        """
        matrix = as_query_matrix(vectors, self.dim, "vectors")
        id_array = as_id_array(ids, matrix.shape[0])
        label_array = None
        if labels is not None:
            label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
            if label_array.shape != id_array.shape:
                raise VectorError(f"{id_array.size} ids but {label_array.size} labels")
        with self._lock.write():
            clashes = [i for i in id_array.tolist() if i in self._live]
            if clashes:
                raise DuplicateIdError(f"{len(clashes)} id(s) already in the index, e.g. {clashes[:5]}")
            self._ensure_owned()
            if self._deleted and any(i in self._deleted for i in id_array.tolist()):
                # A re-added id must not also match its old, still-stored HNSW vector.
                self._compact_locked()
            self._faiss.add_with_ids(matrix, id_array)
            if self._added_during_compaction is not None:
                self._added_during_compaction.append(id_array.copy())
            self._live.update(id_array.tolist())
            if label_array is not None:
                keep = label_array >= 0
                self._set_labels(
                    np.concatenate([self._label_ids, id_array[keep]]),
                    np.concatenate([self._label_values, label_array[keep]]),
                )

    def remove(self, ids: np.ndarray | list[int], *, compact: bool = True) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed. A removed id never
        comes back from search. HNSW only marks them deleted; past `rebuild_fraction` the graph is
        compacted before returning when `compact` is true (the service passes False and compacts
        in the background instead)."""
        id_array = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        with self._lock.write():
            present = np.array([i for i in id_array.tolist() if i in self._live], dtype=np.int64)
            if present.size == 0:
                return 0
            if self.index_type == "hnsw":
                self._deleted.update(present.tolist())
                self._deleted_array = np.array(sorted(self._deleted), dtype=np.int64)
            else:
                self._ensure_owned()
                removed = int(self._faiss.remove_ids(self._removal_selector(present)))
                if removed != present.size:
                    raise RuntimeError(
                        f"FAISS removed {removed} of {present.size} ids; the index is inconsistent"
                    )
            self._live.difference_update(present.tolist())
            keep = ~np.isin(self._label_ids, present)
            self._set_labels(self._label_ids[keep], self._label_values[keep])
        if compact and self.needs_compaction:
            self.compact()
        return int(present.size)

    def _removal_selector(self, ids: np.ndarray) -> faiss.IDSelector:
        """IDSelectorBatch (hashed membership) unless an IVF direct map is kept: FAISS then removes
        only through an IDSelectorArray, each id looked up in the map."""
        ivf_type = self.index_type in ("ivf", "ivfpq")
        if ivf_type and faiss.extract_index_ivf(self._faiss).direct_map.type == faiss.DirectMap.Hashtable:
            return faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids))
        return faiss.IDSelectorBatch(ids)

    def compact(
        self,
        *,
        stop: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> bool:
        """Rebuild an HNSW graph without its deleted vectors (no-op for other types).

        The new graph is built from a snapshot of the live vectors without holding the index's lock:
        searches, adds and removes go on against the old graph meanwhile. Then, under the write lock,
        the vectors added since the snapshot are inserted into the new graph, ids removed since stay
        in the deleted set, and the graphs swap. `progress(done, total)` is called after each chunk of
        the build; `stop` (checked between chunks) abandons it. Returns True when the graph was
        swapped; False when there was nothing to do, `stop` was set, or the graph was rebuilt
        meanwhile by a re-add of a deleted id (that rebuild already dropped the deleted vectors).
        Memory: the old and new graphs coexist until the swap.
        """
        with self._compaction:
            with self._lock.read():  # no add/remove runs while the snapshot is taken
                if not self._deleted:
                    return False
                generation = self._graph_generation
                deleted_at_start = self._deleted_array
                stored = stored_ids(self._faiss)  # N
                vectors = faiss.downcast_index(self._faiss.index).reconstruct_n(0, stored.size)  # NxD
                self._added_during_compaction = []  # ids `add` inserts from now on
            try:
                keep = ~np.isin(stored, deleted_at_start)
                kept_ids, kept_vectors = stored[keep], np.ascontiguousarray(vectors[keep])
                del vectors
                rebuilt = new_hnsw(self.dim, self.params)
                for start in range(0, kept_ids.size, COMPACT_CHUNK):
                    if stop is not None and stop.is_set():
                        return False
                    end = min(start + COMPACT_CHUNK, kept_ids.size)
                    rebuilt.add_with_ids(kept_vectors[start:end], kept_ids[start:end])
                    if progress is not None:
                        progress(end, int(kept_ids.size))
                with self._lock.write():  # only work proportional to what changed meanwhile
                    if self._graph_generation != generation:
                        return False
                    added = np.concatenate([np.empty(0, np.int64), *self._added_during_compaction])
                    removed_since = np.setdiff1d(self._deleted_array, deleted_at_start, assume_unique=True)
                    live_added = added[~np.isin(added, removed_since)]  # added, then removed: skip
                    if live_added.size:
                        rebuilt.add_with_ids(self._faiss.reconstruct_batch(live_added), live_added)
                    # Removed meanwhile and in the new graph (not added-then-removed): still deleted.
                    self._replace_graph(rebuilt, set(removed_since[~np.isin(removed_since, added)].tolist()))
                    return True
            finally:
                self._added_during_compaction = None

    def _compact_locked(self) -> None:
        """Rebuild under the (held) write lock: only for a re-added deleted id, whose old vector
        must be gone before the new one goes in."""
        inner = faiss.downcast_index(self._faiss.index)
        stored = stored_ids(self._faiss)
        vectors = inner.reconstruct_n(0, int(inner.ntotal))  # NxD
        keep = ~np.isin(stored, self._deleted_array)
        rebuilt = new_hnsw(self.dim, self.params)
        rebuilt.add_with_ids(np.ascontiguousarray(vectors[keep]), stored[keep])
        self._replace_graph(rebuilt, set())

    def _replace_graph(self, rebuilt: faiss.Index, deleted: set[int]) -> None:
        self._faiss = rebuilt
        self._memory_mapped = False
        self._graph_generation += 1
        self._deleted = deleted
        self._deleted_array = np.array(sorted(deleted), dtype=np.int64)

    def _ensure_owned(self) -> None:
        """Copy a memory-mapped (read-only) index into owned memory before the first mutation:
        mutating mapped FAISS storage aborts the process."""
        if self._memory_mapped:
            self._faiss = faiss.deserialize_index(faiss.serialize_index(self._faiss))
            self._memory_mapped = False

    def _set_labels(self, label_ids: np.ndarray, label_values: np.ndarray) -> None:
        order = np.argsort(label_ids, kind="stable")
        self._label_ids, self._label_values = label_ids[order], label_values[order]

    def write_snapshot(self, index_path: Path, deleted_path: Path, labels_path: Path) -> list[Path]:
        """Write the FAISS index, the deleted-id set (if any) and the id->label table (if any) as one
        consistent snapshot (under the read lock: no add/remove interleaves). Returns the files written."""
        with self._lock.read(), self._direct_map_lock:  # an IVF direct map being built is written too
            faiss.write_index(self._faiss, str(index_path))
            written = [Path(index_path)]
            if self._deleted:
                np.save(deleted_path, self._deleted_array)
                written.append(Path(deleted_path))
            if self._label_ids.size:
                np.save(
                    labels_path, np.stack([self._label_ids, self._label_values], axis=1)
                )  # Nx2: id, label
                written.append(Path(labels_path))
            return written

    def __repr__(self) -> str:
        return (
            f"SearchIndex(type={self.index_type}, dim={self.dim}, ntotal={self.ntotal}, "
            f"deleted={self.deleted_count}, params={self.params})"
        )


def stored_ids(faiss_index: faiss.Index) -> np.ndarray:
    """Every id physically stored in an IndexIDMap2 or IVF index (possibly under a pre-transform)."""
    index = faiss.downcast_index(faiss_index)
    if isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap)):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    chunks = []
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            pointer = invlists.get_ids(list_no)
            chunks.append(faiss.rev_swig_ptr(pointer, size).copy())
            invlists.release_ids(list_no, pointer)
    return np.concatenate(chunks).astype(np.int64) if chunks else np.empty(0, dtype=np.int64)
