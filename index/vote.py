"""Weighted kNN vote of Wu et al. 2018 (InstDisc), shared by training's monitor and index.knn.

For a query with neighbours i in N_k, cosine similarities s_i and labels c_i, class c gets
w_c = sum_{i in N_k} exp(s_i / tau) * 1(c_i = c); probabilities are w / sum(w).
Defaults from the paper: k = 200, tau = 0.07.
"""

from __future__ import annotations

import torch

DEFAULT_K = 200
DEFAULT_TAU = 0.07


def weighted_vote(
    similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, tau: float = DEFAULT_TAU
) -> torch.Tensor:
    """similarities, neighbour_labels: QxK (labels int64, -1 = unlabelled, ignored).

    Returns QxC probabilities."""
    labelled = neighbour_labels >= 0
    # Subtracting each row's max leaves the normalised result unchanged and avoids overflow at small tau.
    weights = torch.exp((similarities - similarities.max(dim=1, keepdim=True).values) / tau) * labelled
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    scores.scatter_add_(1, neighbour_labels.clamp(min=0), weights)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
