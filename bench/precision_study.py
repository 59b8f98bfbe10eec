"""What the retrieval side can add to precision@10 without retraining. One encoder's whitened
embedding (as the service searches it), then the classic additions of image retrieval, each scored
as `bench/demo_precision.py` scores the demo: 1000 seeded images of the memory set search the
catalogue (the query set), precision@10 = the share of the top 10 with the query's class.

- alpha-QE: the query is replaced by itself plus its top n results weighted by score^alpha
  (Radenovic et al. 2018, alpha = 3): a second search per query.
- DBA: each catalogue vector is replaced by the same weighted mean over its own top n (Arandjelovic
  & Zisserman 2012): done once at index time.
- flip-averaged: the embedding of an image and of its mirror image, summed (query and catalogue).
- diffusion: scores spread over the catalogue's kNN graph (Iscen et al. 2017; graph k=20,
  weights s^3, alpha 0.95, 20 iterations, the query's top 50 as the seed).
- other stages: layer3 pooled to 3x3 and layer4 unpooled instead of layer4's 2x2 grid
  (`bench/embedding_views.py`), whitened the same way.
- CSLS (Lample et al. 2018): each catalogue item's score lowered by beta times its mean cosine to
  its own 10 nearest catalogue items (a hubness correction; a per-item bias at index time).
- a pixel channel: the embedding beside w times the raw pixels PCA-whitened (64 directions, power
  0.5, fitted on the same 10k memory images), each unit length.
- `--with ENCODER ...`: a committee, the whitened embeddings of the encoders side by side, each
  unit length; each row also gives the purity of the 10k fit images' top 10 among themselves.

The whitening (power 0.5) is fitted without labels on 10k seeded memory images, as
`python -m training.whiten` does; an encoder that is already whitened is studied on its features
before the whitening.

    python bench/precision_study.py service/assets/demo-encoder.pt --data fashion-mnist:test \
        --train-data fashion-mnist
    python bench/precision_study.py runs/glyph8/simclr/encoder.pt --data folder:/tmp/glyphs/test \
        --train-data folder:/tmp/glyphs/train
    python bench/precision_study.py service/assets/demo-encoder.pt --data fashion-mnist:test \
        --train-data fashion-mnist --with runs/nnclr-long/nnclr/encoder.pt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.embedding_views import views  # noqa: E402
from bench.whitening_study import features  # noqa: E402
from training.data.datasets import load_dataset  # noqa: E402
from training.encoder import Encoder, read_encoder_record  # noqa: E402
from training.models.whitening import Whitening  # noqa: E402

POWER = 0.5
PIXEL_DIMS = 64  # principal directions of the pixel channel
ALPHA = 3.0  # alpha-QE's and DBA's score exponent (Radenovic et al.)


def weighted_mean_of_top(
    vectors: torch.Tensor, scores: torch.Tensor, neighbours: torch.Tensor, n: int
) -> torch.Tensor:
    """L2-normalised sum of each row's top-n `vectors`, weighted by score^ALPHA: BxD."""
    weights = scores[:, :n].clamp(min=0) ** ALPHA  # Bxn
    return F.normalize((weights.unsqueeze(2) * vectors[neighbours[:, :n]]).sum(1), dim=1)


def alpha_qe(queries: torch.Tensor, catalogue: torch.Tensor, n: int) -> torch.Tensor:
    """QxD expanded queries: the query (weight 1) plus its top-n results weighted by score^ALPHA."""
    scores, neighbours = (queries @ catalogue.T).topk(n, dim=1)
    weights = scores.clamp(min=0) ** ALPHA  # Qxn
    return F.normalize(queries + (weights.unsqueeze(2) * catalogue[neighbours]).sum(1), dim=1)


def database_augmented(catalogue: torch.Tensor, n: int) -> torch.Tensor:
    """NxD: each catalogue vector replaced by the weighted mean of its top n (itself first)."""
    scores, neighbours = (catalogue @ catalogue.T).topk(n, dim=1)
    return weighted_mean_of_top(catalogue, scores, neighbours, n)


