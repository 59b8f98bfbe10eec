"""Clustered synthetic embeddings (for tests and benchmarks): Gaussian blobs around random centres
on the unit sphere, re-normalised, like real embeddings of a catalogue with many visual themes."""

from __future__ import annotations

import numpy as np


def clustered_vectors(
    num_vectors: int, dim: int, num_clusters: int = 100, spread: float = 0.6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 NxD unit vectors, int64 N cluster labels). `spread` is the noise scale relative to
    the unit-length centres (larger = clusters overlap more = harder search)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)  # CxD
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, num_clusters, size=num_vectors)
    noise = rng.standard_normal((num_vectors, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    vectors = centres[labels] + noise  # NxD
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors, dtype=np.float32), labels.astype(np.int64)


def random_ids(num_vectors: int, seed: int = 0) -> np.ndarray:
    """Unique, non-contiguous 63-bit ids, so that no code can confuse ids with row numbers."""
    rng = np.random.default_rng(seed + 1)
    ids = rng.choice(2**62, size=num_vectors, replace=False)
    return ids.astype(np.int64)
