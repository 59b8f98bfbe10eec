"""Does whitening the retrieval embedding help, and why? One encoder, its embeddings as they are,
centred, and PCA-whitened at several powers (training.models.whitening, fitted on the memory set's
embeddings without labels), each scored by weighted kNN (k=200, tau=0.07) and by precision@10 of
1000 seeded memory images searched against the query set; then, for three of them, how spread the
neighbours' cosines are and the kNN top-1 at other vote temperatures.

    python bench/whitening_study.py service/assets/demo-encoder.pt --data fashion-mnist:test \
        --train-data fashion-mnist
    python bench/whitening_study.py runs/glyph8/simclr/encoder.pt --data folder:/tmp/glyphs/test \
        --train-data folder:/tmp/glyphs/train

`--dims 64 128 256` adds the whitening that keeps only the first D principal directions.

An encoder that is already whitened is studied on its features before the whitening; `--pixels`
studies the raw pixels (flattened, L2-normalised) instead of an encoder:

    python bench/whitening_study.py --pixels --data fashion-mnist:test --train-data fashion-mnist

`--json F` also writes the rows for `bench/plot_whitening.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.vote import weighted_vote  # noqa: E402
from training.data.datasets import load_dataset  # noqa: E402
from training.encoder import embedding_features, read_encoder_record, unwhitened_network  # noqa: E402
from training.knn_monitor import knn_accuracy  # noqa: E402
from training.models.whitening import Whitening  # noqa: E402
from training.precision import autocast_dtype  # noqa: E402

Transform = Callable[[torch.Tensor], torch.Tensor]


def features(record: dict, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised NxD features of the encoder before any whitening it has."""
    network = unwhitened_network(record)
    device = torch.device("cpu")
    out = embedding_features(
        network, images, record["mean"], record["std"], device, autocast_dtype("auto", device)
    )
    return F.normalize(out, dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", nargs="?", help="encoder file")
    parser.add_argument("--pixels", action="store_true", help="raw pixels as the embedding")
    parser.add_argument("--data", required=True, help="query set (and the precision@10 catalogue)")
    parser.add_argument("--train-data", required=True, help="memory set (whitening fitted here, no labels)")
    parser.add_argument("--queries", type=int, default=1000, help="precision@10 queries from the memory set")
    parser.add_argument(
        "--dims",
        type=int,
        nargs="*",
        default=[],
        help="also whiten keeping only the first D principal directions (powers 0.5 and 1), e.g. 64 128 256",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--name", help="the encoder's name in the JSON (default: its path)")
    args = parser.parse_args(argv)
    if args.pixels == bool(args.encoder):
        parser.error("give an encoder file or --pixels")
    record = None if args.pixels else read_encoder_record(args.encoder)
    size, channels = (28, 1) if record is None else (record["input_size"], record["in_channels"])
    queries = load_dataset(args.data, size, in_channels=channels)
    memory = load_dataset(args.train_data, size, in_channels=channels)

    def embed(images: torch.Tensor) -> torch.Tensor:
        if record is None:
            return F.normalize(images.flatten(1).float(), dim=1)
        return features(record, images)

    query_x, memory_x = embed(queries.images), embed(memory.images)
    classes = memory.num_classes
    searches = torch.randperm(len(memory), generator=torch.Generator().manual_seed(0))[: args.queries]

    def whitened(power: float, out_dim: int | None = None) -> Transform:
        whitening = Whitening.fitted(memory_x, power, out_dim)
        return lambda x: F.normalize(whitening(x), dim=1)

    variants: dict[str, Transform] = {"as is": lambda x: x}
    variants["centred"] = lambda x: F.normalize(x - memory_x.mean(0), dim=1)
    for power in (0.25, 0.5, 1.0):
        variants[f"PCA-whitened, power {power}"] = whitened(power)
    for power in (0.5, 1.0) if args.dims else ():
        for dim in args.dims:
            variants[f"PCA-whitened, power {power}, first {dim} directions"] = whitened(power, dim)
    source = args.encoder or "pixels"
    print(f"{source}: memory {memory.name} ({len(memory)}), queries {queries.name} ({len(queries)})")
    columns = ["embedding", "kNN top-1", "precision@10", "cosine to the 1st / 200th neighbour"]
    print("| " + " | ".join([*columns, "kNN top-1 at tau 0.02 / 0.2 / 1.0"]) + " |")
    print("|---|---|---|---|---|")
    rows = []
    for name, transform in variants.items():
        m, q = transform(memory_x), transform(query_x)
        top1, _ = knn_accuracy(m, memory.labels, q, queries.labels, classes)
        found = (m[searches] @ q.T).topk(10, dim=1).indices
        precision = (queries.labels[found] == memory.labels[searches].unsqueeze(1)).float().mean().item()
        similarity, neighbours = (q @ m.T).topk(200, dim=1)
        by_tau = []
        for tau in (0.02, 0.2, 1.0):
            votes = weighted_vote(similarity, memory.labels[neighbours], classes, tau)
            by_tau.append(100 * (votes.argmax(1) == queries.labels).float().mean().item())
        spread = f"{similarity[:, 0].mean():.3f} / {similarity[:, -1].mean():.3f}"
        taus = " / ".join(f"{a:.2f}%" for a in by_tau)
        print(f"| {name} | {top1:.2f}% | {precision:.4f} | {spread} | {taus} |", flush=True)
        rows.append({"embedding": name, "knn_top1": top1, "precision_at_10": precision})
    if args.json:
        study = {"encoder": args.name or args.encoder or "pixels", "memory": memory.name, "rows": rows}
        args.json.write_text(json.dumps(study, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
