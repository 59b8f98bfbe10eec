"""NNCLR's loss (Dwibedi et al. 2021): the positive of a view is its nearest neighbour in a support
set Q of past embeddings, contrasted with the other view's predictions across the batch:

    L_i = -log  exp(NN(z_i, Q) . p_i+ / tau)  /  sum_k exp(NN(z_i, Q) . p_k+ / tau)

z_i the projection of view 1 (L2-normalised), NN(z, Q) = argmax_q z.q over the support set (no
gradient), p_k+ the prediction for the other view of image k (L2-normalised; all ranks'). The
nearest neighbour replaces SimCLR's second view as the anchor, so images that are alike but are not
augmentations of each other become positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses.result import ContrastiveResult


@torch.no_grad()
def nearest_neighbours(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """NxC: for each row of z (NxC, normalised), the support set's row (KxC) closest in cosine."""
    nearest = (z @ support.T).argmax(dim=1)  # N
    return support[nearest]


def nnclr_loss(neighbours: torch.Tensor, p_all: torch.Tensor, tau: float, rank: int = 0) -> ContrastiveResult:
    """neighbours: NxC local anchors NN(z_i, Q); p_all: (N*world)xC normalised predictions of the other
    view of every rank, rank order. Row i's positive is p_all[N*rank + i]."""
    logits = (neighbours @ p_all.T).float() / tau  # Nx(N*world)
    n = logits.shape[0]
    labels = torch.arange(n, dtype=torch.long, device=logits.device) + n * rank
    return ContrastiveResult(F.cross_entropy(logits, labels), logits, labels)
