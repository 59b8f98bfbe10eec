"""Distributed semantics on CPU: 2 gloo processes, tiny models.

Each test spawns 2 ranks; every rank writes what it saw to a file and the test compares those
with a single process given the whole batch.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from training.methods.instdisc import InstDisc
from training.methods.moco import MoCoV2
from training.methods.mocov3 import MoCoV3
from training.methods.nnclr import NNCLR
from training.methods.shuffle_bn import batch_shuffle_ddp, batch_unshuffle_ddp
from training.methods.simclr import SimCLR
from training.models.global_bn import GlobalBatchNorm, convert_global_batchnorm

pytestmark = pytest.mark.distributed

WORLD = 2
TINY = {"in_channels": 1, "small_stem": True, "width": 0.0625}
SIZE, BATCH, LR = 12, 8, 0.5  # global batch 8: 4 per rank


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def global_views(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(BATCH, 1, SIZE, SIZE, generator=generator) for _ in range(count)]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "simclr":
        return SimCLR("resnet18", TINY, dim=8)
    if name == "moco-v3":
        return MoCoV3("resnet18", TINY, dim=8, mlp_dim=16)
    if name == "nnclr":  # a support set larger than the batch: the step's lookups and its enqueue
        return NNCLR("resnet18", TINY, dim=8, hidden_dim=16, pred_hidden_dim=16, support_size=12)
    raise ValueError(name)


def one_step(model: torch.nn.Module, module: torch.nn.Module, views: list[torch.Tensor], indices) -> float:
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    out = model(views, indices)
    out.loss.backward()
    optimiser.step()
    module.on_step_end(0.5)
    return out.loss.item()


def run(worker, tmp_path: Path, *args) -> list[dict]:
    mp.spawn(_in_group, args=(free_port(), str(tmp_path), worker, *args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]


def _in_group(rank: int, port: int, out_dir: str, worker, *args) -> None:
    """Run one rank's worker inside the gloo group, leave the group together, and exit at once.

    Twice under a loaded `make test` a rank aborted as it ended ("terminate called without an
    active exception", SIGABRT: a native thread still joinable while the interpreter finalises),
    once even after leaving the group together. These tests are about what the ranks computed,
    which is on disk before the exit; `os._exit` skips the finalisation where that race lives.
    (The product's exit under torchrun is exercised by test_distributed_engine.)"""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    worker(rank, out_dir, *args)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- workers (run in each rank, in the group)


def _equivalence_worker(rank: int, out_dir: str, name: str) -> None:
    method = build(name)  # under gloo the method makes its BN global itself (SyncBatchNorm needs CUDA)
    assert not method.sync_batch_norm and any(isinstance(m, GlobalBatchNorm) for m in method.modules())
    model = DistributedDataParallel(method)
    local = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    views = [v[local] for v in global_views()]
    loss = one_step(model, method, views, torch.arange(BATCH)[local])
    losses = [torch.zeros(1) for _ in range(WORLD)]
    dist.all_gather(losses, torch.tensor([loss]))
    state = {k: v.clone() for k, v in method.state_dict().items()}
    torch.save({"loss": float(torch.cat(losses).mean()), "state": state}, Path(out_dir) / f"rank{rank}.pt")


def _moco_queue_worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(100 + rank)  # different seeds: DDP must still start both ranks equal
    method = MoCoV2("resnet18", TINY, dim=8, queue_size=20)
    assert not method.split_bn  # real cross-rank shuffle under DDP
    model = DistributedDataParallel(method)
    enqueued = []
    original = method._dequeue_and_enqueue

    def record(keys: torch.Tensor) -> None:
        enqueued.append(keys.clone())
        original(keys)

    method._dequeue_and_enqueue = record
    local = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for step in range(3):  # 3 x 8 keys into 20 slots: wraps around
        views = [v[local] + step for v in global_views()]
        one_step(model, method, views, torch.arange(BATCH)[local])
    shuffled, idx_unshuffle = batch_shuffle_ddp(torch.arange(4.0) + 10 * rank)
    restored = batch_unshuffle_ddp(shuffled, idx_unshuffle)
    torch.save(
        {
            "queue": method.queue.clone(),
            "ptr": int(method.queue_ptr),
            "keys": enqueued,
            "shuffled": shuffled,
            "restored": restored,
        },
        Path(out_dir) / f"rank{rank}.pt",
    )


def _instdisc_bank_worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(200 + rank)  # different initial banks: the first step must synchronise them
    method = InstDisc("resnet18", TINY, num_samples=32, nce_k=8)
    model = DistributedDataParallel(method, broadcast_buffers=method.ddp_broadcast_buffers)
    generator = torch.Generator().manual_seed(rank)
    for step in range(3):
        indices = torch.arange(4) + 4 * rank + 8 * step  # disjoint across ranks, as a sampler gives
        views = [torch.randn(4, 1, SIZE, SIZE, generator=generator)]
        one_step(model, method, views, indices)
    torch.save(
        {
            "bank": method.memory.bank.clone(),
            "visited": method.memory.visited.clone(),
            "z": method.nce_normaliser,
        },
        Path(out_dir) / f"rank{rank}.pt",
    )


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["simclr", "moco-v3", "nnclr"])
def test_two_ranks_equal_one_process_with_the_whole_batch(name, tmp_path):
    reference = build(name)
    loss = one_step(reference, reference, global_views(), torch.arange(BATCH))
    ranks = run(_equivalence_worker, tmp_path, name)
    assert ranks[0]["loss"] == pytest.approx(loss, rel=1e-5)
    initial, expected = build(name).state_dict(), reference.state_dict()
    for rank in ranks:
        assert rank["state"].keys() == expected.keys()
        for key, value in expected.items():
            if not value.dtype.is_floating_point:
                assert torch.equal(rank["state"][key], value), key
                continue
            # the step's update must agree to float precision relative to its size
            update, rank_update = value - initial[key], rank["state"][key] - initial[key]
            scale = max(update.abs().max().item(), 1e-3)
            assert (rank_update - update).abs().max().item() <= 1e-4 * scale + 1e-6, key


def test_moco_queue_holds_gathered_keys_in_rank_order_on_every_rank(tmp_path):
    rank0, rank1 = run(_moco_queue_worker, tmp_path)
    torch.testing.assert_close(rank0["queue"], rank1["queue"], atol=0, rtol=0)
    assert rank0["ptr"] == rank1["ptr"] == (3 * BATCH) % 20
    gathered = [torch.cat([k0, k1]) for k0, k1 in zip(rank0["keys"], rank1["keys"], strict=True)]
    all_keys = torch.cat(gathered)  # 24 keys in enqueue order: step, then rank, then sample
    expected = torch.empty(20, 8)
    for position, key in enumerate(all_keys):
        expected[position % 20] = key
    torch.testing.assert_close(rank0["queue"], expected)
    # shuffling: one permutation for both ranks, undone exactly
    assert sorted(torch.cat([rank0["shuffled"], rank1["shuffled"]]).tolist()) == [0, 1, 2, 3, 10, 11, 12, 13]
    torch.testing.assert_close(rank0["restored"], torch.arange(4.0))
    torch.testing.assert_close(rank1["restored"], torch.arange(4.0) + 10)


def test_instdisc_memory_banks_stay_identical(tmp_path):
    rank0, rank1 = run(_instdisc_bank_worker, tmp_path)
    torch.testing.assert_close(rank0["bank"], rank1["bank"], atol=0, rtol=0)
    assert rank0["visited"].tolist() == rank1["visited"].tolist() == [True] * 24 + [False] * 8
    assert float(rank0["z"]) == float(rank1["z"]) > 0


def test_global_batchnorm_is_plain_batchnorm_on_one_process():
    bn = torch.nn.BatchNorm2d(3)
    converted = convert_global_batchnorm(torch.nn.Sequential(bn))[0]
    assert isinstance(converted, GlobalBatchNorm)
    x = torch.randn(6, 3, 4, 4)
    reference = torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.running_var, reference.running_var)
    torch.testing.assert_close(
        F.normalize(converted.eval()(x), dim=1), F.normalize(reference.eval()(x), dim=1)
    )
