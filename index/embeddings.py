"""The embeddings file: the hand-off between `training.embed` and `index.build`.

One `.npz` holding
  vectors        float32 NxD, L2-normalised rows (cosine similarity = inner product)
  ids            int64 N, the 64-bit id of each row's catalogue record (unique)
  labels         int64 N, class index per row, -1 where unknown (optional in the file)
  class_names    str C, names for the label indices (optional)
  model_version  str, the version of the encoder that produced the vectors
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class EmbeddingsError(ValueError):
    """The embeddings file or its contents are unusable (message says why)."""


@dataclass
class Embeddings:
    vectors: np.ndarray
    ids: np.ndarray
    model_version: str
    labels: np.ndarray | None = None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        if self.labels is not None:
            self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def validate(self) -> None:
        """Raise EmbeddingsError for an empty matrix, bad shapes, non-finite values or duplicate ids."""
        if self.vectors.ndim != 2 or self.vectors.shape[0] == 0 or self.vectors.shape[1] == 0:
            raise EmbeddingsError(f"expected a non-empty NxD matrix, got shape {self.vectors.shape}")
        if self.ids.shape != (self.vectors.shape[0],):
            raise EmbeddingsError(f"{self.vectors.shape[0]} vectors but ids of shape {self.ids.shape}")
        if self.labels is not None and self.labels.shape != self.ids.shape:
            raise EmbeddingsError(f"{len(self.ids)} ids but labels of shape {self.labels.shape}")
        bad = ~np.isfinite(self.vectors).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)[:5].tolist()
            raise EmbeddingsError(f"{int(bad.sum())} vectors contain NaN or infinity (rows {rows}...)")
        unique, counts = np.unique(self.ids, return_counts=True)
        if (counts > 1).any():
            raise EmbeddingsError(f"duplicate ids, e.g. {unique[counts > 1][:5].tolist()}")


def save_embeddings(path: str | os.PathLike, emb: Embeddings) -> None:
    """Write atomically (temporary file, fsync, rename): a reader never sees half a file."""
    emb.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    arrays = {"vectors": emb.vectors, "ids": emb.ids, "model_version": np.array(emb.model_version)}
    if emb.labels is not None:
        arrays["labels"] = emb.labels
    if emb.class_names is not None:
        arrays["class_names"] = np.array(emb.class_names, dtype=str)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_embeddings(path: str | os.PathLike, validate: bool = True) -> Embeddings:
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsError(f"embeddings file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            emb = Embeddings(
                vectors=data["vectors"],
                ids=data["ids"],
                model_version=str(data["model_version"]) if "model_version" in data else "unknown",
                labels=data.get("labels"),
                class_names=[str(c) for c in data["class_names"]] if "class_names" in data else None,
            )
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise EmbeddingsError(f"{path} is not a valid embeddings file: {exc}") from exc
    if validate:
        emb.validate()
    return emb
