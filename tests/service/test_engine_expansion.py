"""A loaded IVF version is ready for expanded searches before it is swapped in: its direct map (what
reads a result's vector by id) is built off the request path when SEARCH_EXPAND is on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import faiss
import numpy as np
import pytest
from service_helpers import service_settings

from index.factory import build_index
from index.store import IndexStore
from service.engine import Engine
from training.encoder import Encoder

DEMO_ENCODER = Path(__file__).resolve().parents[2] / "service" / "assets" / "demo-encoder.pt"


@pytest.mark.parametrize(("search_expand", "map_type"), [(5, "Hashtable"), (0, "NoMap")])
def test_a_loaded_ivf_version_has_its_direct_map_when_searches_expand(
    tmp_path: Path, search_expand: int, map_type: str
) -> None:
    settings = service_settings(
        tmp_path, None, "unused", MODEL_CHECKPOINT=DEMO_ENCODER, SEARCH_EXPAND=search_expand
    )
    dim = Encoder.load(DEMO_ENCODER).embed_dim
    vectors = np.random.default_rng(0).standard_normal((400, dim)).astype(np.float32)
    index = build_index(vectors, np.arange(400), "ivf", {"nlist": 4, "nprobe": 4}, progress=False)
    IndexStore(settings.index_dir).publish(index, encoder_path=DEMO_ENCODER)

    async def loaded_map_type() -> int:
        engine = Engine(settings)
        try:
            assert await engine.load_current()
            return faiss.extract_index_ivf(engine.require().index.faiss_index).direct_map.type
        finally:
            engine.shutdown()

    assert asyncio.run(loaded_map_type()) == getattr(faiss.DirectMap, map_type)
