"""The micro-batcher: concurrent embeddings share forward passes and get exactly their own rows."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from service.batcher import EmbeddingBatcher
from training.encoder import Encoder


def test_concurrent_requests_share_batches_and_get_their_own_rows(encoder_file) -> None:
    encoder = Encoder.load(encoder_file)
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    expected = encoder.embed(images)  # 12xD, one forward pass

    async def run() -> tuple[list[np.ndarray], int]:
        with ThreadPoolExecutor(2) as pool:
            batcher = EmbeddingBatcher(pool, max_batch=64)
            # 1 + 2 + 3 + ... images per request, all submitted at once.
            sizes, start, requests = [1, 2, 3, 6], 0, []
            for size in sizes:
                requests.append(batcher.embed(encoder, images[start : start + size]))
                start += size
            return await asyncio.gather(*requests), batcher.batches_run

    results, batches = asyncio.run(run())
    assert [r.shape[0] for r in results] == [1, 2, 3, 6]
    np.testing.assert_allclose(np.concatenate(results), expected, atol=1e-5)
    assert batches < 4  # the first request ran alone, the rest queued behind it and went together


def test_max_batch_splits_and_errors_reach_every_waiter(encoder_file) -> None:
    encoder = Encoder.load(encoder_file)

    async def run() -> tuple[int, list]:
        with ThreadPoolExecutor(1) as pool:
            batcher = EmbeddingBatcher(pool, max_batch=4)
            good = [batcher.embed(encoder, torch.zeros(3, 1, 28, 28, dtype=torch.uint8)) for _ in range(4)]
            await asyncio.gather(*good)
            bad = [batcher.embed(encoder, torch.zeros(1, 2, 28, 28, dtype=torch.uint8)) for _ in range(3)]
            outcomes = await asyncio.gather(*bad, return_exceptions=True)
            return batcher.batches_run, outcomes

    batches, outcomes = asyncio.run(run())
    assert batches == 4  # 3 + 3 > 4: every request of 3 images needs its own pass
    assert all(isinstance(o, RuntimeError) for o in outcomes)  # wrong channel count, reported to all


class _GatedEncoder:
    """An encoder whose passes wait until the test lets them finish, recording how many ran at once."""

    embed_dim = 4

    def __init__(self) -> None:
        self.started = [threading.Event(), threading.Event()]
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = self.most_at_once = self.calls = 0

    def embed(self, images: torch.Tensor) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.started[min(self.calls, 1)].set()
            self.calls += 1
        try:
            assert self.release.wait(30), "the test never released the pass"
            return images[:, 0, 0, :1].float().expand(-1, self.embed_dim).numpy()  # row i: image i's value
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_batches_run_side_by_side_up_to_max_in_flight(max_in_flight: int) -> None:
    encoder = _GatedEncoder()

    async def run() -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(2) as pool:
            batcher = EmbeddingBatcher(pool, max_batch=64, max_in_flight=max_in_flight)
            image = torch.ones(1, 1, 2, 2, dtype=torch.uint8)
            first = asyncio.ensure_future(batcher.embed(encoder, image))
            assert await loop.run_in_executor(None, encoder.started[0].wait, 30)
            # The first pass is running (and held): the next requests start a pass of their own
            # only when a second may run at once; otherwise they queue and go together after it.
            rest = [asyncio.ensure_future(batcher.embed(encoder, image * value)) for value in (2, 3)]
            if max_in_flight == 2:
                assert await loop.run_in_executor(None, encoder.started[1].wait, 30)
            encoder.release.set()
            return await asyncio.gather(first, *rest)

    results = asyncio.run(run())
    assert [float(r[0, 0]) for r in results] == [1.0, 2.0, 3.0]  # every request got its own rows
    assert encoder.most_at_once == max_in_flight
    assert encoder.calls == 2  # the two queued requests shared one pass either way
