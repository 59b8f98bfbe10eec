"""Query expansion beside other retrieval-side levers, on one encoder: precision@10 of the last
stage's 2x2 grid (what the service searches) against layer3 3x3 + layer4 2x2 (each whitened) and
against the mean of 5 copies shifted by 0 or 1 px (edges replicated), each plain and with alpha
query expansion over the top 5 through the service's `SearchIndex`. Each embedding is whitened
(power 0.5) on 10k seeded memory images; 1000 seeded memory images search the catalogue, as
`bench/demo_precision.py` does. `--mining` adds the purity of each memory image's top 10 among the
whole memory set, mined in the embedding, among expanded vectors (each image replaced by its own
alpha-expanded query over its top 5) and in the mean of the 5 shifted copies (whitened on the same 10k
images), also where the raw pixels' top 100 agree (as
`training.neighbours --agree-pixels 100` draws them). `--dba` adds database-side augmentation
(alpha-DBA, Radenovic et al. 2018): every catalogue vector replaced by its own alpha-expanded query
over its top n catalogue neighbours before the search, queries unchanged.

    python bench/expansion_study.py service/assets/demo-encoder.pt --data fashion-mnist:test \
        --train-data fashion-mnist [--mining] [--dba]
    python bench/expansion_study.py runs/g/glyphs-nb1/encoder.pt --data folder:/tmp/glyphs/test \
        --train-data folder:/tmp/glyphs/train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.embedding_views import views  # noqa: E402
from index.expansion import alpha_expanded  # noqa: E402
from index.search_index import SearchIndex  # noqa: E402
from training.data.datasets import load_dataset  # noqa: E402
from training.encoder import Encoder  # noqa: E402
from training.methods.neighbours import (  # noqa: E402
    MINING_BLOCK,
    agreement_mask,
    mine_neighbours,
    pixel_embedding,
)
from training.models.whitening import Whitening  # noqa: E402

EXPAND = 5
SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
STAGES = ("layer4 2x2", "layer3 3x3")
DBA_SIZES = (2, 5, 10)


def shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """NxCxSxS: the images moved by (dx, dy) pixels, edges replicated."""
    size = images.shape[-1]
    padded = F.pad(images.float(), (1, 1, 1, 1), mode="replicate").to(images.dtype)
    return padded[:, :, 1 + dy : 1 + dy + size, 1 + dx : 1 + dx + size]


def stage_views(encoder: Encoder, images: torch.Tensor, shifts) -> dict[str, torch.Tensor]:
    """Each stage's unit view, averaged over the shifted copies."""
    total: dict[str, torch.Tensor] = {}
    for dx, dy in shifts:
        for name, view in views(encoder, shifted(images, dx, dy)).items():
            if name in STAGES:
                total[name] = total.get(name, 0) + view
    return {name: F.normalize(view, dim=1) for name, view in total.items()}


def whitened(
    part: dict[str, torch.Tensor], names: tuple[str, ...], whitenings: dict[str, Whitening]
) -> np.ndarray:
    """NxD: the named stages, each whitened and unit length, side by side, unit length."""
    stages = [F.normalize(whitenings[name](part[name]), dim=1) for name in names]
    return F.normalize(torch.cat(stages, dim=1), dim=1).numpy()


def precision_at_10(catalogue: np.ndarray, queries: np.ndarray, catalogue_labels, query_labels, expand):
    index = SearchIndex.empty_flat(catalogue.shape[1])
    index.add(catalogue, np.arange(len(catalogue), dtype=np.int64))
    rows = index.search(queries, 10, expand=expand)[1]  # Qx10
    return float((catalogue_labels[rows] == query_labels[:, None]).mean())


