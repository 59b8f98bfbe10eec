"""PCA whitening of the retrieval embedding, fitted without labels on the training images' embeddings.

A self-supervised backbone's pooled features (post-ReLU, all positive) share a large common component:
on Fashion-MNIST the demo encoder's nearest and 200th neighbours sit at cosine 0.97 and 0.90, so
the kNN vote's exp(s / 0.07) weighs all 200 alike and the directions that separate the classes are
drowned by the ones that vary most. Centring and rescaling the principal directions (Jegou & Chum,
ECCV 2012, "Negative evidences and co-occurrences in image retrieval: the benefit of PCA and
whitening"; the learned whitening of R-MAC and GeM retrieval) spreads them out again:

    w(x) = (x / |x| - mean) @ U diag(lambda + eps * lambda_max)^(-power / 2)   (D -> D', then L2-normalised)

with mean and (lambda, U) the eigen-decomposition of the L2-normalised embeddings' covariance
(L2, PCA-whiten, L2: the order of Jegou & Chum). power 1 is full whitening,
0.5 the square-rooted variant that bench/RESULTS.md ("Whitening the retrieval embedding") found
to gain on both image sets measured, in kNN and in precision@10 alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_POWER = 0.5
# How many embeddings a fit uses: 2k already gave the figures of 60k on Fashion-MNIST (512-d;
# bench/RESULTS.md, "Whitening the retrieval embedding"), and at least 4 per dimension keep the
# covariance well estimated for wider embeddings. The engine refits at every save, so this is small.
FIT_SAMPLES = 4096
SAMPLES_PER_DIMENSION = 4


def fit_sample_count(dim: int) -> int:
    """Embeddings to fit a D-dimensional whitening on."""
    return max(FIT_SAMPLES, SAMPLES_PER_DIMENSION * dim)


EIGENVALUE_FLOOR = 1e-6  # eps above: a fraction of the largest eigenvalue, so no direction divides by ~0


def fit_whitening(
    features: torch.Tensor, power: float = DEFAULT_POWER, out_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean D, projection DxD') of PCA whitening for NxD features (L2-normalised here), in float64.

    The columns of the projection are the covariance's eigenvectors, largest eigenvalue first,
    each scaled by (lambda + eps * lambda_max)^(-power/2); out_dim keeps the first D' of them.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"whitening needs an NxD matrix of at least 2 embeddings, got {tuple(features.shape)}"
        )
    x = F.normalize(features.detach().to(torch.float64), dim=1)
    mean = x.mean(dim=0)  # D
    centred = x - mean
    covariance = centred.T @ centred / x.shape[0]  # DxD
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    if out_dim is not None:
        eigenvalues, eigenvectors = eigenvalues[:out_dim], eigenvectors[:, :out_dim]
    scale = (eigenvalues + EIGENVALUE_FLOOR * eigenvalues[0]).pow(-power / 2)  # D'
    return mean, eigenvectors * scale  # DxD'


class Whitening(nn.Module):
    """x -> (x / |x| - mean) @ projection, computed in float32 under autocast too: the features of one
    encoder agree to 2-3 digits, so centring them in bf16 would keep little but rounding (the
    deploy-time encoder keeps this module's buffers in float32 for the same reason)."""

    def __init__(self, dim: int, out_dim: int | None = None, power: float = DEFAULT_POWER) -> None:
        super().__init__()
        self.dim, self.out_dim, self.power = int(dim), int(out_dim or dim), float(power)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("projection", torch.eye(self.dim, self.out_dim))

    @property
    def spec(self) -> dict[str, Any]:
        return {"dim": self.dim, "out_dim": self.out_dim, "power": self.power}

    @classmethod
    def fitted(
        cls, features: torch.Tensor, power: float = DEFAULT_POWER, out_dim: int | None = None
    ) -> Whitening:
        mean, projection = fit_whitening(features, power, out_dim)
        whitening = cls(features.shape[1], projection.shape[1], power)
        whitening.mean.copy_(mean.float())
        whitening.projection.copy_(projection.float())
        return whitening

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return (F.normalize(features.float(), dim=1) - self.mean) @ self.projection  # NxD'