def diffusion_scores(
    queries: torch.Tensor, catalogue: torch.Tensor, graph_k: int = 20, seeds: int = 50, alpha: float = 0.95
) -> torch.Tensor:
    """QxN ranking scores: f = alpha S f + (1 - alpha) y iterated, S the symmetrically normalised
    kNN graph of the catalogue (weights s^3), y the query's top `seeds` similarities cubed."""
    n = catalogue.shape[0]
    scores, neighbours = (catalogue @ catalogue.T).topk(graph_k + 1, dim=1)  # Nx(k+1), self first
    rows = torch.arange(n).unsqueeze(1).expand_as(neighbours)
    edges = torch.stack([rows.flatten(), neighbours.flatten()])
    graph = torch.sparse_coo_tensor(edges, scores.clamp(min=0).flatten() ** 3, (n, n)).coalesce()
    graph = (graph + graph.t()).coalesce()  # symmetric
    degree = torch.sparse.sum(graph, dim=1).to_dense().clamp(min=1e-12).rsqrt()
    index = graph.indices()
    values = graph.values() * degree[index[0]] * degree[index[1]]
    transition = torch.sparse_coo_tensor(index, values, (n, n)).coalesce()
    direct = queries @ catalogue.T  # QxN
    top, where = direct.topk(seeds, dim=1)
    seed = torch.zeros_like(direct).scatter_(1, where, top.clamp(min=0) ** 3)
    f = seed.clone()
    for _ in range(20):
        f = alpha * torch.sparse.mm(transition, f.T).T + (1 - alpha) * seed
    return f + 1e-6 * direct  # the direct score orders what the diffusion does not reach


def csls_scores(queries: torch.Tensor, catalogue: torch.Tensor, beta: float, k: int = 10) -> torch.Tensor:
    """QxN cosines less beta x each catalogue item's mean cosine to its own k nearest items."""
    own = catalogue @ catalogue.T  # NxN
    own.fill_diagonal_(-2.0)
    return queries @ catalogue.T - beta * own.topk(k, dim=1).values.mean(1)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """NxP: the raw pixels, flattened and unit length."""
    return F.normalize(images.flatten(1).float(), dim=1)


def side_by_side(*parts: torch.Tensor) -> torch.Tensor:
    """NxD: the parts concatenated, unit length (a part's weight is its norm)."""
    return F.normalize(torch.cat(parts, dim=1), dim=1)


