"""Can the retrieval embedding be chosen without labels? For one encoder and catalogue, each
candidate embedding (layer4 2x2, what serves; layer3 3x3 beside it, each whitened, layer3 making
0.2, 1/3 or 1/2 of the cosine) gets label-free scores computed on the images alone, beside its
precision@10 (the labels, read for that column only, are the truth the scores should predict):

- `learnable`: cluster learnability (Lu et al. 2023): k-means with K clusters on the catalogue, then
  the share of catalogue items whose 10 nearest others vote for their own cluster.
- `mutual`: of each query's top 10 catalogue results, the share that have the query among their own
  10 nearest queries (a bipartite k-reciprocal rate; queries and catalogue may differ in kind).
- `stable`: overlap (Jaccard) of a catalogue item's top 10 with the top 10 of a mildly moved copy
  of it (scale 0.85-1, shift up to 1/14 of the side; seeded), itself excluded from both.
- `pixels`: the share of a catalogue item's top 10 that are among its 100 nearest in raw pixels
  (the pixel view that `training.neighbours --agree-pixels` uses).
- `rank`: RankMe (Garrido et al. 2023), the effective rank of the whitened catalogue embedding,
  as a share of its dimensions.

1000 seeded memory images are the queries and 10k seeded memory images fit the whitening, as in
`bench/expansion_study.py`.

    python bench/embedding_choice.py service/assets/demo-encoder.pt --data fashion-mnist:test \
        --train-data fashion-mnist
    python bench/embedding_choice.py runs/t/glyphs-tau0.2/encoder.pt --data folder:/tmp/glyphs/test \
        --train-data folder:/tmp/glyphs/train [--size 56]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.expansion_study import EXPAND, SHIFTS, STAGES, precision_at_10, stage_views, whitened  # noqa: E402
from training.data.datasets import load_dataset  # noqa: E402
from training.encoder import Encoder  # noqa: E402
from training.methods.neighbours import agreement_mask, mine_neighbours, pixel_embedding  # noqa: E402
from training.models.whitening import Whitening  # noqa: E402

# layer3's share of the cosine: 0 = layer4 2x2 alone, 1/2 = both stages alike (each whitened, unit)
LAYER3_SHARES = (0.0, 0.2, 1 / 3, 0.5)
CLUSTERS = (10, 50)
K = 10


def combined(part: dict[str, torch.Tensor], whitenings: dict[str, Whitening], share: float) -> np.ndarray:
    """NxD: layer4 2x2 and (if share > 0) layer3 3x3, each whitened and unit length, layer3 scaled so
    that it makes `share` of the cosine between two rows, side by side, unit length."""
    if not share:
        return whitened(part, ("layer4 2x2",), whitenings)
    layer3, layer4 = (F.normalize(whitenings[name](part[name]), dim=1) for name in STAGES[::-1])
    scale = math.sqrt(share / (1 - share))
    return F.normalize(torch.cat([scale * layer3, layer4], dim=1), dim=1).numpy()


def moved(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """NxCxSxS uint8: each image scaled by 0.85-1 and shifted by up to 1/14 of its side (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(images)
    scale = 1 / (0.85 + 0.15 * torch.rand(n, generator=generator))  # >1 in grid units: zoom out
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 14)  # grid spans 2 units
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    out = []
    for start in range(0, n, 2048):
        block = images[start : start + 2048].float()
        grid = F.affine_grid(theta[start : start + 2048], list(block.shape), align_corners=False)
        out.append(F.grid_sample(block, grid, padding_mode="border", align_corners=False))
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def learnability(embedding: np.ndarray, clusters: int) -> float:
    """Share of rows whose 10 nearest other rows' majority k-means cluster is their own."""
    kmeans = faiss.Kmeans(embedding.shape[1], clusters, niter=25, seed=1, spherical=True)
    kmeans.train(embedding)
    assigned = kmeans.index.search(embedding, 1)[1][:, 0]  # N
    neighbours = mine_neighbours(torch.from_numpy(embedding), K).numpy()  # NxK
    votes = np.zeros((len(embedding), clusters), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(embedding)), K), assigned[neighbours].ravel()), 1)
    return float((votes.argmax(1) == assigned).mean())


