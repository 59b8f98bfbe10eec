"""Pick an index type and its build parameters from N, D and a memory budget (`--type auto`).

N < FLAT_MAX_N and raw vectors fit          -> flat  (exact; brute force is fast enough)
N <= HNSW_MAX_N and an HNSW graph fits       -> hnsw  (best speed/recall in the middle range)
raw vectors (+ ids) fit                      -> ivf   (IVF-Flat, nlist ~ 4 sqrt(N))
otherwise                                    -> ivfpq (OPQ + IVF-PQ, code size chosen to fit)
"""

from __future__ import annotations

import math
import re
from typing import Any

FLAT_MAX_N = 50_000
# Up to here HNSW: on 1.05M real 512-d embeddings it built in 409 s on one core and searched at
# 111x exact (recall@10 0.983), where IVF-Flat (built in 142 s) reached 22x at recall 0.95
# (bench/RESULTS.md). Above it the build time, and a compaction after many deletes (a rebuild, in
# the background beside searches), grow past what a few CPU cores should spend; IVF builds faster.
HNSW_MAX_N = 2_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
ID_BYTES = 8
# Each HNSW level-0 node keeps 2*M int32 neighbours; upper levels add ~1/M of that again.
HNSW_LINK_BYTES_PER_M = 2 * 4 * 1.1
PQ_SUBQUANTIZER_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4)
MIN_PQ_SUBVECTOR = 2  # 1-dimensional sub-quantizers compress nothing worth their training time
DEFAULT_MAX_MEMORY = "4G"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'4G', '512M', '1.5GiB', '1000000' -> bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size (examples: 4G, 512M, 1000000)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


def default_nlist(num_vectors: int) -> int:
    """About 4 sqrt(N) inverted lists (FAISS guidance: 4..16 sqrt(N)), at least 1."""
    return max(1, int(round(4 * math.sqrt(num_vectors))))


def estimated_bytes(index_type: str, num_vectors: int, dim: int, params: dict[str, Any]) -> int:
    """Approximate resident size of the built index."""
    if index_type == "flat":
        per_vector = 4 * dim + ID_BYTES
        return num_vectors * per_vector
    if index_type == "hnsw":
        per_vector = 4 * dim + ID_BYTES + HNSW_LINK_BYTES_PER_M * int(params["M"])
        return int(num_vectors * per_vector)
    centroids = int(params["nlist"]) * dim * 4
    if index_type == "ivf":
        return num_vectors * (4 * dim + ID_BYTES) + centroids
    code_bytes = int(params["pq_m"]) * int(params.get("pq_nbits", 8)) // 8
    return num_vectors * (code_bytes + ID_BYTES) + centroids + dim * dim * 4


def choose_index(
    num_vectors: int, dim: int, max_memory_bytes: int, index_type: str = "auto"
) -> tuple[str, dict[str, Any]]:
    """(type, build params) for N vectors of dimension D within the budget. A non-auto `index_type`
    only gets its parameters filled in. Raises ValueError when nothing fits."""
    nlist = default_nlist(num_vectors)
    candidates = {
        "flat": {},
        "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION},
        "ivf": {"nlist": nlist},
    }
    pq = _fitting_pq(num_vectors, dim, nlist, max_memory_bytes)
    if pq is not None:
        candidates["ivfpq"] = pq
    if index_type != "auto":
        if index_type == "ivfpq" and pq is None:
            pq = {"nlist": nlist, "pq_m": _divisors_of(dim)[-1], "pq_nbits": 8, "opq": True}
            candidates["ivfpq"] = pq
        return index_type, candidates[index_type]

    def fits(kind: str) -> bool:
        return estimated_bytes(kind, num_vectors, dim, candidates[kind]) <= max_memory_bytes

    if num_vectors < FLAT_MAX_N and fits("flat"):
        return "flat", candidates["flat"]
    if num_vectors <= HNSW_MAX_N and fits("hnsw"):
        return "hnsw", candidates["hnsw"]
    if fits("ivf"):
        return "ivf", candidates["ivf"]
    if pq is not None:
        return "ivfpq", pq
    raise ValueError(
        f"{num_vectors} vectors of dimension {dim} do not fit in {max_memory_bytes} bytes "
        "even with PQ compression"
    )


def _divisors_of(dim: int) -> list[int]:
    """PQ sub-quantizer counts that divide D into sub-vectors of >= MIN_PQ_SUBVECTOR dimensions,
    largest first."""
    return [m for m in PQ_SUBQUANTIZER_CHOICES if dim % m == 0 and dim // m >= MIN_PQ_SUBVECTOR] or [1]


def _fitting_pq(num_vectors: int, dim: int, nlist: int, budget: int) -> dict[str, Any] | None:
    """The largest (most accurate) PQ code that fits the budget, or None."""
    for m in _divisors_of(dim):
        params = {"nlist": nlist, "pq_m": m, "pq_nbits": 8, "opq": True}
        if estimated_bytes("ivfpq", num_vectors, dim, params) <= budget:
            return params
    return None
