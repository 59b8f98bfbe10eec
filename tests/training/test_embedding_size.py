"""Embedding at another size than the training crop (`--embedding-size`, `python -m training.whiten
--input-size`, FixRes): the record keeps the crop and gets its own version, the whitening is fitted at
the new size, a round started from such an encoder trains at the crop and mines and saves at its size,
and the service's encoder resizes uploads to it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_whitening import random_record
from tiny_runs import tiny_trainer
from torch import nn

from training import onnx_runner
from training.cli import initial_embeddings, parse_config
from training.config import SMALL_IMAGE
from training.data.datasets import load_dataset
from training.data.images import resize_center_crop
from training.encoder import (
    Encoder,
    at_input_size,
    embedding_features,
    read_encoder_record,
    save_encoder,
    training_size,
)
from training.knn_monitor import knn_accuracy
from training.models import build_embedding_network, grid_pool
from training.onnx_runner import OnnxRunner
from training.whiten import main as whiten_main


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_dataset("fashion-mnist:test", 28).subset(300, seed=3).images


@pytest.mark.parametrize(("side", "grid"), [(4, 2), (7, 2), (7, 3), (5, 2), (14, 4)])
def test_grid_pooling_is_the_adaptive_pool_eager_and_exported(side: int, grid: int) -> None:
    """At 56 px the last stage is 7x7: its 2x2 grid has overlapping windows, written out for ONNX."""
    stage = torch.randn(3, 8, side, side)
    torch.testing.assert_close(grid_pool(stage, grid), F.adaptive_avg_pool2d(stage, grid))
    exported = nn.Sequential(GridPool(grid), nn.Flatten())
    model = onnx_runner.export_onnx(exported, stage[:1])  # traced at batch 1
    other = torch.randn(5, 8, side, side)
    np.testing.assert_allclose(
        OnnxRunner(model)(other, threads=1), F.adaptive_avg_pool2d(other, grid).flatten(1).numpy(), atol=1e-6
    )


class GridPool(nn.Module):
    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, stage: torch.Tensor) -> torch.Tensor:
        return grid_pool(stage, self.grid)


def test_another_input_size_keeps_the_crop_and_gets_its_own_version() -> None:
    record = random_record()
    resized = at_input_size(record, 56)
    assert (resized["input_size"], training_size(resized), training_size(record)) == (56, 28, 28)
    assert resized["version"] not in (record["version"], at_input_size(record, 42)["version"])
    back = at_input_size(resized, 28)  # the crop again: the very same encoder as before
    assert "train_size" not in back and back["version"] == record["version"]
    with pytest.raises(ValueError, match="positive"):
        at_input_size(record, 0)


def test_the_whiten_command_fits_at_the_new_size_and_the_encoder_embeds_there(images, tmp_path: Path) -> None:
    source = tmp_path / "encoder.pt"
    save_encoder(source, random_record())
    out = tmp_path / "encoder-56.pt"
    assert whiten_main(["--checkpoint", str(source), "--data", "fashion-mnist:test", "--subset", "300",
                        "--input-size", "56", "--out", str(out), "--amp", "none"]) == 0  # fmt: skip
    record = read_encoder_record(out)
    assert (record["input_size"], record["train_size"]) == (56, 28)
    # The whitening's mean is the mean of the features of 56 px images (the fit set: the 300 images).
    network = build_embedding_network({k: v for k, v in record["network"].items() if k != "whitening"})
    network.load_state_dict({k: v for k, v in record["state_dict"].items() if not k.startswith("whitening.")})
    fit_images = load_dataset("fashion-mnist:test", 56).subset(300, seed=0).images
    with torch.no_grad():
        normalised = (fit_images.float() / 255 - record["mean"][0]) / record["std"][0]
        features = F.normalize(network.eval()(normalised).double(), dim=1)
    torch.testing.assert_close(
        record["state_dict"]["whitening.mean"].double(), features.mean(0), atol=1e-4, rtol=0
    )
    # The encoder (what the service loads) resizes an image file's pixels to 56 and embeds there.
    encoder = Encoder(record)
    assert encoder.input_size == 56 and encoder.prepare(encoder_png(images[0])).shape == (1, 56, 56)
    direct = encoder.embed(resize_center_crop(images[:4], 56))
    assert direct.shape == (4, record["embed_dim"]) and np.allclose(
        np.linalg.norm(direct, axis=1), 1, atol=1e-5
    )
    with pytest.raises(SystemExit) as refused:  # argparse's usage error: exit status 2, one line
        whiten_main(["--checkpoint", str(source), "--data", "fashion-mnist:test",
                     "--out", str(tmp_path / "x.pt"), "--input-size", "4"])  # fmt: skip
    assert refused.value.code == 2
    assert not (tmp_path / "x.pt").exists()


def encoder_png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_run_embeds_at_its_embedding_size_and_a_round_from_it_follows(tmp_path: Path) -> None:
    trainer = tiny_trainer("simclr", tmp_path / "first", "--max-steps", "2", "--embedding-size", "56")
    trainer.fit()
    record = read_encoder_record(tmp_path / "first" / "encoder.pt")
    assert (record["input_size"], record["train_size"]) == (56, 28)
    assert Encoder(record).embed(torch.zeros(2, 1, 56, 56, dtype=torch.uint8)).shape[0] == 2
    # A round from it trains at the crop and embeds (mines, saves) at the encoder's size.
    config, _ = parse_config(
        "neighbours", ["--data", "fashion-mnist", "--init", str(tmp_path / "first" / "encoder.pt")]
    )
    assert (config.crop_size, config.embedding_size) == (28, 56)
    assert config.source("embedding_size") == "init encoder"
    crops = load_dataset("fashion-mnist", config.crop_size, subset=40)  # what the round trains on
    mined_in = initial_embeddings(config, record, crops, torch.device("cpu"))  # its neighbours' space
    retrieved = Encoder(record, amp=config.amp).embed(resize_center_crop(crops.images, 56))
    np.testing.assert_allclose(mined_in.numpy(), retrieved, atol=1e-5)


def test_small_images_embed_at_twice_their_side_photos_at_the_crop(tmp_path: Path) -> None:
    small, _ = parse_config("simclr", ["--data", "fashion-mnist"])
    assert (small.crop_size, small.embedding_size, small.source("embedding_size")) == (28, 56, SMALL_IMAGE)
    cropped, _ = parse_config("simclr", ["--data", "fashion-mnist", "--crop-size", "20"])
    assert (cropped.crop_size, cropped.embedding_size) == (20, 40)  # twice the crop the run trains at
    for i in range(2):
        Image.new("RGB", (120, 100), (i * 90, 20, 40)).save(tmp_path / f"{i}.png")
    photos, _ = parse_config("simclr", ["--data", f"folder:{tmp_path}", "--arch", "resnet18"])
    assert photos.embedding_size is None  # the crop, as the papers embed
    head, _ = parse_config("instdisc", ["--data", "fashion-mnist"])
    assert head.embedding_size is None  # its embedding is a head's output: not measured there
    vit, _ = parse_config("moco-v3", ["--data", "fashion-mnist", "--arch", "vit_tiny"])
    assert vit.embedding_size is None  # position embeddings fixed to the crop's patch grid


def test_the_knn_monitor_embeds_at_the_embedding_size_resized_once(tmp_path: Path) -> None:
    trainer = tiny_trainer("simclr", tmp_path / "run", "--knn-every", "1", "--knn-subset", "64")
    monitor = trainer.knn
    assert monitor is not None and monitor.input_size == trainer.embedding_size == 56
    assert (monitor.memory.image_size, monitor.queries.image_size) == (56, 56)  # once, when built
    queries = load_dataset("fashion-mnist:test", 28).subset(64)
    torch.testing.assert_close(monitor.queries.images, resize_center_crop(queries.images, 56))
    # Its figures are those of the 28 px images embedded at 56 px, as the saved encoder embeds them.
    network = trainer.embedding_network()
    figures = monitor.evaluate(network, trainer.mean, trainer.std, trainer.device)

    def features(images: torch.Tensor) -> torch.Tensor:  # L2-normalised, unwhitened
        return embedding_features(
            network, resize_center_crop(images, 56), trainer.mean, trainer.std, trainer.device
        )

    memory = load_dataset("fashion-mnist", 28).subset(96).subset(64)  # the tiny run's, then the monitor's
    assert torch.equal(resize_center_crop(memory.images, 56), monitor.memory.images)
    top1, top5 = knn_accuracy(
        features(memory.images), memory.labels, features(queries.images), queries.labels, 10, k=monitor.k
    )
    assert figures["knn/top1"] == pytest.approx(top1) and figures["knn/top5"] == pytest.approx(top5)