def top_k(queries: np.ndarray, catalogue: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """QxK rows of the catalogue nearest each query (inner product), row i itself left out if asked."""
    index = faiss.IndexFlatIP(catalogue.shape[1])
    index.add(catalogue)
    rows = index.search(queries, K + 1)[1]  # Qx(K+1)
    if not exclude_self:
        return rows[:, :K]
    return np.stack([row[row != i][:K] for i, row in enumerate(rows)])


def mutual_rate(queries: np.ndarray, catalogue: np.ndarray) -> float:
    results = top_k(queries, catalogue)  # QxK into the catalogue
    back = top_k(catalogue, queries)  # CxK into the queries
    own = np.arange(len(queries))[:, None, None]
    return float((back[results] == own).any(axis=2).mean())


def stability(catalogue: np.ndarray, copies: np.ndarray) -> float:
    mine = top_k(catalogue, catalogue, exclude_self=True)  # CxK
    theirs = top_k(copies, catalogue, exclude_self=True)  # CxK, the original left out
    common = np.array([len(np.intersect1d(a, b)) for a, b in zip(mine, theirs, strict=True)])
    return float((common / (2 * K - common)).mean())


def effective_rank(embedding: np.ndarray) -> float:
    singular = np.linalg.svd(embedding.astype(np.float64), compute_uv=False)
    p = singular / singular.sum() + 1e-12
    return math.exp(-(p * np.log(p)).sum()) / embedding.shape[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", help="encoder file (ResNet backbone)")
    parser.add_argument("--data", required=True, help="the catalogue searched (a labelled set)")
    parser.add_argument("--train-data", required=True, help="queries (seeded) and the whitening fit")
    parser.add_argument("--size", type=int, help="embedding side (default: the encoder's)")
    args = parser.parse_args(argv)
    encoder = Encoder.load(args.encoder)
    size = args.size or encoder.input_size
    catalogue = load_dataset(args.data, size, in_channels=encoder.in_channels)
    memory = load_dataset(args.train_data, size, in_channels=encoder.in_channels)
    queries, fit = memory.subset(1000, seed=0), memory.subset(min(10_000, len(memory)), seed=1)
    views = {
        name: stage_views(encoder, images, SHIFTS[:1])
        for name, images in (
            ("fit", fit.images),
            ("queries", queries.images),
            ("catalogue", catalogue.images),
            ("moved", moved(catalogue.images)),
        )
    }
    whitenings = {name: Whitening.fitted(views["fit"][name], 0.5) for name in STAGES}
    pixels = pixel_embedding(catalogue.images)
    pixel_rows = mine_neighbours(pixels, 100)
    catalogue_labels, query_labels = catalogue.labels.numpy(), queries.labels.numpy()
    print(f"{args.encoder} at {size} px, catalogue {args.data}, queries {args.train_data}")
    learnable = [f"learnable K={c}" for c in CLUSTERS]
    columns = ["plain", "expanded", *learnable, "mutual", "stable", "pixels", "rank"]
    print("| embedding | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for share in LAYER3_SHARES:
        c, q, m = (combined(views[part], whitenings, share) for part in ("catalogue", "queries", "moved"))
        scores = [precision_at_10(c, q, catalogue_labels, query_labels, e) for e in (0, EXPAND)]
        scores += [learnability(c, clusters) for clusters in CLUSTERS]
        scores.append(mutual_rate(q, c))
        scores.append(stability(c, m))
        neighbours = mine_neighbours(torch.from_numpy(c), K)
        scores.append(float(agreement_mask(neighbours, pixel_rows).float().mean()))
        scores.append(effective_rank(c))
        name = f"layer3 3x3 ({share:.2f}) + layer4 2x2" if share else "layer4 2x2"
        print(f"| {name} | " + " | ".join(f"{s:.4f}" for s in scores) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
