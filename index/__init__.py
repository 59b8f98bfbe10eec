"""FAISS indexes over embeddings: build, tune, version, publish, search and weighted kNN."""

import os

# FAISS's OpenMP threads spin while waiting by default; on a machine shared with other work
# (training, the service's encoder) that spinning turns seconds into minutes (measured: OPQ training
# 50 s -> 6 s on 2 busy cores). libgomp reads this once, when FAISS loads, so set it before any
# `import faiss`; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