def top10_purity(vectors: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of each row's 10 nearest other rows with its label (the labels only score)."""
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(-2.0)
    found = similarity.topk(10, dim=1).indices
    return (labels[found] == labels.unsqueeze(1)).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", help="encoder file")
    parser.add_argument("--data", required=True, help="the catalogue searched (a labelled set)")
    parser.add_argument("--train-data", required=True, help="queries (seeded) and the whitening fit")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--with", dest="others", nargs="+", default=[], help="encoders for committee rows")
    args = parser.parse_args(argv)
    record = read_encoder_record(args.encoder)
    size, channels = record["input_size"], record["in_channels"]
    catalogue = load_dataset(args.data, size, in_channels=channels)
    memory = load_dataset(args.train_data, size, in_channels=channels)
    queries = memory.subset(args.queries, seed=0)
    fit = memory.subset(min(10_000, len(memory)), seed=1)

    def precision(query_x: torch.Tensor, catalogue_x: torch.Tensor | None = None, scores=None) -> float:
        scores = query_x @ catalogue_x.T if scores is None else scores
        found = scores.topk(10, dim=1).indices
        return (catalogue.labels[found] == queries.labels.unsqueeze(1)).float().mean().item()

    def whitened_by(fit_x: torch.Tensor, dims: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        whitening = Whitening.fitted(fit_x, POWER, out_dim=dims)
        return lambda x: F.normalize(whitening(x), dim=1)

    def flip_averaged(images: torch.Tensor) -> torch.Tensor:
        return F.normalize(features(record, images) + features(record, images.flip(-1)), dim=1)

    whiten = whitened_by(features(record, fit.images))
    q, c = whiten(features(record, queries.images)), whiten(features(record, catalogue.images))
    rows: list[tuple[str, float, str]] = [
        ("whitened embedding (as the service searches)", precision(q, c), "")
    ]
    for n in (1, 2, 5):
        rows.append((f"+ alpha-QE, top {n}", precision(alpha_qe(q, c, n), c), "a second search"))
    for n in (2, 5):
        rows.append((f"+ DBA, top {n}", precision(q, database_augmented(c, n)), "at index time"))
    expanded_dba = database_augmented(c, 5)
    rows.append(("+ DBA top 5 and alpha-QE top 5", precision(alpha_qe(q, expanded_dba, 5), expanded_dba), ""))
    rows.append(("+ diffusion", precision(q, scores=diffusion_scores(q, c)), "a graph walk per query"))
    flip_whiten = whitened_by(flip_averaged(fit.images))
    flipped = precision(
        flip_whiten(flip_averaged(queries.images)), flip_whiten(flip_averaged(catalogue.images))
    )
    rows.append(("flip-averaged embedding, whitened", flipped, "2x the embedding"))
    encoder = Encoder(record)
    stage_views = {
        name: views(encoder, s.images) for name, s in (("q", queries), ("c", catalogue), ("f", fit))
    }
    for view in ("layer4 2x2", "layer3 3x3", "layer4 unpooled"):
        stage_whiten = whitened_by(stage_views["f"][view])
        score = precision(stage_whiten(stage_views["q"][view]), stage_whiten(stage_views["c"][view]))
        rows.append((f"{view} of the backbone, whitened", score, f"{stage_views['q'][view].shape[1]}-d"))
    # Pooled multi-stage features: layer3's 3x3 and layer4's 2x2 grid, each whitened on its own and
    # unit length, side by side (each stage then weighs the same in the cosine).
    stages = ("layer3 3x3", "layer4 2x2")
    stage_whitenings = {view: whitened_by(stage_views["f"][view]) for view in stages}

    def multi_stage(part: str) -> torch.Tensor:
        return F.normalize(
            torch.cat([stage_whitenings[v](stage_views[part][v]) for v in stages], dim=1), dim=1
        )

    rows.append(
        ("layer3 3x3 + layer4 2x2, each whitened", precision(multi_stage("q"), multi_stage("c")), "2 stages")
    )
    for beta in (0.25, 0.5):
        rows.append((f"CSLS, beta {beta}", precision(q, scores=csls_scores(q, c, beta)), "a bias per item"))
    pixel_channel = whitened_by(pixels(fit.images), dims=PIXEL_DIMS)
    for weight in (0.5, 0.75, 1.0):
        beside = precision(
            side_by_side(q, weight * pixel_channel(pixels(queries.images))),
            side_by_side(c, weight * pixel_channel(pixels(catalogue.images))),
        )
        rows.append((f"+ pixels, w {weight}", beside, f"+{PIXEL_DIMS}-d"))
    if args.others:
        parts = {args.encoder: {"q": q, "c": c, "f": whiten(features(record, fit.images))}}
        for other in args.others:
            other_record = read_encoder_record(other)
            other_whiten = whitened_by(features(other_record, fit.images))
            parts[other] = {
                name: other_whiten(features(other_record, s.images))
                for name, s in (("q", queries), ("c", catalogue), ("f", fit))
            }
        committees = [[args.encoder], *([args.encoder, o] for o in args.others)]
        committees += [list(parts)] if len(args.others) > 1 else []
        for members in committees:
            joined = {k: side_by_side(*(parts[m][k] for m in members)) for k in ("q", "c", "f")}
            names = " + ".join(f"{Path(m).parent.name}/{Path(m).name}" for m in members)
            purity = top10_purity(joined["f"], fit.labels)
            rows.append((f"committee {names}", precision(joined["q"], joined["c"]), f"purity {purity:.3f}"))
    searched = f"catalogue {catalogue.name} ({len(catalogue)}), {len(queries)} queries from {memory.name}"
    print(f"{args.encoder}: {searched}")
    print("| retrieval | precision@10 | cost |\n|---|---|---|")
    for name, score, cost in rows:
        print(f"| {name} | {score:.4f} | {cost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
