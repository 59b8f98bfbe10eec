"""InstDisc (Wu et al. 2018, "Non-Parametric Instance Discrimination"; lemniscate.pytorch):
every image is its own class. Features are 128-d and L2-normalised; a memory bank holds one
feature per training image; the loss is NCE with m noise samples from the bank (or the exact
non-parametric softmax for small N), plus the proximal term on the positives (applied to
instances whose bank entry holds a feature from an earlier visit, not the random init).

Defaults: 128-d, m = 4096, tau = 0.07, bank momentum 0.5, SGD lr 0.03 per 256, momentum 0.9,
wd 5e-4, batch 256, 200 epochs, the crop/jitter/grayscale/flip augmentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, MethodParams, RunConfig, setting
from training.distributed import all_reduce_mean, concat_all_gather, is_distributed
from training.losses.nce import (
    estimate_normaliser,
    full_softmax_loss,
    nce_loss,
    noise_push_weight,
    proximal_term,
    sample_noise_indices,
)
from training.methods.base import Method, StepOutput
from training.models import EmbeddingNetwork, build_backbone
from training.models.heads import LinearHead
from training.models.memory_bank import MemoryBank

# The paper's Sec. 3.4 shows lambda in {0, 10, 30, 50} (Fig. 3) and names no single default;
# lemniscate.pytorch omits the term. 50, the paper's strongest setting, is used here.
PAPER_PROXIMAL_WEIGHT = 50.0
BANK_INITS = ("first-visit", "random")
# Beyond this N the exact softmax's BxN logits (and bank copy) per step cost more than the network.
EXACT_SOFTMAX_MAX_SAMPLES = 250_000


@dataclass(frozen=True)
class InstDiscParams(MethodParams):
    dim: int = setting(128, "feature dimension", flag="--low-dim")
    nce_k: int = setting(
        4096,
        "NCE noise samples m; 0 = exact non-parametric softmax, preferred wherever the BxN logits fit: "
        "NCE diverged on Fashion-MNIST (README); TensorBoard nce/noise_push_weight far above 1 is the sign",
    )
    temperature: float = setting(0.07, "temperature tau", flag="--nce-t")
    memory_momentum: float = setting(0.5, "memory-bank momentum v <- norm(m v + (1-m) f)", flag="--nce-m")
    proximal_weight: float = setting(
        PAPER_PROXIMAL_WEIGHT,
        "proximal term weight lambda (paper Fig. 3: 0/10/30/50; 0 disables)",
        flag="--proximal-lambda",
    )

    bank_init: str = setting(
        "random",
        "memory-bank entries before an instance's first visit: first-visit = its first feature "
        "(no positive pulls towards a random vector); random = random unit vectors mixed in by the "
        "momentum update (the paper / lemniscate.pytorch)",
        choices=BANK_INITS,
    )

    def check(self, config: RunConfig) -> None:
        if self.nce_k < 0:
            raise ConfigError(f"--nce-k must be >= 0 (0 = exact softmax), got {self.nce_k}")


class InstDisc(Method):
    name = "instdisc"
    num_views = 1
    Params = InstDiscParams
    # lemniscate.pytorch: SGD lr 0.03 per 256, wd 5e-4, batch 256, 200 epochs, x0.1 at 120 and 160.
    paper_defaults = {
        "optimizer": "sgd", "lr": 0.03, "weight_decay": 5e-4, "optimizer_momentum": 0.9, "batch_size": 256,
        "epochs": 200, "warmup_epochs": 0.0, "lr_schedule": "step", "lr_steps": (120, 160),
        "augmentation": "instdisc",
    }  # fmt: skip
    # Small images (<= 64 px; MNIST, CIFAR: N <= ~100k): the exact softmax that NCE approximates
    # (its BxN logits are 61 MB at N=60k), where the paper's NCE (m=4096, Z fixed from the random
    # bank) diverged under every setting tried; no proximal term, as lemniscate.pytorch; and a bank
    # that starts from each instance's first feature. bench/RESULTS.md has the measurements; the
    # paper's path stays `--nce-k 4096 --proximal-lambda 50 --bank-init random`.
    small_image_defaults = {"nce_k": 0, "proximal_weight": 0.0, "bank_init": "first-visit"}
    # The bank is updated identically on every rank; broadcasting it from rank 0 at every
    # forward (DDP's broadcast_buffers) would move N x 128 floats per step for nothing.
    ddp_broadcast_buffers = False
    embedding_is_head = True  # the paper's 128-d L2-normalised output is what the bank and kNN use

    def __init__(
        self,
        arch: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        num_samples: int = 1281167,
        dim: int = 128,
        nce_k: int = 4096,
        temperature: float = 0.07,
        memory_momentum: float = 0.5,
        proximal_weight: float = PAPER_PROXIMAL_WEIGHT,
        bank_init: str = "random",
    ) -> None:
        super().__init__()
        if nce_k < 0:
            raise ValueError(f"nce_k must be >= 0 (0 = full softmax), got {nce_k}")
        if bank_init not in BANK_INITS:
            raise ValueError(f"bank_init must be one of {BANK_INITS}, got {bank_init!r}")
        self.bank_init = bank_init
        self.arch, self.backbone_kwargs = arch, dict(backbone_kwargs or {})
        self.nce_k = nce_k
        self.temperature = temperature
        self.proximal_weight = proximal_weight
        backbone, feature_dim = build_backbone(arch, **self.backbone_kwargs)
        self.encoder = EmbeddingNetwork(backbone, LinearHead(feature_dim, dim))
        self.memory = MemoryBank(num_samples, dim, memory_momentum)
        # NCE normaliser Z: estimated once on the first batch (< 0 = not yet), then fixed.
        self.register_buffer("nce_normaliser", torch.tensor(-1.0))
        self._bank_synchronised = False
        self._normaliser_known = False

    @torch.no_grad()
    def _broadcast_memory_bank(self) -> None:
        """Start every rank from rank 0's bank (ranks may have been seeded differently); from
        then on identical updates keep the banks equal without per-step broadcasts."""
        if is_distributed():
            dist.broadcast(self.memory.bank, src=0)
            visited = self.memory.visited.to(torch.uint8)  # gloo has no bool broadcast
            dist.broadcast(visited, src=0)
            self.memory.visited.copy_(visited.bool())
        self._bank_synchronised = True

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> StepOutput:
        if not self._bank_synchronised:
            self._broadcast_memory_bank()
        features = F.normalize(self.encoder(views[0]), dim=1)  # BxD
        previous = self.memory(indices)  # BxD, v_i^{t-1}
        # Only instances seen before have a v^{t-1}; the random init is not a previous feature.
        seen_before = self.memory.visited[indices].clone()  # B
        # Every rank applies every rank's features to the bank, so the banks stay identical.
        all_features, all_indices = concat_all_gather(features.detach()), concat_all_gather(indices)
        if self.bank_init == "first-visit":
            self.memory.fill_unvisited(all_features, all_indices)
        if self.nce_k == 0:
            # a copy: backward needs the bank as it was, and the update below is in place
            result = full_softmax_loss(features, self.memory.bank.clone(), indices, self.temperature)
        else:
            candidates = sample_noise_indices(features.shape[0], self.nce_k, self.memory.size, indices)
            weights = self.memory(candidates)  # Bx(1+m)xD
            scores = torch.bmm(weights, features.unsqueeze(2)).squeeze(2)  # Bx(1+m)
            self._set_normaliser_once(scores)
            result = nce_loss(scores, self.temperature, self.nce_normaliser, self.memory.size)
        proximal = proximal_term(features, previous, self.proximal_weight, seen_before)
        self.memory.update(all_features, all_indices)
        metrics = {"loss/instance": result.loss.detach(), "loss/proximal": proximal.detach()}
        metrics["acc/instance"] = result.accuracy()
        # How far each feature stays from its own memory entry: falling towards (or below) the
        # noise similarity means the representation drifts faster than the bank follows.
        metrics["instance/positive_similarity"] = (features.detach() * previous).sum(dim=1).mean()
        if self.nce_k:
            metrics["nce/normaliser"] = self.nce_normaliser.detach()
            metrics["nce/noise_similarity"] = scores[:, 1:].detach().mean()
            # > 1: the noise pushes harder than the positive can pull (the softmax keeps it <= 1).
            metrics["nce/noise_push_weight"] = noise_push_weight(
                scores.detach(), self.temperature, self.nce_normaliser, self.memory.size
            ).mean()
        return StepOutput(result.loss + proximal, metrics)

    @torch.no_grad()
    def _set_normaliser_once(self, scores: torch.Tensor) -> None:
        """Monte Carlo Z on the first batch, averaged over ranks so all ranks share it."""
        if self._normaliser_known:  # skip the device sync of reading the buffer every step
            return
        if self.nce_normaliser.item() < 0:  # not restored from a checkpoint either
            estimate = all_reduce_mean(estimate_normaliser(scores, self.temperature, self.memory.size))
            self.nce_normaliser.fill_(estimate.item())
        self._normaliser_known = True

    def embedding_network(self) -> nn.Module:
        """Backbone + the 128-d linear layer: the space the memory bank and kNN live in."""
        return self.encoder

    @classmethod
    def from_config(
        cls, params: MethodParams, arch: str, backbone_kwargs: dict[str, Any], num_samples: int
    ) -> InstDisc:
        """The bank holds one entry per training image: N comes from the data."""
        params = cast(InstDiscParams, params)
        if params.nce_k == 0 and num_samples > EXACT_SOFTMAX_MAX_SAMPLES:
            raise ConfigError(
                f"the exact softmax (--nce-k 0) over {num_samples} instances needs BxN logits per step; "
                f"above {EXACT_SOFTMAX_MAX_SAMPLES} use the paper's NCE (--nce-k 4096)"
            )
        return cls(arch, backbone_kwargs, num_samples=num_samples, **dataclasses.asdict(params))
