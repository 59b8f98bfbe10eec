"""PCA whitening of the retrieval embedding (`--whitening pca`, `python -m training.whiten`): the fit
against the eigen-decomposition written out, the module against its formula, through the encoder
file, the deploy-time form, the engine's saves, the kNN monitor and the config layering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_runs import tiny_trainer

from training.cli import parse_config
from training.config import DEFAULT, SMALL_IMAGE
from training.data.datasets import load_dataset
from training.encoder import (
    Encoder,
    make_encoder_record,
    read_encoder_record,
    with_embedding_grid,
    with_whitening,
)
from training.inference import InferenceEncoder, foldable_pairs, inference_record
from training.knn_monitor import KnnMonitor
from training.models import EmbeddingNetwork, build_backbone, build_embedding_network, network_spec
from training.models.whitening import EIGENVALUE_FLOOR, Whitening, fit_whitening
from training.whiten import main as whiten_main

KWARGS = {"in_channels": 1, "small_stem": True, "width": 0.125}
REPO = Path(__file__).resolve().parents[2]


def correlated(n: int = 4000, dim: int = 6, seed: int = 0) -> torch.Tensor:
    """Positive, strongly correlated vectors with a large shared component, like pooled ReLU features."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * torch.linspace(3, 0.1, dim)
    return 5.0 + torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_fit_centres_and_scales_each_principal_direction_by_its_eigenvalue_to_minus_power_half(power):
    x = correlated()
    mean, projection = fit_whitening(x, power)
    unit = F.normalize(x, dim=1)  # fitted on L2-normalised vectors
    expected_mean = unit.mean(0)
    covariance = np.cov((unit - expected_mean).numpy().T, bias=True)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    torch.testing.assert_close(mean, expected_mean)
    # columns are eigenvectors (up to sign) scaled by (lambda + eps lambda_max)^(-p/2)
    scale = (eigenvalues + EIGENVALUE_FLOOR * eigenvalues[0]) ** (-power / 2)
    signs = np.sign((projection.numpy() * eigenvectors).sum(0))
    np.testing.assert_allclose(projection.numpy(), eigenvectors * scale * signs, rtol=1e-6, atol=1e-9)
    whitened = (unit - mean) @ projection
    spread = np.cov(whitened.numpy().T, bias=True)  # ~diag(lambda^(1 - p)): ~the identity for p = 1
    np.testing.assert_allclose(
        spread, np.diag(eigenvalues * scale**2), atol=1e-9 * eigenvalues[0] ** (1 - power)
    )


