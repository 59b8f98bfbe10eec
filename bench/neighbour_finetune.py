"""Does pulling each image toward its mined neighbours lift precision@10? (issue 10, a study)

The self-supervised encoders here all end at a demo precision@10 of 0.79-0.815, and their
mistakes are neighbours of another class. SCAN (Van Gansbeke et al. 2020) and mean-shift
(Koohpayegani et al. 2021) start from a trained encoder and use its nearest neighbours as
positives, so that images the encoder already finds alike are pulled together. This study does
that to a finished encoder, without labels:

1. mine each training image's top-k neighbours in the encoder's whitened embedding (the
   retrieval space; the labels only report the neighbours' purity);
2. fine-tune the backbone with NT-Xent whose positive for an image is an augmented view of one
   of its neighbours, drawn at random each step (with probability `--neighbour-p`, else itself;
   with `--mutual` only from the neighbours that have the image among their own top k, the
   cleaner set of k-reciprocal re-ranking, Zhong et al. 2017), through a fresh projection head;
   SGD with momentum, linear warm-up and cosine decay;
3. score precision@10 before and after as `bench/demo_precision.py` does (1000 seeded training
   images search the held-out split), the whitening refitted on the fine-tuned features.

    python bench/neighbour_finetune.py service/assets/demo-encoder.pt --data fashion-mnist \
        --catalogue fashion-mnist:test --k 10 --epochs 3 --lr 0.2
    python bench/neighbour_finetune.py runs/tau/glyphs/tau0.2/encoder.pt \
        --data folder:/tmp/glyphs/train --catalogue folder:/tmp/glyphs/test --k 10 --epochs 3 --lr 0.2

`--out` keeps the fine-tuned encoder (its whitening refitted), which can be mined and fine-tuned
again: rounds, as SCAN's self-labelling repeats.

The product stage is `python -m training.neighbours --init ENCODER --data D` (the shared engine:
AMP, resume, budget, TensorBoard, torchrun); this script stays as the study's record and control,
and `--score-only` scores any encoder the same way (bench/RESULTS.md, "training.neighbours").
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.augment import build_augmentation  # noqa: E402
from training.data.datasets import ImageDataset, load_dataset  # noqa: E402
from training.encoder import (  # noqa: E402
    embedding_features,
    read_encoder_record,
    save_encoder,
    unwhitened_network,
    with_whitening,
)
from training.losses.ntxent import nt_xent  # noqa: E402
from training.methods.neighbours import mine_neighbours, mutual_mask  # noqa: E402
from training.models.heads import ProjectionHead  # noqa: E402
from training.models.whitening import Whitening  # noqa: E402

POWER = 0.5  # the whitening the service's encoders carry


def whitened_embedding(network, record: dict, fit: ImageDataset):
    """images -> unit rows in the whitened space fitted (without labels) on `fit`."""

    def features(images: torch.Tensor) -> torch.Tensor:
        return embedding_features(network, images, record["mean"], record["std"], torch.device("cpu"))

    whitening = Whitening.fitted(features(fit.images), POWER)
    return lambda images: F.normalize(whitening(features(images)), dim=1)


def precision_at_10(network, record: dict, memory: ImageDataset, catalogue: ImageDataset) -> float:
    queries = memory.subset(1000, seed=0)
    embed = whitened_embedding(network, record, memory.subset(min(10_000, len(memory)), seed=1))
    found = (embed(queries.images) @ embed(catalogue.images).T).topk(10, dim=1).indices  # Qx10
    return (catalogue.labels[found] == queries.labels.unsqueeze(1)).float().mean().item()


@torch.no_grad()
def mine_in_whitened_space(network, record: dict, memory: ImageDataset, k: int) -> torch.Tensor:
    """NxK indices of each memory image's k nearest others (whitened cosine; training's mining)."""
    embed = whitened_embedding(network, record, memory.subset(min(10_000, len(memory)), seed=1))
    return mine_neighbours(embed(memory.images), k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", help="a finished encoder file (its backbone is fine-tuned)")
    parser.add_argument("--data", required=True, help="the unlabelled training set (labels only report)")
    parser.add_argument("--catalogue", required=True, help="the held-out labelled set that is searched")
    parser.add_argument("--k", type=int, default=10, help="neighbours mined per image")
    parser.add_argument(
        "--neighbour-p", type=float, default=1.0, help="share of positives that are neighbours"
    )
    parser.add_argument(
        "--mutual", action="store_true", help="only neighbours that have the image among their own top k"
    )
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--augmentation", default="simclr-noflip", help="the small-image default's views")
    parser.add_argument(
        "--out", help="save the fine-tuned encoder here (whitening refitted), e.g. for another round"
    )
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="only print the encoder's precision@10 as this study scores it (any encoder file)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    record = read_encoder_record(args.encoder)
    size, channels = record["input_size"], record["in_channels"]
    network = unwhitened_network(record)
    memory = load_dataset(args.data, size, in_channels=channels)
    catalogue = load_dataset(args.catalogue, size, in_channels=channels)
    start = time.monotonic()
    before = precision_at_10(network, record, memory, catalogue)
    if args.score_only:
        print(f"precision@10 of {args.encoder}: {before:.4f}")
        return 0
    neighbours = mine_in_whitened_space(network, record, memory, args.k)  # NxK
    # NxK: which neighbours may be drawn (all, or the reciprocal ones); an image without any is its own
    allowed = torch.ones_like(neighbours, dtype=torch.bool)
    if args.mutual:
        allowed = mutual_mask(neighbours)
    has_any = allowed.any(dim=1)  # N
    same = memory.labels[neighbours] == memory.labels.unsqueeze(1)  # NxK
    purity = same[allowed].float().mean().item()
    drawable, without = allowed.float().sum(1).mean(), 1 - has_any.float().mean()
    print(
        f"precision@10 before: {before:.4f}; top-{args.k} neighbours' purity {purity:.4f}, "
        f"{drawable:.1f} drawable per image, {without:.3f} without any",
        flush=True,
    )
    weights = allowed.float()
    weights[~has_any, 0] = 1.0  # a placeholder draw; such images keep their own view below

    augment = build_augmentation(args.augmentation, size, channels, record["mean"], record["std"])
    with torch.no_grad():
        feature_dim = network.features(torch.zeros(2, channels, size, size)).shape[1]
    head = ProjectionHead(feature_dim, 512, 128, 2, hidden_bn=True, last_bn=False)
    optimiser = torch.optim.SGD([*network.parameters(), *head.parameters()], lr=args.lr, momentum=0.9)
    steps = max(1, int(args.epochs * len(memory) / args.batch_size))
    warmup = max(1, steps // 10)
    network.train()
    for step in range(steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimiser.param_groups:
            group["lr"] = lr
        anchors = torch.randint(0, len(memory), (args.batch_size,))
        drawn = neighbours[anchors, torch.multinomial(weights[anchors], 1).squeeze(1)]
        use = (torch.rand(args.batch_size) < args.neighbour_p) & has_any[anchors]
        positives = torch.where(use, drawn, anchors)
        z1 = head(network.features(augment(memory.images[anchors], 0)))  # BxC
        z2 = head(network.features(augment(memory.images[positives], 1)))
        loss = nt_xent(z1, z2, args.temperature, gather=False).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == steps - 1:
            print(
                f"step {step + 1}/{steps} loss {loss.item():.3f} lr {lr:.3f}",
                f"({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    network.eval()
    after = precision_at_10(network, record, memory, catalogue)
    if args.out:
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        tuned = {**record, "network": {k: v for k, v in record["network"].items() if k != "whitening"}}
        tuned["state_dict"] = state
        fit = memory.subset(min(10_000, len(memory)), seed=1)
        save_encoder(args.out, with_whitening(tuned, fit.images, POWER, amp="none"))
    elapsed = time.monotonic() - start
    print(f"precision@10 after {steps} steps: {after:.4f} ({after - before:+.4f}; {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
