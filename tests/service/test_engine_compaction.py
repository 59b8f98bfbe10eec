"""The service compacts an HNSW graph in the background: removes past the rebuild fraction return
at once, searches go on against the old graph, and the compacted graph is swapped in and published."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service_helpers import service_settings

from index.factory import build_index
from index.store import IndexStore
from index.synthetic import clustered_vectors, random_ids
from service.engine import Engine
from training.encoder import read_encoder_record

DEMO_ENCODER = Path(__file__).resolve().parents[2] / "service" / "assets" / "demo-encoder.pt"


def test_removes_past_the_rebuild_fraction_compact_in_the_background(tmp_path: Path) -> None:
    settings = service_settings(tmp_path, None, "unused", MODEL_CHECKPOINT=DEMO_ENCODER)
    dim = int(read_encoder_record(DEMO_ENCODER)["embed_dim"])
    vectors, _ = clustered_vectors(3000, dim, num_clusters=10, spread=1.0, seed=5)
    ids = random_ids(3000, seed=5)
    graph = build_index(vectors, ids, "hnsw", {"M": 16, "efConstruction": 40, "efSearch": 64}, progress=False)
    IndexStore(settings.index_dir).publish(graph, encoder_path=DEMO_ENCODER)
    removed = ids[:700]  # 23% of the graph: past the 20% rebuild fraction

    async def go() -> None:
        engine = Engine(settings)
        try:
            assert await engine.load_current()
            loaded = engine.require()
            old_graph = loaded.index.faiss_index
            assert await engine.remove(removed.tolist()) == 700
            compaction = engine.compaction
            assert compaction is not None, "no compaction started"
            # Searches and removes do not wait for the rebuild.
            found = await engine.run_in_thread(loaded.index.search, vectors[::50], 20)
            assert not set(found[1].ravel().tolist()) & set(removed.tolist())
            assert await engine.remove(ids[700:705].tolist()) == 5
            assert engine.start_compaction(loaded) is None  # one at a time
            await compaction
            index = engine.require().index
            assert index is loaded.index and index.faiss_index is not old_graph
            assert index.ntotal == 3000 - 705
            assert index.faiss_index.ntotal == index.ntotal + index.deleted_count  # nothing else kept
            assert index.deleted_count <= 5
            gone = set(ids[:705].tolist())
            assert not set(index.search(vectors[::10], 50)[1].ravel().tolist()) & gone
            assert await engine.publish_if_due(force=True) is not None  # the smaller graph is published
            reloaded = IndexStore(settings.index_dir).load()
            assert reloaded.faiss_index.ntotal == index.faiss_index.ntotal
        finally:
            engine.shutdown()

    asyncio.run(go())
