"""The multi-scale embedding (`--embedding-scales`, `training.whiten --scales`): each image also
embedded resized by the other factors, the unit features summed; checked against the direct
formula, through the encoder file and its version, the deploy-time forms, the config layering and
the commands' usage errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_runs import SMALL_RESNET, TINY_NETWORK, trained_like

from training import simclr, whiten
from training.cli import parse_config
from training.config import DEFAULT, FLAG, INIT, SMALL_IMAGE
from training.encoder import (
    Encoder,
    make_encoder_record,
    read_encoder_record,
    save_encoder,
    with_embedding_scales,
)
from training.inference import InferenceEncoder, build_inference_encoder, foldable_pairs, inference_record
from training.models import EmbeddingNetwork, build_backbone, network_spec
from training.models.heads import LinearHead

KWARGS = SMALL_RESNET
TINY = TINY_NETWORK


def two_scale_record() -> tuple[dict, dict, EmbeddingNetwork]:
    """(a 56 px grid encoder at scales 1 and 0.75, the same weights at one scale, its network)."""
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", **KWARGS)
    network = trained_like(EmbeddingNetwork(backbone, grid=2, scales=(1.0, 0.75)), side=56)
    args = dict(method="simclr", network=network, embed_dim=4 * dim, input_size=56, in_channels=1)
    args |= dict(mean=[0.5], std=[0.25], train_size=28)
    multi = make_encoder_record(
        network_spec=network_spec("resnet18", KWARGS, grid=2, scales=(1.0, 0.75)), **args
    )
    single = make_encoder_record(network_spec=network_spec("resnet18", KWARGS, grid=2), **args)
    return multi, single, network


def test_the_features_are_the_sum_of_each_sizes_unit_features():
    multi, _, network = two_scale_record()
    one_size = EmbeddingNetwork(network.backbone, grid=2).eval()
    x = torch.randn(5, 1, 56, 56)
    with torch.no_grad():
        smaller = F.interpolate(x, size=(42, 42), mode="bilinear", align_corners=False)  # 0.75 of 56
        expected = F.normalize(one_size(x), dim=1) + F.normalize(one_size(smaller), dim=1)
        out = network(x)
    assert out.shape == expected.shape == (5, network.features_dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(F.normalize(out, dim=1), F.normalize(one_size(x), dim=1), atol=1e-3)


def test_the_encoder_file_carries_the_scales_and_its_version_differs():
    multi, single, network = two_scale_record()
    assert (
        multi["network"]["scales"] == [1.0, 0.75] and "scales" not in single["network"]
    )  # old files as they were
    assert multi["version"] != single["version"]  # same weights, another embedding
    images = torch.randint(0, 256, (6, 1, 56, 56), dtype=torch.uint8)
    vectors = Encoder(multi).embed(images)
    with torch.no_grad():
        direct = F.normalize(network((images.float() / 255 - 0.5) / 0.25), dim=1).numpy()
    assert abs(vectors - direct).max() < 1e-5
    assert with_embedding_scales(single, (1.0, 0.75))["version"] == multi["version"]
    back = with_embedding_scales(multi, (1.0,))
    assert back["version"] == single["version"] and back["network"] == single["network"]
    assert all(back["state_dict"][k] is v for k, v in multi["state_dict"].items())  # weights untouched


def test_the_deploy_time_forms_fold_each_layer_once_and_agree_with_the_training_graph():
    multi, _, network = two_scale_record()
    pairs = foldable_pairs(network)
    assert len(pairs) == len(set(pairs)) == 20  # resnet18's 20 conv + BN pairs, each once
    images = torch.randint(0, 256, (8, 1, 56, 56), dtype=torch.uint8)
    exact = Encoder(multi).embed(images)
    folded = InferenceEncoder(inference_record(multi, "float32")).embed(images)
    assert float((exact * folded).sum(1).min()) > 0.99999  # folding in fp32 is exact up to rounding
    deployed = build_inference_encoder(multi, None)
    assert deployed["scripted"] and deployed["onnx"]  # both trace the resize
    for runtime in ("torchscript", "onnxruntime"):
        fast = InferenceEncoder({**deployed, "runtime": runtime})
        assert fast.runtime == runtime
        np.testing.assert_allclose(fast.embed(images), exact, atol=1e-5)


def test_small_images_get_two_scales_photos_and_heads_keep_one(tmp_path):
    config, _ = parse_config("simclr", ["--data", "fashion-mnist"])
    assert config.embedding_scales == (1.0, 0.75) and config.source("embedding_scales") == SMALL_IMAGE
    instdisc, _ = parse_config("instdisc", ["--data", "fashion-mnist"])
    assert instdisc.embedding_scales == (1.0,)  # its embedding is the 128-d head output
    flagged, _ = parse_config("simclr", ["--data", "fashion-mnist", "--embedding-scales", "1"])
    assert flagged.embedding_scales == (1.0,) and flagged.source("embedding_scales") == FLAG
    multi, _, _ = two_scale_record()
    save_encoder(tmp_path / "init.pt", multi)
    refined, _ = parse_config("neighbours", ["--data", "fashion-mnist", "--init", str(tmp_path / "init.pt")])
    assert refined.embedding_scales == (1.0, 0.75) and refined.source("embedding_scales") == INIT
    photos = tmp_path / "photos" / "a"
    photos.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (200, 200), (i * 90, 20, 40)).save(photos / f"{i}.jpg")
    photo_config, _ = parse_config("simclr", ["--data", f"folder:{photos.parent}"])
    assert photo_config.embedding_scales == (1.0,) and photo_config.source("embedding_scales") == DEFAULT


@pytest.mark.parametrize(
    ("method", "argv", "message"),
    [
        ("instdisc", ["--embedding-scales", "1", "0.75"], "its head"),
        ("moco-v3", ["--embedding-scales", "1", "0.75", "--arch", "vit_tiny"], "needs a ResNet"),
        ("simclr", ["--embedding-scales", "0.75"], "must start with 1"),
        ("simclr", ["--embedding-scales", "1", "3"], "in (0, 2]"),
    ],
)
def test_scales_that_cannot_apply_are_a_one_line_usage_error(method, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(method, ["--data", "fashion-mnist", *argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_network_with_a_head_or_no_feature_map_refuses_several_scales():
    backbone, dim = build_backbone("resnet18", **KWARGS)
    with pytest.raises(ValueError, match="head"):
        EmbeddingNetwork(backbone, LinearHead(dim, 8), scales=(1.0, 0.75))
    vit, _ = build_backbone("vit_tiny", in_channels=1, image_size=28, patch_size=7)
    with pytest.raises(ValueError, match="ResNet"):
        EmbeddingNetwork(vit, scales=(1.0, 0.75))
    assert EmbeddingNetwork(vit).scales == (1.0,)


def test_a_small_image_run_writes_a_two_scale_encoder(tmp_path):
    out = tmp_path / "run"
    argv = ["--data", "fashion-mnist", "--subset", "64", "--batch-size", "32", "--max-steps", "1", *TINY]
    assert simclr.main([*argv, "--out", str(out)]) == 0
    record = read_encoder_record(out / "encoder.pt")
    assert record["network"]["scales"] == [1.0, 0.75] and record["network"]["whitening"]
    images = torch.randint(0, 256, (3, 1, 56, 56), dtype=torch.uint8)
    assert Encoder(record).embed(images).shape == (3, record["embed_dim"])


def test_whiten_gives_an_existing_encoder_two_scales_and_refuses_bad_ones(tmp_path, capsys):
    _, single, _ = two_scale_record()
    save_encoder(tmp_path / "one.pt", single)
    out = tmp_path / "two.pt"
    argv = ["--checkpoint", str(tmp_path / "one.pt"), "--data", "fashion-mnist", "--subset", "300"]
    assert whiten.main([*argv, "--scales", "1", "0.75", "--out", str(out)]) == 0
    record = read_encoder_record(out)
    assert record["network"]["scales"] == [1.0, 0.75] and record["network"]["whitening"]
    assert "x [1.0, 0.75]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        whiten.main([*argv, "--scales", "0.75", "1", "--out", str(tmp_path / "bad.pt")])
    assert exit_info.value.code == 2 and not (tmp_path / "bad.pt").exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--scales must start with 1" in lines[0], lines
