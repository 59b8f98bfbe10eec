"""The grid embedding (`--embedding-grid`): the last ResNet stage pooled to GxG instead of 1x1, the
small-image default for methods whose embedding is the pooled backbone; checked against the
direct formula, through the encoder file, the deploy-time form and the config layering."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_runs import SMALL_RESNET, TINY_NETWORK, trained_like

from training import simclr
from training.cli import parse_config
from training.config import DEFAULT, FLAG, SMALL_IMAGE
from training.encoder import Encoder, make_encoder_record, read_encoder_record, with_embedding_grid
from training.inference import InferenceEncoder, inference_record
from training.models import EmbeddingNetwork, build_backbone, build_embedding_network, network_spec
from training.models.heads import LinearHead

KWARGS = SMALL_RESNET
TINY = TINY_NETWORK


def test_the_grid_is_the_last_stage_average_pooled_to_gxg_and_its_cells_average_to_the_global_pool():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", **KWARGS)
    network = trained_like(EmbeddingNetwork(backbone, grid=2))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        stage = backbone.feature_map(x)  # 5xDx4x4 at 28 px with the small stem
        out = network(x)
        pooled = backbone(x)
    assert stage.shape == (5, dim, 4, 4)
    assert out.shape == (5, 4 * dim) and network.out_dim == 4 * dim
    expected = torch.stack(  # cell (i, j) = mean of the 2x2 block of the 4x4 map, channel-major
        [stage[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((2, 3)) for i in range(2) for j in range(2)],
        2,
    ).flatten(1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.view(5, dim, 4).mean(2), pooled, rtol=1e-5, atol=1e-6)


def test_a_grid_needs_a_pooled_resnet_backbone():
    backbone, dim = build_backbone("resnet18", **KWARGS)
    with pytest.raises(ValueError, match="head"):
        EmbeddingNetwork(backbone, LinearHead(dim, 8), grid=2)
    vit, _ = build_backbone("vit_tiny", in_channels=1, image_size=28, patch_size=7)
    with pytest.raises(ValueError, match="convolutional"):
        EmbeddingNetwork(vit, grid=2)
    with pytest.raises(ValueError, match=">= 1"):
        EmbeddingNetwork(backbone, grid=0)


def test_the_encoder_file_carries_the_grid_and_its_version_differs_from_the_global_pool():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", **KWARGS)
    network = trained_like(EmbeddingNetwork(backbone, grid=2))
    args = dict(method="simclr", network=network, input_size=28, in_channels=1, mean=[0.5], std=[0.25])
    gridded = make_encoder_record(
        network_spec=network_spec("resnet18", KWARGS, grid=2), embed_dim=4 * dim, **args
    )
    pooled = make_encoder_record(network_spec=network_spec("resnet18", KWARGS), embed_dim=dim, **args)
    assert gridded["network"]["grid"] == 2 and "grid" not in pooled["network"]  # old files unchanged
    assert gridded["version"] != pooled["version"]  # same weights, different embedding
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    vectors = Encoder(gridded).embed(images)
    assert vectors.shape == (6, 4 * dim)
    with torch.no_grad():
        direct = F.normalize(network((images.float() / 255 - 0.5) / 0.25), dim=1).numpy()
    assert abs(vectors - direct).max() < 1e-5
    rebuilt = build_embedding_network(gridded["network"])
    assert isinstance(rebuilt, EmbeddingNetwork) and rebuilt.grid == 2


def test_the_deploy_time_form_folds_a_grid_encoder_within_tolerance():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", **KWARGS)
    network = trained_like(EmbeddingNetwork(backbone, grid=2))
    record = make_encoder_record(
        "simclr", network_spec("resnet18", KWARGS, grid=2), network, 4 * dim, 28, 1, [0.5], [0.25]
    )
    fast = InferenceEncoder(inference_record(record, "float32"))
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    exact, folded = Encoder(record).embed(images), fast.embed(images)
    assert folded.shape == (8, 4 * dim)
    assert float((exact * folded).sum(1).min()) > 0.99999  # folding in fp32 is exact up to rounding


def test_small_images_get_the_2x2_grid_photos_and_heads_keep_the_global_pool(tmp_path):
    config, _ = parse_config("simclr", ["--data", "fashion-mnist"])
    assert config.embedding_grid == 2 and config.source("embedding_grid") == SMALL_IMAGE
    instdisc, _ = parse_config("instdisc", ["--data", "fashion-mnist"])
    assert instdisc.embedding_grid == 1  # its embedding is the 128-d head output
    vit, _ = parse_config("moco-v3", ["--data", "fashion-mnist", "--arch", "vit_tiny", "--patch-size", "7"])
    assert vit.embedding_grid == 1 and vit.source("embedding_grid") == DEFAULT
    flagged, _ = parse_config("simclr", ["--data", "fashion-mnist", "--embedding-grid", "1"])
    assert flagged.embedding_grid == 1 and flagged.source("embedding_grid") == FLAG


@pytest.mark.parametrize(
    ("method", "argv", "message"),
    [
        ("instdisc", ["--embedding-grid", "2"], "its head"),
        ("moco-v3", ["--embedding-grid", "2", "--arch", "vit_tiny"], "needs a ResNet"),
        ("simclr", ["--embedding-grid", "0"], "--embedding-grid must be positive"),
    ],
)
def test_a_grid_that_cannot_apply_is_a_one_line_usage_error(method, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(method, ["--data", "fashion-mnist", *argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_small_image_run_writes_a_grid_encoder_that_embeds_at_the_grid_size(tmp_path):
    out = tmp_path / "run"
    argv = ["--data", "fashion-mnist", "--subset", "64", "--batch-size", "32", "--max-steps", "1", *TINY]
    assert simclr.main([*argv, "--out", str(out)]) == 0
    record = read_encoder_record(out / "encoder.pt")
    feature_dim = 512 * 0.0625  # resnet18's last stage at width 1/16
    assert record["network"]["grid"] == 2 and record["embed_dim"] == 4 * feature_dim
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert Encoder(record).embed(images).shape == (3, 4 * feature_dim)


def test_an_existing_encoder_is_regridded_without_touching_its_weights():
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", **KWARGS)
    network = trained_like(EmbeddingNetwork(backbone))
    record = make_encoder_record(
        "simclr", network_spec("resnet18", KWARGS), network, dim, 28, 1, [0.5], [0.25]
    )
    gridded = with_embedding_grid(record, 2)
    assert gridded["embed_dim"] == 4 * dim and gridded["network"]["grid"] == 2
    assert gridded["state_dict"].keys() == record["state_dict"].keys()
    assert all(gridded["state_dict"][k] is v for k, v in record["state_dict"].items())  # untouched
    assert gridded["version"] != record["version"]
    back = with_embedding_grid(gridded, 1)
    assert back["version"] == record["version"] and back["network"] == record["network"]
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    cells = torch.from_numpy(Encoder(gridded).embed(images)).view(4, dim, 4).mean(2)
    assert torch.allclose(
        F.normalize(cells, dim=1), torch.from_numpy(Encoder(record).embed(images)), atol=1e-5
    )
    headed = make_encoder_record(
        "instdisc", network_spec("resnet18", KWARGS, LinearHead(dim, 8).spec),
        EmbeddingNetwork(backbone, LinearHead(dim, 8)), 8, 28, 1, [0.5], [0.25],
    )  # fmt: skip
    with pytest.raises(ValueError, match="head"):
        with_embedding_grid(headed, 2)
