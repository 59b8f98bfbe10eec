"""The engine sizes torch's threads to the loaded encoder: one per pass for a small encoder (its
batches then run side by side on the pool's threads), torch's default for a large one. OpenMP
counts threads per calling thread, so the count is applied in the pool thread that runs a pass."""

from __future__ import annotations

import asyncio
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from service_helpers import service_settings

from index.search_index import SearchIndex
from index.store import IndexStore
from service.engine import SINGLE_THREAD_MAX_MACS, Engine, intra_op_threads
from service.random_model import write_random_encoder
from training.encoder import Encoder

DEMO_ENCODER = Path(__file__).resolve().parents[2] / "service" / "assets" / "demo-encoder.pt"


def test_small_encoders_get_one_thread_and_large_ones_the_default(tmp_path: Path) -> None:
    small = Encoder.load(DEMO_ENCODER)
    large = Encoder.load(write_random_encoder(tmp_path / "large.pt", width=1.0, input_size=96))
    assert small.macs_per_image <= SINGLE_THREAD_MAX_MACS < large.macs_per_image
    assert intra_op_threads(small, configured=0, default=8) == 1
    assert intra_op_threads(large, configured=0, default=8) == 8
    assert intra_op_threads(large, configured=1, default=8) == 1  # a setting wins
    assert intra_op_threads(small, configured=4, default=8) == 4


@pytest.mark.parametrize(("configured", "threads", "in_flight"), [(0, 1, 2), (2, 2, 1)])
def test_passes_and_searches_run_on_the_threads_the_engine_chose(
    tmp_path: Path, configured: int, threads: int, in_flight: int
) -> None:
    settings = service_settings(
        tmp_path, None, "unused", MODEL_CHECKPOINT=DEMO_ENCODER, INFERENCE_THREADS=2,
        INTRA_OP_THREADS=configured,
    )  # fmt: skip
    dim = Encoder.load(DEMO_ENCODER).embed_dim
    IndexStore(settings.index_dir).publish(SearchIndex.empty_flat(dim), encoder_path=DEMO_ENCODER)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)

    def embed_and_count(encoder: Encoder) -> tuple[np.ndarray, int]:
        return encoder.embed(images), torch.get_num_threads()  # the pool thread's count after a pass

    async def go() -> tuple[int | None, int, set[int]]:
        engine = Engine(settings)
        try:
            assert await engine.load_current()
            loaded = engine.require()
            # Every pool thread, whatever it ran before (the load itself ran torch on one of them).
            jobs = [engine.run_in_thread(embed_and_count, loaded.encoder) for _ in range(6)]
            counts = await asyncio.gather(*jobs)
            return loaded.encoder.threads, engine.batcher.max_in_flight, {c for _, c in counts}
        finally:
            engine.shutdown()

    assert asyncio.run(go()) == (threads, in_flight, {threads})


def test_searches_and_passes_each_set_their_own_count_on_a_shared_thread(tmp_path: Path) -> None:
    settings = service_settings(
        tmp_path, None, "unused", MODEL_CHECKPOINT=DEMO_ENCODER, INFERENCE_THREADS=1, INTRA_OP_THREADS=2
    )
    dim = Encoder.load(DEMO_ENCODER).embed_dim
    IndexStore(settings.index_dir).publish(SearchIndex.empty_flat(dim), encoder_path=DEMO_ENCODER)
    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    def embed_and_count(encoder: Encoder) -> int:
        encoder.embed(images)
        return torch.get_num_threads()

    async def go() -> list[int]:
        engine = Engine(settings)
        try:
            assert await engine.load_current()
            loaded, seen = engine.require(), []
            for _ in range(2):  # one pool thread: each job sees what the one before it left
                seen.append(await engine.run_in_thread(embed_and_count, loaded.encoder))
                await engine.search(loaded, np.zeros((1, dim), dtype=np.float32), 1)
                seen.append(await engine.run_in_thread(faiss.omp_get_max_threads))
            return seen
        finally:
            engine.shutdown()

    assert asyncio.run(go()) == [2, settings.FAISS_THREADS] * 2