@torch.no_grad()
def expanded_rows(embeddings: torch.Tensor, n: int = EXPAND) -> torch.Tensor:
    """NxD: each row replaced by its alpha-expanded query over its top n other rows
    (`index.expansion.alpha_expanded`, the service's formula)."""
    out = []
    for start in range(0, len(embeddings), MINING_BLOCK):
        block = embeddings[start : start + MINING_BLOCK]  # BxD
        similarity = block @ embeddings.T  # BxN
        similarity[torch.arange(len(block)), torch.arange(start, start + len(block))] = -float("inf")
        scores, rows = similarity.topk(n, dim=1)  # Bxn, not itself
        valid = np.ones(tuple(rows.shape), dtype=bool)
        out.append(
            torch.from_numpy(alpha_expanded(block.numpy(), scores.numpy(), embeddings[rows].numpy(), valid))
        )
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", help="encoder file (ResNet backbone)")
    parser.add_argument("--data", required=True, help="the catalogue searched (a labelled set)")
    parser.add_argument("--train-data", required=True, help="queries (seeded) and the whitening fit")
    parser.add_argument("--mining", action="store_true", help="also the purity of mined top-10 neighbours")
    parser.add_argument("--dba", action="store_true", help="also alpha-DBA of the catalogue (top 2, 5, 10)")
    args = parser.parse_args(argv)
    encoder = Encoder.load(args.encoder)
    size, channels = encoder.input_size, encoder.in_channels
    catalogue = load_dataset(args.data, size, in_channels=channels)
    memory = load_dataset(args.train_data, size, in_channels=channels)
    queries = memory.subset(1000, seed=0)
    fit = memory.subset(min(10_000, len(memory)), seed=1)
    catalogue_labels, query_labels = catalogue.labels.numpy(), queries.labels.numpy()
    print("| embedding | dims | plain | expanded (top 5) |\n|---|---:|---:|---:|")
    shifted_whitenings: dict[str, Whitening] = {}  # fitted on the shifted mean: --mining uses them too
    for shift_name, shifts in (("", SHIFTS[:1]), (", mean of 5 shifts", SHIFTS)):
        fit_v, query_v, catalogue_v = (
            stage_views(encoder, s.images, shifts) for s in (fit, queries, catalogue)
        )
        whitenings = {name: Whitening.fitted(fit_v[name], 0.5) for name in STAGES}
        if shifts is SHIFTS:
            shifted_whitenings = whitenings
        for names in (("layer4 2x2",), ("layer3 3x3", "layer4 2x2")):
            c, q = whitened(catalogue_v, names, whitenings), whitened(query_v, names, whitenings)
            plain, expanded = (precision_at_10(c, q, catalogue_labels, query_labels, e) for e in (0, EXPAND))
            print(f"| {' + '.join(names)}{shift_name} | {c.shape[1]} | {plain:.4f} | {expanded:.4f} |")
            if args.dba and not shift_name and names == ("layer4 2x2",):
                for n in DBA_SIZES:
                    augmented = expanded_rows(torch.from_numpy(c), n).numpy()  # NxD, catalogue side only
                    plain, expanded = (
                        precision_at_10(augmented, q, catalogue_labels, query_labels, e) for e in (0, EXPAND)
                    )
                    row = f"layer4 2x2, alpha-DBA over the top {n}"
                    print(f"| {row} | {c.shape[1]} | {plain:.4f} | {expanded:.4f} |")
    if args.mining:
        labels = memory.labels
        embeddings = torch.from_numpy(encoder.embed(memory.images))
        pixels = mine_neighbours(pixel_embedding(memory.images), 100)
        print("\n| mined with | top-10 purity | where the pixels' top 100 agree |\n|---|---:|---:|")
        shifted_views = stage_views(encoder, memory.images, SHIFTS)
        shifted_mean = whitened(shifted_views, ("layer4 2x2",), shifted_whitenings)
        for name, rows in (
            ("the embedding", embeddings),
            ("expanded vectors", expanded_rows(embeddings)),
            ("the mean of 5 shifted copies", torch.from_numpy(shifted_mean)),
        ):
            neighbours = mine_neighbours(rows, 10)
            same = labels[neighbours] == labels.view(-1, 1)
            agree = agreement_mask(neighbours, pixels)
            print(f"| {name} | {same.float().mean():.4f} | {(same & agree).sum() / agree.sum():.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
