"""Backbones, heads, split BN and the encoder-file round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.encoder import Encoder, make_encoder_record, save_encoder
from training.models import EmbeddingNetwork, blocks, build_backbone, build_embedding_network, network_spec
from training.models.heads import LinearHead, MLPHead, PredictionHead, ProjectionHead, build_head
from training.models.resnet import SplitBatchNorm
from training.models.vit import sincos_position_embedding_2d


@pytest.mark.parametrize(
    ("arch", "width", "expected_dim"),
    [("resnet18", 0.25, 128), ("resnet18", 0.125, 64), ("resnet50", 0.125, 256)],
)
@pytest.mark.parametrize(("channels", "size", "small_stem"), [(1, 28, True), (3, 32, True), (3, 32, False)])
def test_resnet_shapes(arch, width, expected_dim, channels, size, small_stem):
    net, dim = build_backbone(arch, in_channels=channels, small_stem=small_stem, width=width)
    out = net(torch.randn(2, channels, size, size))
    assert dim == expected_dim
    assert out.shape == (2, expected_dim)


def test_width_multiplier_sets_stage_channels():
    net, _ = build_backbone("resnet18", in_channels=1, small_stem=True, width=0.25)
    assert [net.layer1[0].conv1.out_channels, net.layer2[0].conv1.out_channels] == [16, 32]
    assert [net.layer3[0].conv1.out_channels, net.layer4[0].conv1.out_channels] == [64, 128]
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (3, 3)
    assert isinstance(net.maxpool, nn.Identity)


def test_full_resnet18_has_torchvision_parameter_count():
    import torchvision

    net, dim = build_backbone("resnet18")
    reference = torchvision.models.resnet18()
    expected = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("fc."))
    assert dim == 512
    assert sum(p.numel() for p in net.parameters()) == expected


def test_split_bn_equals_per_split_batch_norm():
    torch.manual_seed(0)
    splits, channels = 4, 3
    split_bn = SplitBatchNorm(channels, num_splits=splits)
    with torch.no_grad():
        split_bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        split_bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    x = torch.randn(16, channels, 5, 5) * 3 + 1
    out = split_bn.train()(x)
    mean_of_running_means = torch.zeros(channels)
    mean_of_running_vars = torch.zeros(channels)
    for k in range(splits):
        part = x[k::splits]  # sub-batch k: samples n with n % splits == k
        mean = part.mean(dim=(0, 2, 3), keepdim=True)
        var = part.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        expected = (part - mean) / torch.sqrt(var + split_bn.eps)
        expected = expected * split_bn.weight.view(1, -1, 1, 1) + split_bn.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(out[k::splits], expected, atol=1e-5, rtol=1e-5)
        reference = nn.BatchNorm2d(channels).train()
        reference(part)
        mean_of_running_means += reference.running_mean / splits
        mean_of_running_vars += reference.running_var / splits
    torch.testing.assert_close(split_bn.running_mean, mean_of_running_means)
    torch.testing.assert_close(split_bn.running_var, mean_of_running_vars)
    # eval mode: plain BN with the running statistics
    plain = nn.BatchNorm2d(channels)
    plain.load_state_dict(split_bn.state_dict())
    torch.testing.assert_close(split_bn.eval()(x), plain.eval()(x))


def test_split_bn_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible by num_splits=8"):
        SplitBatchNorm(2, num_splits=8).train()(torch.randn(6, 2, 3, 3))


def test_split_bn_backbone_trains_and_matches_bn_keys():
    split, _ = build_backbone("resnet18", in_channels=1, small_stem=True, width=0.125, norm="split_bn")
    plain, _ = build_backbone("resnet18", in_channels=1, small_stem=True, width=0.125)
    assert isinstance(split.bn1, SplitBatchNorm)
    assert split.state_dict().keys() == plain.state_dict().keys()
    split(torch.randn(8, 1, 28, 28)).sum().backward()
    assert split.conv1.weight.grad is not None


def test_vit_shapes_frozen_patch_projection_and_fixed_position_embedding():
    net, dim = build_backbone(
        "vit_tiny", in_channels=1, image_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2
    )
    out = net(torch.randn(3, 1, 28, 28))
    assert dim == 32 and out.shape == (3, 32)
    assert not net.patch_embed.weight.requires_grad and not net.patch_embed.bias.requires_grad
    assert "pos_embed" not in dict(net.named_parameters())
    assert net.pos_embed.shape == (1, 1 + 16, 32)
    out.sum().backward()
    assert net.cls_token.grad is not None and net.patch_embed.weight.grad is None


def test_sincos_position_embedding_matches_formula():
    grid, dim = 3, 8
    table = sincos_position_embedding_2d(grid, dim)
    assert torch.equal(table[0], torch.zeros(dim))
    omega = [1.0 / 10000.0 ** (k / 2) for k in range(2)]
    for i in range(grid):
        for j in range(grid):
            row = table[1 + i * grid + j]  # meshgrid "ij": w index i, h index j
            expected = [np.sin(i * o) for o in omega] + [np.cos(i * o) for o in omega]
            expected += [np.sin(j * o) for o in omega] + [np.cos(j * o) for o in omega]
            np.testing.assert_allclose(row.numpy(), expected, atol=1e-6)


def test_heads_structure():
    v3_projector = ProjectionHead(16, 32, 8, num_layers=3, hidden_bn=True, last_bn=True)
    kinds = [type(m).__name__ for m in v3_projector.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert not v3_projector.mlp[-1].affine and v3_projector.mlp[0].bias is None
    mocov2 = ProjectionHead(16, 16, 8, num_layers=2, hidden_bn=False)
    assert [type(m).__name__ for m in mocov2.mlp] == ["Linear", "ReLU", "Linear"]
    assert mocov2.mlp[0].bias is not None
    predictor = PredictionHead(8, 32, 8)
    assert [type(m).__name__ for m in predictor.mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert LinearHead(16, 128)(torch.randn(2, 16)).shape == (2, 128)


@pytest.mark.parametrize(
    "head",
    [LinearHead(16, 128), MLPHead(16, 32, 8, 3, last_bn=True), PredictionHead(16, 8, 4)],
)
def test_head_rebuilds_from_spec(head):
    rebuilt = build_head(head.spec)
    rebuilt.load_state_dict(head.state_dict())
    x = torch.randn(4, 16)
    head.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), head(x))
    assert type(rebuilt) is type(head)


def test_bad_spec_gives_clear_error():
    with pytest.raises(ValueError, match="unknown arch 'resnet7'"):
        build_embedding_network({"arch": "resnet7", "kwargs": {}, "head": None})
    with pytest.raises(ValueError, match="unknown head type"):
        build_head({"type": "conv"})


@pytest.mark.parametrize("with_head", [False, True])
def test_encoder_round_trip(tmp_path, with_head):
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "small_stem": True, "width": 0.125, "norm": "split_bn", "num_splits": 2}
    backbone, dim = build_backbone("resnet18", **kwargs)
    head = LinearHead(dim, 128) if with_head else None
    live = EmbeddingNetwork(backbone, head)
    live.train()(torch.randn(8, 1, 28, 28))  # move the BN running statistics away from the init
    spec = network_spec("resnet18", kwargs, head.spec if head else None)
    assert spec["kwargs"]["norm"] == "bn"
    embed_dim = 128 if with_head else dim
    record = make_encoder_record("test", spec, live, embed_dim, 28, 1, [0.286], [0.353])
    save_encoder(tmp_path / "encoder.pt", record)
    encoder = Encoder.load(tmp_path / "encoder.pt")

    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    vectors = encoder.embed(images, batch_size=2)
    with torch.no_grad():
        expected = F.normalize(live.eval()((images.float() / 255 - 0.286) / 0.353), dim=1).numpy()
    assert vectors.shape == (5, embed_dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_encoder_round_trip_vit(tmp_path):
    kwargs = {
        "in_channels": 3,
        "image_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
    }
    backbone, dim = build_backbone("vit_tiny", **kwargs)
    live = EmbeddingNetwork(backbone).eval()
    record = make_encoder_record(
        "t", network_spec("vit_tiny", kwargs), live, dim, 32, 3, [0.5] * 3, [0.25] * 3
    )
    save_encoder(tmp_path / "e.pt", record)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = F.normalize(live((images.float() / 255 - 0.5) / 0.25), dim=1).numpy()
    np.testing.assert_allclose(Encoder.load(tmp_path / "e.pt").embed(images), expected, atol=1e-5)


@pytest.mark.parametrize("block_name", ["BasicBlock", "Bottleneck"])
@pytest.mark.parametrize("stride", [1, 2])
def test_own_blocks_equal_torchvisions(block_name, stride):
    # Same parameter names (checkpoints interchangeable) and the same function of the same weights.
    torchvision_resnet = pytest.importorskip("torchvision.models.resnet")
    ours_cls, theirs_cls = getattr(blocks, block_name), getattr(torchvision_resnet, block_name)
    inplanes, planes = 16, 8
    out = planes * ours_cls.expansion

    def projection() -> nn.Module:
        return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    torch.manual_seed(0)
    ours = ours_cls(inplanes, planes, stride, projection())
    theirs = theirs_cls(inplanes, planes, stride, projection())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, inplanes, 9, 9)
    for mode in (True, False):  # batch statistics, then running statistics
        ours.train(mode), theirs.train(mode)
        assert torch.equal(ours(x), theirs(x))


def test_full_resnet50_has_torchvision_parameter_count():
    torchvision_models = pytest.importorskip("torchvision.models")
    net, dim = build_backbone("resnet50")
    reference = torchvision_models.resnet50()
    expected = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("fc."))
    assert dim == 2048
    assert sum(p.numel() for p in net.parameters()) == expected
