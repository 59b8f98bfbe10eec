"""In-memory uint8 image data sets named by a `--data` spec.

Specs (a registry of prefixes; `register_source` adds more, e.g. the MongoDB catalogue):
  fashion-mnist            the 60k training split (also `fashion-mnist:train`)
  fashion-mnist:test       the 10k test split
  folder:PATH              every image under PATH (recursive); labels from first-level sub-folders
  catalogue[:MONGO_URI]    the service's catalogue; registered by service/refresh (the layer that
                           knows the service's database), so it exists in a catalogue refresh

Every data set is decoded once, resized to the crop size and kept as a uint8 NxCxSxS tensor,
so the training loop samples batches by indexing and augments them on the device.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from training.data.images import IMAGE_SUFFIXES, ImageDecodeError, load_uint8, resize_center_crop

FASHION_MNIST_ENV = "FASHION_MNIST_DIR"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DOWNLOAD_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ssl-retrieval"


class DataError(ValueError):
    """A data spec cannot be loaded (the message says why and what to do)."""


@dataclass
class ImageDataset:
    name: str
    images: torch.Tensor  # uint8 NxCxSxS
    labels: torch.Tensor  # int64 N, -1 where unknown
    ids: torch.Tensor  # int64 N, stable 64-bit ids
    class_names: list[str] = field(default_factory=list)
    skipped: int = 0  # unreadable files left out while loading

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(
                f"{self.name}: expected uint8 NxCxHxW, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (n,) or self.ids.shape != (n,):
            raise DataError(
                f"{self.name}: {n} images but labels {tuple(self.labels.shape)}, ids {tuple(self.ids.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_labelled(self) -> bool:
        return self.num_classes > 0 and bool((self.labels >= 0).any())

    def select(self, indices: torch.Tensor, name: str | None = None) -> ImageDataset:
        """A data set of the rows `indices` (in that order), sharing nothing mutable with this one."""
        return replace(
            self,
            name=name or self.name,
            images=self.images[indices].contiguous(),
            labels=self.labels[indices].clone(),
            ids=self.ids[indices].clone(),
            class_names=list(self.class_names),
        )

    def resized(self, size: int) -> ImageDataset:
        """The same images at size x size (`resize_center_crop`); this data set where they are."""
        if self.image_size == size:
            return self
        return replace(self, images=resize_center_crop(self.images, size).contiguous())

    def subset(self, count: int, seed: int = 0) -> ImageDataset:
        """A seeded random `count` rows, kept in data-set order (all rows when count >= N)."""
        if count <= 0:
            raise DataError(f"subset size must be positive, got {count}")
        if count >= len(self):
            return self
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(self), generator=generator)[:count].sort().values
        return self.select(chosen, name=f"{self.name}[{count}]")


# A loader gets the text after the prefix (e.g. "test" or a path) and the crop size.
Loader = Callable[[str, int], ImageDataset]
SOURCES: dict[str, Loader] = {}


def register_source(prefix: str) -> Callable[[Loader], Loader]:
    """Decorator: make `prefix[:rest]` a valid `--data` spec handled by the decorated loader."""

    def decorate(loader: Loader) -> Loader:
        SOURCES[prefix] = loader
        return loader

    return decorate


def load_dataset(
    spec: str,
    crop_size: int,
    subset: int | None = None,
    seed: int = 0,
    in_channels: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ImageDataset:
    """Load a `--data` spec (see the module docstring); `subset` keeps a seeded random part;
    `in_channels` converts (RGB <-> grey) to what an encoder expects; `workers` decoding threads
    for the sources that decode files, whose progress bar `progress` turns off (--no-progress)."""
    prefix, _, rest = spec.partition(":")
    if prefix not in SOURCES:
        known = ", ".join(f"{p}[:...]" for p in sorted(SOURCES))
        raise DataError(f"unknown data spec {spec!r}; expected one of: {known}")
    if crop_size <= 0:
        raise DataError(f"crop size must be positive, got {crop_size}")
    loader = SOURCES[prefix]
    accepted = inspect.signature(loader).parameters
    options: dict[str, Any] = {"workers": workers} if workers and "workers" in accepted else {}
    if "progress" in accepted:
        options["progress"] = progress
    dataset = loader(rest, crop_size, **options)
    if in_channels is not None and in_channels != dataset.in_channels:
        dataset = replace(dataset, images=convert_channels(dataset.images, in_channels))
    return dataset.subset(subset, seed) if subset else dataset


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 NxCxHxW grey <-> RGB: grey is repeated; RGB becomes luma with PIL's ITU-R 601-2 weights."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if images.shape[1] == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")


def stable_id(text: str) -> int:
    """A non-negative 63-bit id from a string (FAISS reserves -1, so the sign bit stays clear)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


# --- Fashion-MNIST -------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes: labels N, or images NxHxW."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def _fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images NxHxW uint8, labels N) from the Debian files, else torchvision's download."""
    return _fashion_mnist_from(Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR)), split)


