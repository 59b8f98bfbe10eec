"""Weighted kNN accuracy of an embedding network (Wu et al. 2018): the training monitor and
`training.evaluate` share it. Memory = labelled train features, queries = test features;
cosine similarity, top-k neighbours, `index.vote.weighted_vote` with temperature tau.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from index.vote import DEFAULT_K, DEFAULT_TAU, weighted_vote
from training.data.datasets import ImageDataset
from training.embed import embed_in_shards
from training.encoder import network_embedder
from training.models.whitening import Whitening


@torch.no_grad()
def knn_accuracy(
    memory: torch.Tensor,
    memory_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    tau: float = DEFAULT_TAU,
    chunk: int = 1024,
) -> tuple[float, float]:
    """(top-1, top-5) in percent. memory: NxD, queries: QxD, both L2-normalised; labels -1 ignored."""
    labelled = query_labels >= 0
    queries, query_labels = queries[labelled], query_labels[labelled]
    if queries.shape[0] == 0 or memory.shape[0] == 0:
        raise ValueError("kNN accuracy needs labelled memory and query features")
    k = min(k, memory.shape[0])
    top = min(5, num_classes)
    correct1 = correct5 = 0
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ memory.T  # QcxN cosine
        values, neighbours = similarity.topk(k, dim=1)
        probabilities = weighted_vote(values, memory_labels[neighbours], num_classes, tau)  # QcxC
        ranked = probabilities.topk(top, dim=1).indices
        truth = query_labels[start : start + chunk].unsqueeze(1)
        correct1 += int((ranked[:, :1] == truth).sum())
        correct5 += int((ranked == truth).any(dim=1).sum())
    total = queries.shape[0]
    return 100.0 * correct1 / total, 100.0 * correct5 / total


@dataclass
class KnnMonitor:
    """Embeds `memory` and `queries` (sharded across ranks) and reports weighted-kNN accuracy.
    `input_size`: the side the images are embedded at (the encoder file's embedding size, where it
    is not the crop); both sets are resized to it once, here, not at every evaluation."""

    memory: ImageDataset
    queries: ImageDataset
    k: int = DEFAULT_K
    tau: float = DEFAULT_TAU
    batch_size: int = 512
    progress: bool = True  # the embedding bars; off with the run's --no-progress (logs stay lines)
    input_size: int | None = None

    def __post_init__(self) -> None:
        if self.input_size:
            self.memory = self.memory.resized(self.input_size)
            self.queries = self.queries.resized(self.input_size)

    def evaluate(
        self,
        network: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        amp_dtype=None,
        whiten_power: float | None = None,
    ) -> dict[str, float]:
        """knn/top1, knn/top5. With `whiten_power`: the figures of the whitened embedding (PCA
        whitening fitted on the memory's features, no labels), as the encoder file will embed, and
        the unwhitened ones as knn/top1_unwhitened, knn/top5_unwhitened."""
        was_training = network.training
        network.eval()
        try:
            embed = network_embedder(network, mean, std, device, amp_dtype)
            memory = embed_in_shards(embed, self.memory.images, self.batch_size, "kNN memory", self.progress)
            queries = embed_in_shards(
                embed, self.queries.images, self.batch_size, "kNN queries", self.progress
            )
        finally:
            network.train(was_training)
        result = self._accuracy(memory, queries)
        if whiten_power is None:
            return result
        whitening = Whitening.fitted(memory, whiten_power).to(memory.device)
        whitened = self._accuracy(
            F.normalize(whitening(memory), dim=1), F.normalize(whitening(queries), dim=1)
        )
        return whitened | {f"{key}_unwhitened": value for key, value in result.items()}

    def _accuracy(self, memory: torch.Tensor, queries: torch.Tensor) -> dict[str, float]:
        top1, top5 = knn_accuracy(
            memory,
            self.memory.labels.to(memory.device),
            queries,
            self.queries.labels.to(queries.device),
            self.memory.num_classes,
            self.k,
            self.tau,
        )
        return {"knn/top1": top1, "knn/top5": top5}
