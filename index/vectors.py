"""Checks shared by every entry point that takes vectors or ids: shape, dimension, finiteness,
uniqueness, and the defensive re-normalisation that makes inner product equal cosine similarity."""

from __future__ import annotations

import numpy as np


class VectorError(ValueError):
    """Vectors or ids are unusable (message says why, in one line)."""


def as_query_matrix(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """Return a C-contiguous float32 NxD copy with unit rows; raise VectorError on bad input."""
    matrix = np.asarray(vectors)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise VectorError(f"{what}: expected an NxD matrix, got shape {matrix.shape}")
    if matrix.shape[1] != dim:
        raise VectorError(f"{what}: dimension {matrix.shape[1]} does not match the index dimension {dim}")
    if not np.issubdtype(matrix.dtype, np.number):
        raise VectorError(f"{what}: expected numbers, got dtype {matrix.dtype}")
    matrix = np.array(matrix, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)[:5].tolist()
        raise VectorError(f"{what}: {int((~finite).sum())} rows contain NaN or infinity (rows {rows})")
    return normalise_rows(matrix)


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """L2-normalise float32 NxD rows in place (zero rows stay zero); returns the same array."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)  # Nx1
    np.divide(matrix, norms, out=matrix, where=norms > 0)
    return matrix


def as_id_array(ids: np.ndarray | list[int], count: int | None = None, what: str = "ids") -> np.ndarray:
    """Return int64 ids (1-D, unique); raise VectorError on a wrong count, non-integers or duplicates."""
    array = np.asarray(ids)
    if array.ndim == 0:
        array = array[None]
    if array.ndim != 1:
        raise VectorError(f"{what}: expected a 1-D array, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise VectorError(f"{what}: expected integers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if count is not None and array.shape[0] != count:
        raise VectorError(f"{what}: {array.shape[0]} ids for {count} vectors")
    unique, counts = np.unique(array, return_counts=True)
    if (counts > 1).any():
        raise VectorError(f"{what}: duplicate ids, e.g. {unique[counts > 1][:5].tolist()}")
    if (array == -1).any():
        raise VectorError(f"{what}: -1 is reserved for 'no result' and cannot be an id")
    return array
