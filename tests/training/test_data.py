"""`--data` specs: Fashion-MNIST (Debian IDX files), image folders, subsets and the held-out split."""

from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import datasets
from training.data.datasets import (
    SOURCES,
    DataError,
    ImageDataset,
    convert_channels,
    load_dataset,
    register_source,
    split_held_out,
    stable_id,
)
from training.data.images import resize_center_crop


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_folder(root: Path) -> dict[str, tuple[int, int]]:
    """Two classes of RGB images in different sizes and formats, one unlabelled image at the top."""
    rng = np.random.default_rng(0)
    sizes = {
        "cats/a.png": (40, 30),
        "cats/deep/b.jpg": (64, 64),
        "dogs/c.png": (17, 90),
        "loose.png": (20, 20),
    }
    for relative, (w, h) in sizes.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    (root / "dogs" / "notes.txt").write_text("not an image, ignored silently")
    return sizes


def test_fashion_mnist_train_and_test_splits():
    train = load_dataset("fashion-mnist", 28)
    test = load_dataset("fashion-mnist:test", 28)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(train.ids, torch.arange(60000)) and train.labels.dtype == torch.int64
    assert sorted(train.labels.unique().tolist()) == list(range(10)) and len(train.class_names) == 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # the published class balance
    assert 60 < train.images.float().mean() < 80  # real clothing pixels (mean ~72.9), not noise
    assert load_dataset("fashion-mnist:train", 32).images.shape[-2:] == (32, 32)


def test_fashion_mnist_reads_the_idx_files_named_by_the_environment(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 251
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 0, 9]))
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))
    data = load_dataset("fashion-mnist:test", 28)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert data.labels.tolist() == [4, 0, 9]


def test_fashion_mnist_missing_everywhere_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))

    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", Offline)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", 28)


def test_folder_labels_from_first_level_subfolders_and_any_size(tmp_path):
    sizes = make_folder(tmp_path)
    data = load_dataset(f"folder:{tmp_path}", 24)
    assert data.images.shape == (4, 3, 24, 24) and data.skipped == 0
    assert data.class_names == ["cats", "dogs"]
    relative = sorted(sizes)  # data-set order is sorted relative paths
    expected_labels = {"cats/a.png": 0, "cats/deep/b.jpg": 0, "dogs/c.png": 1, "loose.png": -1}
    assert data.labels.tolist() == [expected_labels[r] for r in relative]
    assert data.ids.tolist() == [stable_id(r) for r in relative]
    assert (data.ids >= 0).all() and len(set(data.ids.tolist())) == 4
    again = load_dataset(f"folder:{tmp_path}", 24)
    assert torch.equal(again.ids, data.ids) and torch.equal(again.images, data.images)


def test_a_large_folder_shows_its_decoding_bar_unless_progress_is_off(tmp_path, capsys):
    for i in range(1000):  # the bar appears from 1000 files on
        Image.fromarray(np.full((8, 8), i % 256, dtype=np.uint8)).save(tmp_path / f"{i:04d}.png")
    load_dataset(f"folder:{tmp_path}", 8, workers=2)
    assert "decoding" in capsys.readouterr().err
    quiet = load_dataset(f"folder:{tmp_path}", 8, workers=2, progress=False)
    assert len(quiet) == 1000 and "decoding" not in capsys.readouterr().err


def test_folder_skips_and_counts_corrupt_files_with_a_warning(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): cats/broken.jpg"):
        data = load_dataset(f"folder:{tmp_path}", 16)
    assert len(data) == 4 and data.skipped == 1


def test_folder_errors_empty_missing_or_all_corrupt(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        load_dataset(f"folder:{tmp_path}", 16)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'nope'}", 16)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with warnings.catch_warnings(), pytest.raises(DataError, match="none of the 1 image files"):
        warnings.simplefilter("ignore")
        load_dataset(f"folder:{tmp_path}", 16)
    with pytest.raises(DataError, match="unknown data spec"):
        load_dataset("imagenet", 16)


def test_subset_is_seeded_ordered_and_bounded():
    data = load_dataset("fashion-mnist:test", 28)
    a, b = data.subset(500, seed=3), data.subset(500, seed=3)
    assert torch.equal(a.ids, b.ids) and len(a) == 500
    assert torch.equal(a.ids, a.ids.sort().values)  # kept in data-set order
    assert torch.equal(a.images, data.images[a.ids])  # ids are Fashion-MNIST indices
    assert not torch.equal(a.ids, data.subset(500, seed=4).ids)
    assert data.subset(10**6) is data


def test_held_out_split_is_disjoint_stable_and_labelled(tmp_path):
    n = 400
    data = ImageDataset(
        name="synthetic",
        images=torch.zeros(n, 3, 4, 4, dtype=torch.uint8),
        labels=torch.arange(n) % 3 - (torch.arange(n) % 7 == 0).long() * 10,  # some -1..-10: unlabelled
        ids=torch.tensor([stable_id(f"img{i}.png") for i in range(n)]),
        class_names=["a", "b", "c"],
    )
    data.labels.clamp_(min=-1)
    rest, held = split_held_out(data)
    assert len(rest) + len(held) == n and not set(rest.ids.tolist()) & set(held.ids.tolist())
    assert 0.05 * n < len(held) < 0.15 * n and (held.labels >= 0).all()
    assert torch.equal(split_held_out(data)[1].ids, held.ids)


def test_channel_conversion_uses_luma_and_repeats_grey():
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    assert convert_channels(rgb, 1).item() == round(0.299 * 255)
    grey = torch.full((2, 1, 3, 3), 7, dtype=torch.uint8)
    assert convert_channels(grey, 3).shape == (2, 3, 3, 3) and (convert_channels(grey, 3) == 7).all()


def test_a_new_source_plugs_into_the_registry(monkeypatch):
    monkeypatch.setitem(SOURCES, "catalogue", SOURCES.get("catalogue"))

    @register_source("catalogue")
    def load_catalogue(rest: str, crop_size: int) -> ImageDataset:
        return ImageDataset(
            name=f"catalogue:{rest}",
            images=torch.zeros(2, 3, crop_size, crop_size, dtype=torch.uint8),
            labels=torch.tensor([-1, -1]),
            ids=torch.tensor([11, 12]),
        )

    data = load_dataset("catalogue:shop", 8)
    assert data.name == "catalogue:shop" and data.ids.tolist() == [11, 12] and not data.is_labelled


RESIZE_SHAPES = [(1, 40, 30), (3, 30, 41), (3, 28, 28), (1, 32, 32), (1, 33, 32), (3, 200, 97), (5, 1, 9, 8)]


@pytest.mark.parametrize("shape", RESIZE_SHAPES)
def test_resize_center_crop_equals_torchvisions(shape):
    # The service and training share this resize; it must stay the arithmetic of torchvision's
    # resize (bilinear, antialias) + center_crop, which the encoders were trained with.
    functional = pytest.importorskip("torchvision.transforms.v2.functional")
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = functional.center_crop(functional.resize(image, [32], antialias=True), [32, 32])
    assert torch.equal(resize_center_crop(image, 32), expected)
