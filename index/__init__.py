"""FAISS indexes over embeddings: build, tune, version, publish, search and weighted kNN."""