def test_whitening_module_is_the_formula_in_float32_even_under_bf16_autocast():
    x = correlated(500, 8).float()
    whitening = Whitening.fitted(x, 0.5, out_dim=5)
    assert whitening.spec == {"dim": 8, "out_dim": 5, "power": 0.5}
    expected = (F.normalize(x, dim=1) - whitening.mean) @ whitening.projection
    torch.testing.assert_close(whitening(x), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = whitening(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, (F.normalize(x.bfloat16().float(), dim=1) - whitening.mean) @ whitening.projection
    )
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        fit_whitening(x[:1])


def random_record(grid: int = 2) -> dict:
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", **KWARGS)
    network = EmbeddingNetwork(backbone, grid=grid).eval()
    spec = network_spec("resnet18", KWARGS, None, grid)
    return make_encoder_record("simclr", spec, network, network.out_dim, 28, 1, [0.286], [0.353])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_dataset("fashion-mnist:test", 28).subset(300, seed=2).images


def test_a_whitened_encoder_file_embeds_with_the_formula_and_has_its_own_version(images, tmp_path):
    record = random_record()
    whitened = with_whitening(record, images[:200], 0.5, amp="none")
    dim = record["embed_dim"]
    assert whitened["network"]["whitening"] == {"dim": dim, "out_dim": dim, "power": 0.5}
    assert whitened["embed_dim"] == record["embed_dim"] and whitened["version"] != record["version"]
    encoder, plain = Encoder(whitened), Encoder(record)
    raw = torch.from_numpy(plain.embed(images[200:]))  # L2-normalised features before whitening
    mean, projection = (
        whitened["state_dict"]["whitening.mean"],
        whitened["state_dict"]["whitening.projection"],
    )
    expected = F.normalize((raw - mean) @ projection, dim=1)
    np.testing.assert_allclose(encoder.embed(images[200:]), expected.numpy(), atol=2e-5)
    # refitting replaces the whitening; re-pooling drops it (it was fitted on the other pooling)
    assert with_whitening(whitened, images[:200], 0.5, amp="none")["version"] == whitened["version"]
    regridded = with_embedding_grid(whitened, 1)
    assert "whitening" not in regridded["network"]
    assert not any(k.startswith("whitening.") for k in regridded["state_dict"])
    Encoder(regridded).embed(images[:2])


def test_the_deploy_time_form_keeps_the_whitening_in_float32_and_still_folds(images):
    whitened = with_whitening(random_record(), images[:200], 0.5, amp="none")
    network = build_embedding_network(whitened["network"])
    assert len(foldable_pairs(network)) > 0  # the whitening does not stop fx from tracing
    form = inference_record(whitened, "bfloat16")
    assert form["state_dict"]["whitening.projection"].dtype == torch.float32
    assert form["state_dict"]["backbone.conv1.weight"].dtype == torch.bfloat16
    fast = InferenceEncoder(form)
    assert fast.network.whitening.projection.dtype == torch.float32
    torch.testing.assert_close(
        fast.network.whitening.projection, whitened["state_dict"]["whitening.projection"]
    )
    exact = Encoder(whitened).embed(images[200:])
    cosine = (fast.embed(images[200:]) * exact).sum(1)
    assert cosine.mean() > 0.99


def test_the_knn_monitor_reports_the_whitened_and_the_unwhitened_figures():
    data = load_dataset("fashion-mnist", 28).subset(400, seed=1)
    queries = load_dataset("fashion-mnist:test", 28).subset(200, seed=1)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", **KWARGS)
    network = EmbeddingNetwork(backbone, grid=2).eval()
    monitor = KnnMonitor(data, queries, k=20, progress=False)
    plain = monitor.evaluate(network, [0.286], [0.353], torch.device("cpu"))
    both = monitor.evaluate(network, [0.286], [0.353], torch.device("cpu"), whiten_power=0.5)
    assert both["knn/top1_unwhitened"] == plain["knn/top1"]
    assert both["knn/top1"] != plain["knn/top1"]  # a different embedding (which is better is a benchmark)
    assert set(both) == {"knn/top1", "knn/top5", "knn/top1_unwhitened", "knn/top5_unwhitened"}


def test_small_images_default_to_pca_whitening_photos_do_not(tmp_path):
    flags = ["--arch", "resnet18", "--width", "0.0625"]
    small, _ = parse_config("simclr", ["--data", "fashion-mnist", *flags])
    assert (small.whitening, small.whiten_power, small.source("whitening")) == ("pca", 0.5, SMALL_IMAGE)
    for i in range(2):
        Image.new("RGB", (120, 100), (i * 90, 20, 40)).save(tmp_path / f"{i}.png")
    photos, _ = parse_config("simclr", ["--data", f"folder:{tmp_path}", *flags])
    assert (photos.whitening, photos.source("whitening")) == ("none", DEFAULT)
    instdisc, _ = parse_config("instdisc", ["--data", "fashion-mnist", *flags])
    assert instdisc.whitening == "pca"  # its 128-d head's output is whitened as well
    off, _ = parse_config("simclr", ["--data", "fashion-mnist", *flags, "--whitening", "none"])
    assert off.whitening == "none"


def test_the_engine_saves_a_whitened_encoder(tmp_path):
    trainer = tiny_trainer("simclr", tmp_path, "--max-steps", "3")
    trainer.fit()
    record = read_encoder_record(tmp_path / "encoder.pt")
    assert record["network"]["whitening"] == {
        "dim": record["embed_dim"],
        "out_dim": record["embed_dim"],
        "power": 0.5,
    }
    network = build_embedding_network(record["network"])
    network.load_state_dict(record["state_dict"])
    network.eval()
    features = trainer.embedding_network().eval()
    with torch.no_grad():
        x = torch.randn(4, 1, 28, 28)
        torch.testing.assert_close(network(x), network.whitening(features(x)), atol=1e-4, rtol=1e-4)


def test_the_whiten_command_writes_a_whitened_encoder_and_fails_in_one_line(images, tmp_path):
    source = tmp_path / "encoder.pt"
    torch.save(random_record(), source)
    assert whiten_main(["--checkpoint", str(source), "--data", "fashion-mnist:test", "--subset", "300",
                        "--out", str(tmp_path / "white.pt"), "--amp", "none"]) == 0  # fmt: skip
    assert read_encoder_record(tmp_path / "white.pt")["network"]["whitening"]["power"] == 0.5
    missing = subprocess.run(
        [sys.executable, "-m", "training.whiten", "--checkpoint", str(tmp_path / "nope.pt"),
         "--data", "fashion-mnist", "--out", str(tmp_path / "x.pt")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "training.whiten", "--checkpoint", str(source), "--data", "fashion-mnist",
         "--out", str(tmp_path / "x.pt"), "--power", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--power must be in (0, 2]" in bad.stderr
