"""Shuffling BN (MoCo): the key batch is shuffled before the key encoder so that BN statistics of
a key and of its query come from different samples; the keys are unshuffled afterwards.

Across ranks: `batch_shuffle_ddp` / `batch_unshuffle_ddp`, as in moco/builder.py (the permutation
is drawn on rank 0 and broadcast). On one process: `batch_shuffle_single`, paired with
SplitBatchNorm in the key encoder (the MoCo CIFAR demo's emulation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from training.distributed import concat_all_gather, get_rank


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: local NxCxHxW. Returns this rank's slice of the globally shuffled batch and the
    (N*world) permutation that undoes the shuffle."""
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    batch_size_all = x_gather.shape[0]
    num_ranks = batch_size_all // batch_size_this
    idx_shuffle = torch.randperm(batch_size_all, device=x.device)
    dist.broadcast(idx_shuffle, src=0)  # every rank uses rank 0's permutation
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(num_ranks, -1)[get_rank()]
    return x_gather[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Inverse of `batch_shuffle_ddp`: this rank's original samples, in their original order."""
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    num_ranks = x_gather.shape[0] // batch_size_this
    idx_this = idx_unshuffle.view(num_ranks, -1)[get_rank()]
    return x_gather[idx_this]


@torch.no_grad()
def batch_shuffle_single(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx_shuffle = torch.randperm(x.shape[0], device=x.device)
    return x[idx_shuffle], torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle_single(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    return x[idx_unshuffle]
