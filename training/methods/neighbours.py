"""Mined-neighbour positives: SimCLR whose positive for an image is a view of one of its nearest
neighbours, mined once from a finished encoder (--init).

SCAN (Van Gansbeke et al. 2020) mines each image's nearest neighbours with a trained encoder and
trains on them as pairs that belong together; mean-shift (Koohpayegani et al. 2021) and NNCLR pull
an image toward its neighbours. Here the neighbours are mined in the --init encoder's retrieval
embedding (what the service searches: whitened where it is), the positive of an image is an
augmented view of one of its top k, drawn at random each step (with probability
`neighbour_p`, else the image itself; with `mutual`, only from the neighbours that have the image
among their own top k, the k-reciprocal set of Zhong et al. 2017; with `agree_pixels` K, only
from those that are also among the image's K nearest in its raw pixels, a second view that must
agree), and the loss is SimCLR's NT-Xent through a fresh projection head. Rounds: mine again from
the encoder a run saved.

Not a paper's recipe: the defaults are the one measured in bench/RESULTS.md ("Mined neighbours as
positives": 3 epochs, SGD lr 0.2 at batch 256, tau 0.2, k 10): on a set of letters +0.057
precision@10 in one round, +0.087 in two; on Fashion-MNIST +0.010.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from training.config import ConfigError, RunConfig, setting
from training.methods.simclr import SimCLR, SimCLRParams
from training.models.whitening import Whitening

MINING_BLOCK = 2048  # query rows per similarity block: 2048 x 60k floats, 0.5 GB
PIXEL_SIDE = 32  # larger images are area-resized to this side for the pixel view
PIXEL_DIMS = 64  # principal directions of the pixel view
PIXEL_FIT = 10_000  # images its PCA whitening is fitted on (seeded)


@dataclass(frozen=True)
class NeighboursParams(SimCLRParams):
    k: int = setting(
        10, "neighbours mined per image (the positives are drawn from them)", flag="--neighbour-k"
    )
    mutual: bool = setting(
        False, "draw only neighbours that have the image among their own top k (k-reciprocal)"
    )
    neighbour_p: float = setting(1.0, "share of positives that are a neighbour (else the image itself)")
    agree_pixels: int = setting(
        0,
        "draw only neighbours that are also among the image's K nearest in its raw pixels (PCA-whitened, "
        f"{PIXEL_DIMS} directions): a second, independent view must agree; 0 = off",
        flag="--agree-pixels",
    )

    def check(self, config: RunConfig) -> None:
        super().check(config)
        if not config.init:
            raise ConfigError(
                "neighbours fine-tunes a finished encoder, whose neighbours it mines: give --init "
                "ENCODER (e.g. runs/simclr/encoder.pt); a catalogue refresh starts from the served one"
            )
        if self.k <= 0 or not 0 <= self.neighbour_p <= 1 or self.temperature <= 0 or self.agree_pixels < 0:
            raise ConfigError(
                "--neighbour-k must be positive, --neighbour-p in [0, 1], --temperature positive, "
                "--agree-pixels 0 or more"
            )


@torch.no_grad()
def mine_neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """NxK indices of each row's k most similar other rows (unit NxD rows, cosine), nearest first."""
    k = min(k, len(embeddings) - 1)
    blocks = []
    for start in range(0, len(embeddings), MINING_BLOCK):
        similarity = embeddings[start : start + MINING_BLOCK] @ embeddings.T  # BxN
        rows = torch.arange(start, start + len(similarity))
        similarity[torch.arange(len(similarity)), rows] = -float("inf")  # not itself
        blocks.append(similarity.topk(k, dim=1).indices)
    return torch.cat(blocks)


@torch.no_grad()
def mutual_mask(neighbours: torch.Tensor) -> torch.Tensor:
    """NxK bool: whether neighbour j of image i has i among its own neighbours (NxK indices)."""
    own = torch.arange(len(neighbours)).view(-1, 1, 1)
    return (neighbours[neighbours] == own).any(dim=2)  # NxKxK -> NxK


@torch.no_grad()
def agreement_mask(neighbours: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """NxK bool: whether neighbour j of image i is also among its neighbours in `others` (NxK2)."""
    blocks = []
    for start in range(0, len(neighbours), MINING_BLOCK):
        mine, theirs = neighbours[start : start + MINING_BLOCK], others[start : start + MINING_BLOCK]
        blocks.append((mine.unsqueeze(2) == theirs.unsqueeze(1)).any(dim=2))  # BxKxK2 -> BxK
    return torch.cat(blocks)


@torch.no_grad()
def pixel_embedding(images: torch.Tensor) -> torch.Tensor:
    """NxD unit rows: the raw pixels (area-resized to at most PIXEL_SIDE), unit length, then
    PCA-whitened (power 0.5, PIXEL_DIMS directions, fitted on PIXEL_FIT seeded images)."""
    rows = []
    for start in range(0, len(images), MINING_BLOCK):
        block = images[start : start + MINING_BLOCK].float()  # BxCxHxW
        if max(block.shape[-2:]) > PIXEL_SIDE:
            block = F.interpolate(block, size=(PIXEL_SIDE, PIXEL_SIDE), mode="area")
        rows.append(F.normalize(block.flatten(1), dim=1))
    pixels = torch.cat(rows)  # NxP
    fit = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))[:PIXEL_FIT]
    whitening = Whitening.fitted(pixels[fit], out_dim=min(PIXEL_DIMS, pixels.shape[1], len(fit)))
    return F.normalize(whitening(pixels), dim=1)


