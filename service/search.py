"""Search and classify over the loaded index, with metadata filters applied from the catalogue.

Filters (label, tags, min_score) cannot be pushed into FAISS, so the search over-fetches and
filters by the records' metadata, growing the fetch (x4 each round) until k results pass or the
index is exhausted. Ids without a record (deleted a moment ago) are dropped the same way.
With query expansion the ranking is by the expanded query and the scores are similarities to the
query itself, so they need not descend: min_score drops each result below it, and the rounds stop
once a whole round is below it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from index.vote import weighted_vote
from service.catalogue import metadata_filter
from service.db import Database
from service.engine import Engine, Loaded

GROWTH = 4


@dataclass
class Timer:
    """Milliseconds per stage, for `timing_ms` in responses."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + (time.perf_counter() - started) * 1000.0

    def as_dict(self, *extra: str) -> dict[str, float]:
        names = ("decode", "embed", "search", "metadata", *extra)
        return {name: round(self.stages.get(name, 0.0), 3) for name in names}


@dataclass
class Hit:
    id: int
    score: float
    record: dict[str, Any]


async def filtered_search(
    engine: Engine,
    db: Database,
    loaded: Loaded,
    query: np.ndarray,
    k: int,
    label: str | None = None,
    tags: list[str] | None = None,
    min_score: float | None = None,
    extra_filter: dict[str, Any] | None = None,
    timer: Timer | None = None,
    on_candidates: Callable[[list[int]], None] | None = None,
    expand: int = 0,
) -> list[Hit]:
    """Top-k hits (best first) whose records pass the filters. query: float32 D or 1xD.
    `on_candidates` sees each round's candidate ids (best first) before their records are looked
    up, to start work on them meanwhile (reading their thumbnails). `expand` > 0 ranks by alpha
    query expansion over the query's top `expand` (`SearchIndex.search`)."""
    timer = timer or Timer()
    mongo_filter = {**metadata_filter(label, tags), **(extra_filter or {})}
    total = loaded.index.ntotal
    fetch = min(max(k, 1) * (GROWTH if mongo_filter else 1), max(total, 1))
    considered = np.empty(0, dtype=np.int64)  # ids of earlier rounds
    hits: list[Hit] = []
    while True:
        started = time.perf_counter()
        scores, ids = await engine.search(loaded, query.reshape(1, -1), fetch, expand)
        timer.add("search", started)
        # A plain ranking of a larger fetch extends the smaller one, but an expanded one may reorder
        # within it: earlier rounds are skipped by id, not by position (no result twice, none lost).
        fresh = (ids[0] >= 0) & ~np.isin(ids[0], considered)
        row_scores, row_ids = scores[0][fresh], ids[0][fresh]
        considered = np.concatenate([considered, row_ids])
        valid = row_scores >= min_score if min_score is not None else np.ones(row_ids.shape, bool)
        candidates = [(int(i), float(s)) for i, s in zip(row_ids[valid], row_scores[valid], strict=True)]
        started = time.perf_counter()
        candidate_ids = [i for i, _ in candidates]
        if on_candidates is not None and candidate_ids:
            on_candidates(candidate_ids)
        records = await engine.records.records(db, candidate_ids, mongo_filter) if candidates else {}
        timer.add("metadata", started)
        hits.extend(Hit(i, s, records[i]) for i, s in candidates if i in records)
        below = ~valid if min_score is not None else np.zeros(0, bool)
        # Plain scores descend, so one result below min_score ends the search; expanded ones need not.
        below_min = below.size > 0 and bool(below.all() if expand else below.any())
        exhausted = fetch >= total or bool((ids[0] < 0).any())
        if len(hits) >= k or below_min or exhausted:
            return hits[:k]
        fetch = min(fetch * GROWTH, total)


@dataclass
class Classification:
    label: str | None
    probabilities: list[tuple[str, float]]  # top-5, best first
    neighbours: list[Hit]


async def classify(
    engine: Engine, db: Database, loaded: Loaded, query: np.ndarray, k: int, tau: float, timer: Timer
) -> Classification:
    """Weighted kNN vote (Wu et al. 2018) over the k nearest *labelled* catalogue images."""
    neighbours = await filtered_search(
        engine, db, loaded, query, k, extra_filter={"label": {"$type": "string"}}, timer=timer
    )
    if not neighbours:
        return Classification(None, [], [])
    class_names = sorted({hit.record["label"] for hit in neighbours})
    class_index = {name: i for i, name in enumerate(class_names)}
    similarities = torch.tensor([[hit.score for hit in neighbours]], dtype=torch.float64)  # 1xK
    labels = torch.tensor(
        [[class_index[hit.record["label"]] for hit in neighbours]], dtype=torch.int64
    )  # 1xK
    probabilities = weighted_vote(similarities, labels, len(class_names), tau)[0]  # C
    top = torch.topk(probabilities, min(5, len(class_names)))
    ranked = [
        (class_names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]
    return Classification(ranked[0][0], ranked, neighbours)
