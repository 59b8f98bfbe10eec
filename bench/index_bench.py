"""Index benchmark: build time, size, and queries/s at recall@10 >= target for each index type,
against exact IndexFlatIP search measured in the same run.

    python bench/index_bench.py [--n 1000000] [--dim 128] [--real E.npz] [--types flat,ivf,hnsw,ivfpq]
    python bench/index_bench.py --real --n 0    # real embeddings only: Fashion-MNIST, 70k and ~1M

Synthetic data: clustered unit vectors (index/synthetic.py). `--real` without a file: all 70k
Fashion-MNIST images embedded with the demo encoder's deploy form, and a ~1M set of the same 70k
under `--augmentations` random crops and flips each (so every image has its own augmented
neighbours, as real near-duplicates have); both cached under `--cache` (the 1M set costs minutes of
CPU). At 1M only `--types-large` are run (default: exact and auto's choice). "auto" is the type
and parameters `index.choose` picks for that size within `--max-memory`. Each approximate type is tuned
(nprobe / efSearch) to the smallest value with recall@10 >= target on held-out queries, then timed
with one thread and with all threads. Prints a table and the speed-up over exact search, and
writes the table into the index section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import index  # noqa: E402,F401  (its __init__ sets OMP_WAIT_POLICY before FAISS's OpenMP starts)

# isort: split
import faiss  # noqa: E402

from index.choose import choose_index, parse_bytes  # noqa: E402
from index.embeddings import load_embeddings  # noqa: E402
from index.factory import build_index  # noqa: E402
from index.synthetic import clustered_vectors, random_ids  # noqa: E402
from index.tune import exact_neighbours, recall_at_k, sample_queries, time_search, tune_search  # noqa: E402
from index.vectors import normalise_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION_START = "<!-- index-bench:start -->"
SECTION_END = "<!-- index-bench:end -->"
K = 10
REAL_DEFAULT = "fashion-mnist"
DEMO_ENCODER = Path(__file__).resolve().parents[1] / "service/assets/demo-encoder.pt"


def fashion_mnist_embeddings(cache: Path, augmentations: int) -> tuple[np.ndarray, np.ndarray]:
    """(70k x D embeddings of Fashion-MNIST train + test, (augmentations + 1) * 70k x D: those plus
    each image under `augmentations` seeded random crops (scale 0.5-1) and flips). Computed with the
    demo encoder's deploy form, cached per round in `cache`."""
    import torch

    from training.data.augment import crop_resize_flip, random_resized_crop_boxes
    from training.data.datasets import load_fashion_mnist
    from training.encoder import read_encoder_record
    from training.inference import InferenceEncoder, build_inference_encoder

    record = read_encoder_record(DEMO_ENCODER)
    cache.mkdir(parents=True, exist_ok=True)
    images = torch.cat([load_fashion_mnist(split, 28).images for split in ("train", "test")])  # Nx1x28x28
    encoder = None
    rounds = []
    for round_ in range(augmentations + 1):
        path = cache / f"fmnist70k-{record['version']}-view{round_}.npy"
        if not path.is_file():
            if encoder is None:
                encoder = InferenceEncoder(build_inference_encoder(record, images[-2000:]))
                print(f"embedding with the deploy form ({encoder.dtype}) into {cache}", flush=True)
            generator = torch.Generator().manual_seed(round_)
            parts = []
            started = time.perf_counter()
            for start in range(0, len(images), 4096):
                batch = images[start : start + 4096]
                if round_ > 0:  # round 0: the images themselves
                    n = batch.shape[0]
                    boxes = random_resized_crop_boxes(n, 28, 28, (0.5, 1.0), (3 / 4, 4 / 3), generator)
                    flip = torch.rand(n, generator=generator) < 0.5
                    views = crop_resize_flip(batch.float() / 255.0, boxes, flip, 28)
                    batch = (views * 255.0).round().clamp(0, 255).to(torch.uint8)
                parts.append(encoder.embed(batch))
            np.save(path, np.concatenate(parts))
            print(f"  view {round_}: {len(images) / (time.perf_counter() - started):.0f} img/s", flush=True)
        rounds.append(np.load(path))
    return normalise_rows(rounds[0]), normalise_rows(np.concatenate(rounds))


def index_bytes(built) -> int:
    """Serialized size of the FAISS index (what is written to disk and, roughly, held in memory)."""
    writer = faiss.VectorIOWriter()
    faiss.write_index(built.faiss_index, writer)
    return int(writer.data.size())


def bench_dataset(
    name: str, vectors: np.ndarray, args: argparse.Namespace, types: list[str] | None = None
) -> list[dict]:
    num_vectors, dim = vectors.shape
    ids = random_ids(num_vectors)
    query_rows = sample_queries(num_vectors, args.queries, seed=1)
    queries = vectors[query_rows]
    all_threads = faiss.omp_get_max_threads()
    print(
        f"\n== {name}: {num_vectors} x {dim}, {len(queries)} queries, recall@{K} target {args.target_recall}"
    )
    truth = exact_neighbours(vectors, ids, queries, K)
    rows = []
    for requested in types or args.types:
        index_type, params = choose_index(num_vectors, dim, parse_bytes(args.max_memory), requested)
        if index_type == "ivfpq":
            params["pq_m"] = args.pq_m or dim // 4
        started = time.perf_counter()
        built = build_index(vectors, ids, index_type, params, train_exclude=query_rows, progress=True)
        build_s = time.perf_counter() - started
        tuned = tune_search(built, queries, truth, K, args.target_recall, progress=True)
        search_params = {tuned.knob: tuned.value} if tuned.knob else None
        recall = recall_at_k(built.search(queries, K, params=search_params)[1], truth, K)
        row = {
            "data": name,
            "type": index_type if requested == index_type else f"{requested}: {index_type}",
            "params": {
                key: value for key, value in {**params, **(search_params or {})}.items() if key != "opq"
            },
            "build_s": build_s,
            "bytes_per_vector": index_bytes(built) / num_vectors,
            "recall": recall,
            "reached": tuned.reached,
            "qps_1": 1.0 / time_search(built, queries, K, search_params, threads=1),
            "qps_all": 1.0 / time_search(built, queries, K, search_params, threads=all_threads),
        }
        rows.append(row)
        print(f"   {index_type}: {row}", flush=True)
        del built
    exact = next((r for r in rows if r["type"] == "flat"), None)
    for row in rows:
        row["speedup_1"] = row["qps_1"] / exact["qps_1"] if exact else float("nan")
        row["speedup_all"] = row["qps_all"] / exact["qps_all"] if exact else float("nan")
    return rows