class MinedNeighbours(SimCLR):
    name = "neighbours"
    Params = NeighboursParams
    needs_initial_embeddings = True
    defaults_source = "recipe"
    notes = (
        "Fine-tunes a finished encoder (--init, required): SimCLR's NT-Xent with a view of one of each "
        "image's k nearest neighbours (mined once in the encoder's retrieval embedding) as its positive. "
        "Defaults: the recipe measured in bench/RESULTS.md, not a paper's."
    )
    paper_defaults = {
        "optimizer": "sgd", "lr": 0.2, "weight_decay": 0.0, "optimizer_momentum": 0.9, "batch_size": 256,
        "epochs": 3, "warmup_epochs": 0.3, "lr_schedule": "cosine", "augmentation": "simclr",
        "temperature": 0.2, "global_bn": True,
    }  # fmt: skip
    # Images <= 64 px: SimCLR's small-image views, and only the neighbours the raw pixels also find
    # (top 100). Measured at the 56 px embedding on four sets (bench/RESULTS.md, "The pixels' vote
    # as the small-image default"): +0.005 to +0.009 precision@10 on three glyph sets (means of
    # three seeds), +0.001 to +0.002 on clothes (two seeds). Photos keep it off: their pixels are
    # not aligned objects on a plain ground.
    small_image_defaults = {"augmentation": "simclr-noflip", "agree_pixels": 100}

    def __init__(
        self,
        arch: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        num_samples: int = 1,
        k: int = 10,
        mutual: bool = False,
        neighbour_p: float = 1.0,
        agree_pixels: int = 0,
        **simclr: Any,
    ) -> None:
        super().__init__(arch, backbone_kwargs, **simclr)
        self.k, self.mutual, self.neighbour_p, self.agree_pixels = k, mutual, neighbour_p, agree_pixels
        # NxK: each image's mined neighbours and which of them may be drawn. Until mined, every
        # image is its own only neighbour (plain SimCLR). Buffers: checkpoints and resume keep them.
        self.register_buffer("neighbours", torch.arange(num_samples).view(-1, 1).repeat(1, k))
        self.register_buffer("drawable", torch.zeros(num_samples, k, dtype=torch.bool))

    @classmethod
    def from_config(cls, params, arch, backbone_kwargs, num_samples):
        return cls(arch, backbone_kwargs, num_samples, **dataclasses.asdict(params))

    @torch.no_grad()
    def use_initial_embeddings(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ) -> str:
        """Mine the neighbours (NxD unit rows of the N training images, as the --init encoder
        retrieves them; `images`, NxCxHxW, for --agree-pixels); with labels, the line reports how
        many drawable neighbours share the image's."""
        if len(embeddings) != len(self.neighbours):
            raise ValueError(f"{len(embeddings)} embeddings for {len(self.neighbours)} images")
        neighbours = mine_neighbours(embeddings.float(), self.k)  # NxK' (K' < K: fewer images than K)
        drawable = mutual_mask(neighbours) if self.mutual else torch.ones_like(neighbours, dtype=torch.bool)
        if self.agree_pixels:
            if images is None:
                raise ValueError("--agree-pixels needs the training images")
            pixel_neighbours = mine_neighbours(pixel_embedding(images), self.agree_pixels)  # NxK2
            drawable &= agreement_mask(neighbours, pixel_neighbours)
        found = neighbours.shape[1]
        self.neighbours[:, :found] = neighbours.to(self.neighbours.device)
        self.drawable.zero_()[:, :found] = drawable.to(self.drawable.device)
        return self.describe_neighbours(labels)

    def describe_neighbours(self, labels: torch.Tensor | None = None) -> str:
        per_image = self.drawable.sum(dim=1)
        line = (
            f"mined the top {self.k} neighbours of {len(per_image)} images"
            f"{' (mutual only)' if self.mutual else ''}"
            f"{f' (also in the pixels top {self.agree_pixels})' if self.agree_pixels else ''}"
            f": {per_image.float().mean():.1f} drawable per "
            f"image, {(per_image == 0).float().mean():.1%} without any (their positive is themselves)"
        )
        if labels is None or not (labels >= 0).any():
            return line
        labels = labels.to(self.neighbours.device)
        counted = self.drawable & (labels >= 0).view(-1, 1) & (labels[self.neighbours] >= 0)  # NxK
        same = (labels[self.neighbours] == labels.view(-1, 1)) & counted
        purity = same.sum() / counted.sum().clamp_min(1)
        return f"{line}; {purity:.1%} of their image's class (labels: reported only)"

    @torch.no_grad()
    def view_sources(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """[the images, a drawn neighbour of each]: with probability neighbour_p one of its
        drawable neighbours, uniformly; itself when it has none."""
        rows = indices.to(self.drawable.device)
        weights = self.drawable[rows].float()  # NxK
        has_any = weights.sum(dim=1) > 0
        weights[~has_any, 0] = 1.0  # a placeholder draw, replaced by the image itself below
        drawn = self.neighbours[rows, torch.multinomial(weights, 1).squeeze(1)]  # N
        use = has_any & (torch.rand(len(rows), device=rows.device) < self.neighbour_p)
        return [indices, torch.where(use, drawn, rows).to(indices.device)]
