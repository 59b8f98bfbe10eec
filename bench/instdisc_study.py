"""The InstDisc NCE study of bench/RESULTS.md ("InstDisc on Fashion-MNIST: NCE against the exact softmax").

    python bench/instdisc_study.py init-similarity
        mean cosine between the features a randomly initialised network gives Fashion-MNIST images
    python bench/instdisc_study.py run {paper,z-every-step,bank-from-features} -- TRAINING FLAGS
        trains `training.instdisc` with the training flags; `paper` is the command as it is, the other
        two change one thing (experiments, not options of the product):
          z-every-step        NCE's normaliser Z re-estimated on every batch instead of once
          bank-from-features  the memory bank starts from the random network's features, not random
                              unit vectors (Z is then estimated from real features)
          centred-head        BatchNorm without affine on the 128-d output before the L2 norm, so the
                              features are centred like the random bank NCE's Z was estimated from
          centred-z-every-step  both of the above
        prints the kNN top-1 per epoch (the training monitor: use --knn-every 1).

The table's rows: `run paper -- --data fashion-mnist --subset 10000 --arch resnet18 --width 0.25
--epochs 20 --knn-every 1 --knn-subset 2000` and the flags in its third column (one thread each:
OMP_NUM_THREADS=1). Per-step similarities and `nce/noise_push_weight` are in <out>/tb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.cli import build_trainer, parse_config  # noqa: E402
from training.losses.nce import estimate_normaliser  # noqa: E402
from training.methods.instdisc import InstDisc  # noqa: E402

VARIANTS = ("paper", "z-every-step", "bank-from-features", "centred-head", "centred-z-every-step")


def init_similarity(images: int = 512) -> None:
    from training.data.datasets import load_dataset
    from training.models import EmbeddingNetwork, build_backbone
    from training.models.heads import LinearHead

    torch.manual_seed(0)
    data = load_dataset("fashion-mnist", 28, subset=images, seed=1)
    batch = (data.images.float() / 255 - 0.286) / 0.353
    for width in (0.25, 1.0):
        backbone, dim = build_backbone("resnet18", in_channels=1, small_stem=True, width=width)
        network = EmbeddingNetwork(backbone, LinearHead(dim, 128)).train()  # batch statistics, as in training
        with torch.no_grad():
            features = F.normalize(network(batch), dim=1)
        similarity = (features @ features.T)[~torch.eye(images, dtype=torch.bool)]
        print(f"ResNet-18 x{width}: mean cosine between {images} images' features {similarity.mean():.3f}")


def z_every_step(method: InstDisc) -> None:
    def estimate(scores: torch.Tensor) -> None:
        method.nce_normaliser.fill_(
            estimate_normaliser(scores, method.temperature, method.memory.size).item()
        )

    method._set_normaliser_once = estimate


@torch.no_grad()
def bank_from_features(method: InstDisc, images: torch.Tensor, mean: list[float], std: list[float]) -> None:
    network = method.embedding_network()
    saved = {k: v.clone() for k, v in network.state_dict().items()}  # BN statistics stay untouched
    shape = (1, -1, 1, 1)
    mean_t, std_t = torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
    network.train()
    features = torch.cat(
        [
            F.normalize(network((images[s : s + 256].float() / 255 - mean_t) / std_t), dim=1)
            for s in range(0, len(images), 256)
        ]
    )
    network.load_state_dict(saved)
    method.memory.bank.copy_(features)
    method.memory.visited.fill_(True)


def centred_head(method: InstDisc) -> None:
    dim = method.memory.bank.shape[1]
    head = torch.nn.Sequential(method.encoder.head, torch.nn.BatchNorm1d(dim, affine=False))
    head.out_dim = dim  # what the checkpoint's encoder record reads
    method.encoder.head = head


def run(variant: str, training_argv: list[str]) -> None:
    config, _ = parse_config("instdisc", training_argv)
    trainer = build_trainer(config, torch.device(config.device if config.device != "auto" else "cpu"))
    if variant == "z-every-step":
        z_every_step(trainer.method)
    elif variant == "centred-head":
        centred_head(trainer.method)
    elif variant == "centred-z-every-step":
        centred_head(trainer.method)
        z_every_step(trainer.method)
    elif variant == "bank-from-features":
        bank_from_features(trainer.method, trainer.images.cpu(), trainer.mean, trainer.std)
    trainer.fit()
    top1 = [f"{row['knn/top1']:.1f}" for row in trainer.state.history if "knn/top1" in row]
    print(f"{variant}: kNN top-1 per monitored epoch: {' '.join(top1)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("init-similarity", "run"))
    parser.add_argument("variant", nargs="?", choices=VARIANTS, default="paper")
    parser.add_argument("training", nargs=argparse.REMAINDER, help="after --: training.instdisc flags")
    bench = parser.parse_args()
    if bench.what == "init-similarity":
        init_similarity()
    else:
        run(bench.variant, [a for a in bench.training if a != "--"])


if __name__ == "__main__":
    main()
