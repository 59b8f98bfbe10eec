"""Create, train and fill the FAISS index of each supported type (inner-product metric throughout).

  flat   IndexIDMap2(IndexFlatIP)                       exact
  ivf    IndexIVFFlat, native ids                        params: nlist, nprobe
  ivfpq  IndexPreTransform(OPQ, IndexIVFPQ), native ids  params: nlist, nprobe, pq_m, pq_nbits, opq
  hnsw   IndexIDMap2(IndexHNSWFlat)                      params: M, efConstruction, efSearch

Training and adding run on the GPU when the installed FAISS has one (`faiss.get_num_gpus() > 0`);
the result is always a CPU index, which is what gets written and served.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from index.search_index import INDEX_TYPES, SearchIndex, new_hnsw

ADD_BATCH = 65536
# FAISS's own guidance: k-means wants at least 39 training points per centroid.
MIN_POINTS_PER_CENTROID = 39
PQ_CENTROIDS_PER_SUBQUANTIZER = 256  # 2**pq_nbits at the default 8 bits


def use_gpu() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def new_faiss_index(index_type: str, dim: int, params: dict[str, Any]) -> faiss.Index:
    """An empty (untrained) index of the given type."""
    if index_type == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if index_type == "hnsw":
        return new_hnsw(dim, params)
    if index_type == "ivf":
        return faiss.index_factory(dim, f"IVF{int(params['nlist'])},Flat", faiss.METRIC_INNER_PRODUCT)
    if index_type == "ivfpq":
        m, nbits = int(params["pq_m"]), int(params.get("pq_nbits", 8))
        # "np": no polysemous training (slow, and only useful for Hamming-filtered search).
        rotation = f"OPQ{m}," if params.get("opq", True) else ""
        spec = f"{rotation}IVF{int(params['nlist'])},PQ{m}x{nbits}np"
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    raise ValueError(f"unknown index type {index_type!r}; expected one of {INDEX_TYPES}")


def training_sample_size(index_type: str, num_vectors: int, params: dict[str, Any]) -> int:
    """How many vectors to train on: max(39 * nlist, 39 * 256 for the PQ codebooks), capped at N."""
    if index_type not in ("ivf", "ivfpq"):
        return 0
    wanted = MIN_POINTS_PER_CENTROID * int(params["nlist"])
    if index_type == "ivfpq":
        wanted = max(wanted, MIN_POINTS_PER_CENTROID * PQ_CENTROIDS_PER_SUBQUANTIZER)
    return min(num_vectors, wanted)


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    index_type: str,
    params: dict[str, Any],
    *,
    labels: np.ndarray | None = None,
    class_names: list[str] | None = None,
    train_exclude: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SearchIndex:
    """Train (on a random sample, avoiding the rows in `train_exclude` when possible) and fill an index.

    vectors: float32 NxD, L2-normalised; ids: int64 N unique; labels: int64 N (-1 = none).
    """
    num_vectors, dim = vectors.shape
    index = new_faiss_index(index_type, dim, params)
    sample_size = training_sample_size(index_type, num_vectors, params)
    if sample_size:
        rng = np.random.default_rng(seed)
        candidates = np.arange(num_vectors)
        if train_exclude is not None and num_vectors - len(train_exclude) >= sample_size:
            candidates = np.setdiff1d(candidates, train_exclude)
        sample = vectors[np.sort(rng.choice(candidates, size=sample_size, replace=False))]
        _train(index, sample)
    with tqdm(total=num_vectors, desc=f"add {index_type}", unit="vec", disable=not progress) as bar:
        for start in range(0, num_vectors, ADD_BATCH):
            stop = min(start + ADD_BATCH, num_vectors)
            index.add_with_ids(vectors[start:stop], ids[start:stop])
            bar.update(stop - start)
    label_table = None
    if labels is not None:
        known = labels >= 0
        label_table = (ids[known], labels[known])
    return SearchIndex(index, index_type, params=params, labels=label_table, class_names=class_names)


def _train(index: faiss.Index, sample: np.ndarray) -> None:
    ivf = faiss.extract_index_ivf(index)
    if use_gpu():
        # k-means assignment is the expensive part of training; run it on the GPU(s).
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    ivf.verbose = False
    index.train(sample)
