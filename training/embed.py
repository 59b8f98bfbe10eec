"""Embed a data set with a trained encoder into the `.npz` that `index.build` reads.

    python -m training.embed --checkpoint runs/moco/encoder.pt --data fashion-mnist --out emb.npz
    torchrun --nproc_per_node 2 -m training.embed ...   # each rank embeds a contiguous shard

Rows are in data-set order with the data set's ids, labels and class names, and the encoder's
version as model_version. Under torchrun rank 0 gathers the shards and writes the whole file.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from index.embeddings import Embeddings, save_embeddings
from training import distributed as dist
from training.commands import run_guarded
from training.data.datasets import load_dataset
from training.encoder import Encoder
from training.precision import add_inference_amp_argument


def embed_in_shards(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int = 256,
    desc: str = "embedding",
    progress: bool = True,
) -> torch.Tensor:
    """Embed uint8 NxCxHxW images on every rank; return the full NxD matrix (on every rank).

    Rank r embeds the contiguous rows [r*S, (r+1)*S) with S = ceil(N / world); the last shard is
    padded by repeating the final row so that all ranks gather equal sizes, and the padding is
    cut off again, so every row appears exactly once and in order.
    """
    total = images.shape[0]
    world, rank = dist.get_world_size(), dist.get_rank()
    shard = math.ceil(total / world)
    rows = torch.arange(rank * shard, (rank + 1) * shard).clamp(max=max(total - 1, 0))
    parts = []
    bar = tqdm(
        total=len(rows), desc=desc, unit="img", disable=not (progress and dist.is_main_process()), leave=False
    )
    for start in range(0, len(rows), batch_size):
        batch = images[rows[start : start + batch_size]]
        parts.append(embed(batch).float())  # BxD
        bar.update(batch.shape[0])
    bar.close()
    local = torch.cat(parts)  # SxD
    return dist.concat_all_gather(local)[:total]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.embed",
        description="Embed a data set with a trained encoder (encoder.pt or a training checkpoint).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="encoder.pt or checkpoint.pt from training")
    parser.add_argument("--data", required=True, help="data spec: fashion-mnist[:test] | folder:PATH")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--subset", type=int, default=None, help="embed a seeded random N images only")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_inference_amp_argument(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    device = dist.init_distributed(args.device)
    encoder = Encoder.load(args.checkpoint, device, args.amp)
    data = load_dataset(args.data, encoder.input_size, args.subset, in_channels=encoder.in_channels)
    started = time.perf_counter()
    vectors = embed_in_shards(
        lambda batch: torch.from_numpy(encoder.embed(batch, args.batch_size)),
        data.images,
        args.batch_size,
        desc=f"embedding {data.name}",
    )
    if dist.is_main_process():
        emb = Embeddings(
            vectors=vectors.cpu().numpy(),
            ids=data.ids.numpy(),
            model_version=encoder.version,
            labels=data.labels.numpy(),
            class_names=data.class_names or None,
        )
        save_embeddings(args.out, emb)
        rate = len(data) / max(time.perf_counter() - started, 1e-9)
        print(
            f"wrote {len(data)} x {emb.dim} embeddings of {data.name} ({encoder.version}) to {args.out} "
            f"at {rate:.0f} images/s"
        )
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_guarded(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