@functools.lru_cache(maxsize=4)  # read-only arrays: the training set and its kNN test split load once
def _fashion_mnist_from(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    if images_path.is_file() and labels_path.is_file():
        return _read_idx(images_path), _read_idx(labels_path)
    try:
        from torchvision.datasets import FashionMNIST

        data = FashionMNIST(str(DOWNLOAD_ROOT), train=split == "train", download=True)
        return data.data.numpy(), data.targets.numpy()
    except Exception as exc:  # no network, proxy, disk full...: say what to install instead
        raise DataError(
            f"Fashion-MNIST not found in {directory} and the torchvision download failed ({exc}); "
            f"install it with `sudo apt-get install dataset-fashion-mnist` or set {FASHION_MNIST_ENV}"
        ) from exc


FASHION_MNIST_SIZE = 28  # native side of its images


@register_source("fashion-mnist")
def load_fashion_mnist(split: str, crop_size: int) -> ImageDataset:
    split = split or "train"
    if split not in ("train", "test"):
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use fashion-mnist or fashion-mnist:test")
    images, labels = _fashion_mnist_arrays(split)
    tensor = torch.from_numpy(images.copy()).unsqueeze(1)  # Nx1x28x28
    if crop_size != tensor.shape[-1]:
        tensor = resize_center_crop(tensor, crop_size).contiguous()
    return ImageDataset(
        name=f"fashion-mnist:{split}",
        images=tensor,
        labels=torch.from_numpy(labels.astype(np.int64)),
        ids=torch.arange(len(labels), dtype=torch.int64),
        class_names=list(FASHION_MNIST_CLASSES),
    )


# --- Image folders -------------------------------------------------------------------------------


def _decode_or_none(path: Path, crop_size: int) -> torch.Tensor | None:
    try:
        return load_uint8(path, 3, crop_size)
    except (ImageDecodeError, OSError):
        return None


@register_source("folder")
def load_folder(path_text: str, crop_size: int, workers: int = 4, progress: bool = True) -> ImageDataset:
    root = Path(path_text).expanduser()
    if not path_text or not root.is_dir():
        raise DataError(f"folder:{path_text}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"folder:{path_text}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    relative = [p.relative_to(root) for p in files]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes with the GIL released
        decoded = list(
            tqdm(
                pool.map(lambda p: _decode_or_none(p, crop_size), files),
                total=len(files),
                desc=f"decoding {root.name}",
                unit="img",
                disable=not progress or len(files) < 1000,
            )
        )
    kept = [i for i, image in enumerate(decoded) if image is not None]
    skipped = len(files) - len(kept)
    if skipped:
        examples = ", ".join(str(relative[i]) for i, im in enumerate(decoded) if im is None)
        warnings.warn(
            f"folder:{path_text}: skipped {skipped} unreadable image file(s): {examples[:300]}", stacklevel=2
        )
    if not kept:
        raise DataError(f"folder:{path_text}: none of the {len(files)} image files could be decoded")
    # Labels come from the first-level sub-folder; images directly under root are unlabelled.
    folders = [relative[i].parts[0] if len(relative[i].parts) > 1 else None for i in kept]
    class_names = sorted({f for f in folders if f is not None})
    class_index = {name: i for i, name in enumerate(class_names)}
    return ImageDataset(
        name=f"folder:{root.name}",
        images=torch.stack([decoded[i] for i in kept]),
        labels=torch.tensor([class_index[f] if f is not None else -1 for f in folders], dtype=torch.int64),
        ids=torch.tensor([stable_id(relative[i].as_posix()) for i in kept], dtype=torch.int64),
        class_names=class_names,
        skipped=skipped,
    )


NATIVE_SIZE_SAMPLE = 32  # image headers read to tell a folder's native size


def native_image_size(spec: str) -> int | None:
    """The images' native side in pixels (the shorter side, median over a sample of headers), read
    before decoding so the crop size and the small-image recipe can follow the data; None when a
    source does not say (the catalogue: the refresh knows its serving model's size)."""
    prefix, _, rest = spec.partition(":")
    if prefix == "fashion-mnist":
        return FASHION_MNIST_SIZE
    if prefix != "folder":
        return None
    root = Path(rest).expanduser()
    if not rest or not root.is_dir():
        return None
    sides = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:  # reads the header only
                sides.append(min(image.size))
        except (OSError, ValueError):
            continue
        if len(sides) == NATIVE_SIZE_SAMPLE:
            break
    return int(np.median(sides)) if sides else None


def epoch_indices(num_samples: int, epoch: int, seed: int, rank: int, world: int, batch: int) -> torch.Tensor:
    """This rank's indices for an epoch as steps x batch (DistributedSampler order, drop_last).

    The permutation depends only on (seed, epoch), so a resumed run sees the same order.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    per_rank = num_samples // world
    steps = per_rank // batch
    return order[rank : per_rank * world : world][: steps * batch].view(steps, batch)


def held_out_mask(ids: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """bool N: a stable ~`fraction` of the ids, spread evenly over any id pattern.

    Catalogue ids are a counter (1, 2, 3, ...) and catalogues are uploaded class by class, so
    `id % 1000 < 100` would hold out the first 99 uploads: whole classes missing from the memory
    and the guard comparing 0% with 0%. The ids are mixed first (splitmix64's finaliser)."""
    mixed = np.asarray(ids).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash intends
        mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    mixed ^= mixed >> np.uint64(31)
    return (mixed % np.uint64(10_000)) < np.uint64(round(fraction * 10_000))


def split_held_out(dataset: ImageDataset, fraction: float = 0.1) -> tuple[ImageDataset, ImageDataset]:
    """(rest, held-out): a stable split by id, so the same image always falls on the same side.

    The held-out part takes only labelled images (it serves as kNN queries).
    """
    held = torch.from_numpy(held_out_mask(dataset.ids.numpy(), fraction)) & (dataset.labels >= 0)
    if held.all() or not held.any():
        raise DataError(
            f"{dataset.name}: too few labelled images ({len(dataset)}) to hold out a kNN test split"
        )
    rest = dataset.select(torch.nonzero(~held).squeeze(1), name=f"{dataset.name}:train")
    held_out = dataset.select(torch.nonzero(held).squeeze(1), name=f"{dataset.name}:held-out")
    return rest, held_out