def table(rows: list[dict], threads: int) -> str:
    head = (
        f"| data | type | params | build s | bytes/vec | recall@{K} | q/s 1 thread | q/s {threads} threads "
        "| speed-up vs exact (1 / all threads) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        recall = f"{r['recall']:.3f}" + ("" if r["reached"] else " (target missed)")
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        lines.append(
            f"| {r['data']} | {r['type']} | {params} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} "
            f"| {recall} | {r['qps_1']:.0f} | {r['qps_all']:.0f} "
            f"| {r['speedup_1']:.1f}x / {r['speedup_all']:.1f}x |"
        )
    return "\n".join(lines)


def update_results(section_body: str) -> None:
    """Replace (or append) the index section of bench/RESULTS.md, leaving other sections alone."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    section = f"{SECTION_START}\n{section_body}\n{SECTION_END}"
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        text = before + section + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors")
    parser.add_argument("--dim", type=int, default=128, help="synthetic dimension")
    parser.add_argument("--clusters", type=int, default=1000, help="synthetic clusters")
    parser.add_argument(
        "--spread",
        default="0.6",
        help="synthetic noise, comma-separated for several data sets (larger = harder)",
    )
    parser.add_argument(
        "--real",
        nargs="?",
        const=REAL_DEFAULT,
        help="also benchmark real embeddings: a .npz from training.embed, or without a value "
        "Fashion-MNIST 70k and its ~1M augmented set, embedded with the demo encoder",
    )
    parser.add_argument("--augmentations", type=int, default=14, help="augmented views per image (14)")
    parser.add_argument("--types-large", default="flat,auto", help="index types for the ~1M real set")
    parser.add_argument("--cache", default="/tmp/ssl-retrieval-bench", help="embedding cache directory")
    parser.add_argument("--types", default="flat,ivf,hnsw,ivfpq", help="comma-separated index types")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries")
    parser.add_argument("--target-recall", type=float, default=0.95, help="recall@10 to reach")
    parser.add_argument("--max-memory", default="16G", help="budget passed to the parameter choice")
    parser.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers (default dim/4)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    args.types = [t for t in args.types.split(",") if t]
    if "flat" in args.types:  # exact first: the baseline of every ratio
        args.types.remove("flat")
    args.types.insert(0, "flat")

    started = time.perf_counter()
    rows = []
    for spread in map(float, args.spread.split(",")) if args.n > 0 else []:
        vectors, _ = clustered_vectors(args.n, args.dim, num_clusters=args.clusters, spread=spread, seed=0)
        rows += bench_dataset(f"synthetic {args.n // 1000}k x {args.dim} (spread {spread})", vectors, args)
        del vectors
    if args.real and args.real != REAL_DEFAULT:
        real = load_embeddings(args.real)
        rows += bench_dataset(
            f"real {Path(args.real).name} ({len(real)} x {real.dim})", normalise_rows(real.vectors), args
        )
    elif args.real:
        base, augmented = fashion_mnist_embeddings(Path(args.cache), args.augmentations)
        large_types = [t for t in args.types_large.split(",") if t]
        if args.augmentations > 0 and large_types:  # the large set first: the figure the goal is about
            views = args.augmentations + 1
            rows += bench_dataset(
                f"Fashion-MNIST 70k x {views} views ({len(augmented)} x {augmented.shape[1]})",
                augmented,
                args,
                types=large_types,
            )
        del augmented
        rows += bench_dataset(f"Fashion-MNIST 70k, demo encoder ({len(base)} x {base.shape[1]})", base, args)
    threads = faiss.omp_get_max_threads()
    rendered = table(rows, threads)
    best = max(
        (r for r in rows if r["type"] != "flat" and r["reached"]),
        key=lambda r: r["speedup_all"],
        default=None,
    )
    verdict = (
        f"Best at recall@{K} >= {args.target_recall}: {best['type']} on {best['data']}, "
        f"{best['speedup_all']:.1f}x exact with {threads} threads ({best['speedup_1']:.1f}x on one thread); "
        "goal >= 20x."
        if best
        else "No approximate index reached the target recall."
    )
    command = "python bench/index_bench.py " + " ".join(sys.argv[1:])
    body = io.StringIO()
    body.write("## Index (bench/index_bench.py)\n\n")
    body.write(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.machine()} machine with "
        f"{threads} CPU cores (shared with other jobs), no GPU; faiss {faiss.__version__}; "
        f"total run {time.perf_counter() - started:.0f} s.\n\n"
    )
    body.write(f"Command: `{command}`\n\n{rendered}\n\n{verdict}\n")
    print("\n" + rendered + "\n\n" + verdict)
    if not args.no_write:
        update_results(body.getvalue().rstrip("\n"))
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
