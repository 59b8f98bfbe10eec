"""Evaluate a trained encoder: weighted kNN (Wu et al. 2018: k=200, tau=0.07, cosine) and, with
`--linear`, a cheap linear probe (logistic regression on the frozen, L2-normalised features).

    python -m training.evaluate --checkpoint runs/moco-v2/encoder.pt --data fashion-mnist:test

Memory (train) set: `--train-data`, by default the Fashion-MNIST training split for Fashion-MNIST
queries, or the rest of the folder when the queries are a folder's held-out 10%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from index.vote import DEFAULT_K, DEFAULT_TAU
from training import distributed as dist
from training.commands import OneLineParser, run_guarded
from training.data.datasets import ImageDataset, load_dataset, split_held_out
from training.embed import embed_in_shards
from training.encoder import Encoder
from training.knn_monitor import knn_accuracy
from training.precision import add_inference_amp_argument


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m training.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="encoder.pt or checkpoint.pt from training")
    parser.add_argument("--data", required=True, help="query (test) set: fashion-mnist:test | folder:PATH")
    parser.add_argument("--train-data", default=None, help="memory (train) set; default: see above")
    parser.add_argument("--subset", type=int, default=None, help="at most N memory and N query images")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help=f"neighbours (paper: {DEFAULT_K})")
    parser.add_argument(
        "--tau", type=float, default=DEFAULT_TAU, help=f"vote temperature (paper: {DEFAULT_TAU})"
    )
    parser.add_argument("--linear", action="store_true", help="also fit and score a linear probe")
    parser.add_argument("--linear-epochs", type=int, default=30, help="linear probe epochs (default: 30)")
    parser.add_argument("--batch-size", type=int, default=256, help="embedding batch (default: 256)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    add_inference_amp_argument(parser)
    parser.add_argument(
        "--json", type=Path, default=None, help="results file; default: next to the checkpoint"
    )
    args = parser.parse_args(argv)
    if args.k <= 0 or args.tau <= 0 or args.linear_epochs <= 0:
        parser.error("--k, --tau and --linear-epochs must be positive")
    return args


def memory_and_queries(
    args: argparse.Namespace, size: int, channels: int
) -> tuple[ImageDataset, ImageDataset]:
    queries = load_dataset(args.data, size, in_channels=channels)
    if args.train_data:
        memory = load_dataset(args.train_data, size, in_channels=channels)
    elif args.data.startswith("fashion-mnist"):
        memory = load_dataset("fashion-mnist", size)
    else:
        memory, queries = split_held_out(queries)
    memory = memory.select((memory.labels >= 0).nonzero().squeeze(1))
    if not memory.is_labelled or not queries.is_labelled:
        raise ValueError("kNN evaluation needs labelled memory and query images (sub-folder names)")
    if memory.class_names != queries.class_names:
        raise ValueError(
            f"memory classes {memory.class_names} differ from query classes {queries.class_names}"
        )
    if args.subset:
        memory, queries = memory.subset(args.subset), queries.subset(args.subset)
    return memory, queries


def linear_probe(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
    num_classes: int, epochs: int, seed: int = 0,
) -> tuple[float, float]:  # fmt: skip
    """(top-1, top-5) % of multinomial logistic regression on standardised frozen features."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    train, test = (train - mean) / std, (test - mean) / std  # NxD
    keep = train_labels >= 0
    train, train_labels = train[keep], train_labels[keep]
    classifier = nn.Linear(train.shape[1], num_classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-5)
    steps_per_epoch = max(1, train.shape[0] // 256)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", leave=False):
        order = torch.randperm(train.shape[0], generator=generator)
        for batch in order.tensor_split(steps_per_epoch):
            loss = F.cross_entropy(classifier(train[batch]), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        ranked = classifier(test).topk(min(5, num_classes), dim=1).indices
    labelled = test_labels >= 0
    truth = test_labels[labelled].unsqueeze(1)
    ranked = ranked[labelled]
    return 100.0 * float((ranked[:, :1] == truth).float().mean()), 100.0 * float(
        (ranked == truth).any(1).float().mean()
    )


def run(args: argparse.Namespace) -> int:
    device = dist.init_distributed(args.device)
    encoder = Encoder.load(args.checkpoint, device, args.amp)
    memory, queries = memory_and_queries(args, encoder.input_size, encoder.in_channels)
    started = time.perf_counter()

    def embed(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(encoder.embed(batch, args.batch_size))

    memory_features = embed_in_shards(embed, memory.images, args.batch_size, desc="embedding memory")
    query_features = embed_in_shards(embed, queries.images, args.batch_size, desc="embedding queries")
    embed_seconds = time.perf_counter() - started
    results = {
        "checkpoint": str(args.checkpoint),
        "encoder_version": encoder.version,
        "memory": memory.name,
        "queries": queries.name,
        "memory_size": len(memory),
        "query_size": len(queries),
        "k": args.k,
        "tau": args.tau,
        "images_per_s": (len(memory) + len(queries)) / max(embed_seconds, 1e-9),
    }
    top1, top5 = knn_accuracy(
        memory_features, memory.labels, query_features, queries.labels, memory.num_classes, args.k, args.tau
    )
    results.update({"knn/top1": top1, "knn/top5": top5})
    if args.linear:
        top1, top5 = linear_probe(
            memory_features,
            memory.labels,
            query_features,
            queries.labels,
            memory.num_classes,
            args.linear_epochs,
        )
        results.update({"linear/top1": top1, "linear/top5": top5})
    if dist.is_main_process():
        path = args.json or Path(args.checkpoint).with_name("evaluation.json")
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(format_table(results))
        print(f"results written to {path}")
    return 0


def format_table(results: dict) -> str:
    rows = [
        ("encoder", results["encoder_version"]),
        ("memory", f"{results['memory']} ({results['memory_size']})"),
    ]
    rows.append(("queries", f"{results['queries']} ({results['query_size']})"))
    for name in ("knn", "linear"):
        if f"{name}/top1" in results:
            label = (
                f"weighted kNN (k={results['k']}, tau={results['tau']})" if name == "knn" else "linear probe"
            )
            rows.append(
                (label, f"top-1 {results[f'{name}/top1']:6.2f}%   top-5 {results[f'{name}/top5']:6.2f}%")
            )
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def main(argv: list[str] | None = None) -> int:
    return run_guarded(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
