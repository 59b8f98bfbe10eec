"""Methods on a tiny backbone: buffers (queue, bank), momentum updates, split BN, and each loss
recomputed by hand from the same features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.cli import build_parser, parse_config
from training.config import SMALL_IMAGE, ConfigError, RunConfig
from training.encoder import Encoder, make_encoder_record, save_encoder
from training.flags import flag_names
from training.losses.debiased import debiased_nt_xent
from training.losses.nce import sample_noise_indices
from training.losses.ntxent import nt_xent
from training.methods import METHODS, build_method, method_class
from training.methods.instdisc import EXACT_SOFTMAX_MAX_SAMPLES, InstDisc
from training.methods.moco import MoCoV1, MoCoV2
from training.methods.mocov3 import MoCoV3
from training.methods.momentum import cosine_momentum
from training.methods.nnclr import NNCLR
from training.methods.simclr import SimCLR
from training.models.memory_bank import MemoryBank
from training.models.resnet import SplitBatchNorm

TINY = {"in_channels": 1, "small_stem": True, "width": 0.0625}  # stages of 4/8/16/32 channels
SIZE = 16


def views(n: int, count: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, SIZE, SIZE, generator=generator) for _ in range(count)]


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


def parse(name: str, argv: list[str], data: str = "fashion-mnist") -> RunConfig:
    config, _ = parse_config(name, ["--data", data, "--arch", "resnet18", "--width", "0.0625", *argv])
    return config


def by_flag(config: RunConfig) -> dict:
    """Every setting of the config keyed by its flag name (moco_t, proj_dim, lr, ...)."""
    names = flag_names(RunConfig, type(config.params))
    values = config.to_dict() | config.to_dict()["params"]
    return {flag: values[name] for flag, name in names.items()}


# ---------------------------------------------------------------- MoCo v1/v2


def test_queue_fifo_with_wrap_around_when_k_is_not_a_multiple_of_the_batch():
    moco = MoCoV2("resnet18", TINY, dim=3, queue_size=10, shuffle_bn=False)
    batches = [torch.full((4, 3), float(step)) + torch.arange(4.0).view(4, 1) / 10 for step in range(3)]
    for keys in batches:
        moco._dequeue_and_enqueue(keys)
    # 12 keys into 10 slots: keys 0..9 fill the queue, keys 10, 11 overwrite slots 0, 1
    expected = torch.cat(batches)[[10, 11, 2, 3, 4, 5, 6, 7, 8, 9]]
    torch.testing.assert_close(moco.queue, expected)
    assert int(moco.queue_ptr) == 2


def test_queue_keeps_the_newest_keys_when_the_batch_exceeds_k():
    moco = MoCoV2("resnet18", TINY, dim=2, queue_size=3, shuffle_bn=False)
    moco._dequeue_and_enqueue(torch.arange(10.0).view(5, 2))
    # as if enqueued one by one into slots 0,1,2,0,1: keys 3, 4 in slots 0, 1 and key 2 in slot 2
    assert moco.queue[:, 0].tolist() == [6.0, 8.0, 4.0]
    assert int(moco.queue_ptr) == 5 % 3


def test_moco_key_encoder_momentum_update_is_exact():
    moco = MoCoV1("resnet18", TINY, queue_size=16, momentum=0.9, shuffle_bn=False)
    with torch.no_grad():
        for param in moco.encoder_q.parameters():
            param.add_(torch.randn_like(param))
    before_q = [p.clone() for p in moco.encoder_q.parameters()]
    before_k = [p.clone() for p in moco.encoder_k.parameters()]
    moco.on_step_end(0.3)
    for q, k_old, k_new in zip(before_q, before_k, moco.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    assert not any(p.requires_grad for p in moco.encoder_k.parameters())


@pytest.mark.parametrize("cls", [MoCoV1, MoCoV2])
def test_moco_loss_equals_formula_and_enqueues_keys(cls):
    torch.manual_seed(0)
    moco = cls("resnet18", TINY, queue_size=12, shuffle_bn=False)
    with torch.no_grad():  # negatives as hard as real keys, so the loss is far from 0
        moco.queue.copy_(F.normalize(moco.encoder_k(views(12, count=1, seed=1)[0]), dim=1))
    queue_before = moco.queue.clone()
    x_q, x_k = views(4)
    out = moco([x_q, x_k], torch.arange(4))
    with torch.no_grad():
        q = F.normalize(moco.encoder_q(x_q), dim=1)
        k = F.normalize(moco.encoder_k(x_k), dim=1)
    expected = 0.0
    for i in range(4):
        positive = math.exp(dot(q[i], k[i]) / moco.temperature)
        negatives = sum(math.exp(dot(q[i], queue_before[j]) / moco.temperature) for j in range(12))
        expected += -math.log(positive / (positive + negatives)) / 4
    assert expected > 1.0
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(moco.queue[:4], k)
    torch.testing.assert_close(moco.queue[4:], queue_before[4:])
    assert moco.temperature == (0.07 if cls is MoCoV1 else 0.2)


def test_moco_split_bn_on_one_process():
    moco = MoCoV2("resnet18", TINY, queue_size=32, num_splits=4)
    assert moco.split_bn and isinstance(moco.encoder_k.backbone.bn1, SplitBatchNorm)
    out = moco(views(8), torch.arange(8))
    out.loss.backward()
    assert torch.isfinite(out.loss) and moco.encoder_q.backbone.conv1.weight.grad is not None
    with pytest.raises(ValueError, match="not divisible by num_splits=4"):
        moco(views(6), torch.arange(6))
    # the encoder file gets plain BN (identical in eval mode)
    assert moco.encoder_spec()["kwargs"].get("norm", "bn") == "bn"


def test_moco_single_process_shuffle_keeps_keys_in_order():
    """Shuffle -> split-BN key encoder -> unshuffle: in eval mode (per-sample BN) the keys must
    come back in the batch's order."""
    moco = MoCoV2("resnet18", TINY, queue_size=32, num_splits=2).eval()
    x = views(8)[0]
    with torch.no_grad():
        torch.testing.assert_close(moco._keys(x), F.normalize(moco.encoder_k(x), dim=1))


def test_moco_num_splits_must_divide_the_batch():
    with pytest.raises(ConfigError, match="--batch-size 12 does not divide into --num-splits 8"):
        RunConfig(
            method="moco-v2",
            data="fashion-mnist",
            augmentation="mocov2",
            batch_size=12,
            params=MoCoV2.Params(),
        )
    with pytest.raises(SystemExit) as exit_info:  # on the command line: exit 2 (one line)
        parse_config("moco-v2", ["--data", "fashion-mnist", "--batch-size", "12"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------- MoCo v3


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    values = [cosine_momentum(0.99, p / 10) for p in range(11)]
    assert values == sorted(values)


def test_mocov3_momentum_update_follows_the_schedule():
    v3 = MoCoV3("resnet18", TINY, dim=8, mlp_dim=16, momentum=0.9)
    with torch.no_grad():
        for param in v3.base_encoder.parameters():
            param.add_(1.0)
    before_q = [p.clone() for p in v3.base_encoder.parameters()]
    before_k = [p.clone() for p in v3.momentum_encoder.parameters()]
    v3.on_step_end(0.5)
    m = 1 - 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.1  # 0.95
    assert v3.current_momentum == pytest.approx(m)
    for q, k_old, k_new in zip(before_q, before_k, v3.momentum_encoder.parameters(), strict=True):
        torch.testing.assert_close(k_new, m * k_old + (1 - m) * q)
    v3.on_step_end(1.0)  # momentum 1: the momentum encoder no longer moves
    frozen = [p.clone() for p in v3.momentum_encoder.parameters()]
    with torch.no_grad():
        for param in v3.base_encoder.parameters():
            param.add_(1.0)
    v3.on_step_end(1.0)
    for old, new in zip(frozen, v3.momentum_encoder.parameters(), strict=True):
        torch.testing.assert_close(new, old)


def test_mocov3_heads_and_loss_equals_formula():
    torch.manual_seed(0)
    v3 = MoCoV3("resnet18", TINY, dim=8, mlp_dim=16)
    projector = v3.base_encoder.head.mlp
    assert [type(m).__name__ for m in projector][-2:] == ["Linear", "BatchNorm1d"]
    assert not projector[-1].affine and len([m for m in projector if type(m).__name__ == "Linear"]) == 3
    assert not hasattr(v3.momentum_encoder, "predictor")
    x1, x2 = views(6)
    out = v3([x1, x2], torch.arange(6))
    with torch.no_grad():
        q1, q2 = (F.normalize(v3.predictor(v3.base_encoder(x)), dim=1) for x in (x1, x2))
        k1, k2 = (F.normalize(v3.momentum_encoder(x), dim=1) for x in (x1, x2))

    def ctr(q: torch.Tensor, k: torch.Tensor) -> float:
        total = 0.0
        for i in range(6):
            denominator = sum(math.exp(dot(q[i], k[j]) / 0.2) for j in range(6))
            total += -math.log(math.exp(dot(q[i], k[i]) / 0.2) / denominator) / 6
        return total * 2 * 0.2

    assert out.loss.item() == pytest.approx(ctr(q1, k2) + ctr(q2, k1), rel=1e-4)


# ---------------------------------------------------------------- SimCLR


def test_simclr_loss_equals_formula():
    torch.manual_seed(0)
    simclr = SimCLR("resnet18", TINY, dim=8)
    x1, x2 = views(4)
    out = simclr([x1, x2], torch.arange(4))
    with torch.no_grad():
        z = F.normalize(simclr.encoder(torch.cat([x1, x2])), dim=1)  # 2N views, BN over all
    expected = 0.0
    for a in range(8):
        denominator = sum(math.exp(dot(z[a], z[j]) / 0.5) for j in range(8) if j != a)
        expected += -math.log(math.exp(dot(z[a], z[(a + 4) % 8]) / 0.5) / denominator) / 8
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    head = simclr.encoder.head
    assert head.spec["hidden_dim"] == simclr.encoder.backbone.feature_dim and head.out_dim == 8
    assert simclr.sync_batch_norm


def test_simclr_multi_crop_runs_local_views_through_the_encoder_and_averages_the_pairs():
    torch.manual_seed(0)
    simclr = SimCLR("resnet18", TINY, dim=8, temperature=0.2)
    full = views(4)
    local = [torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    out = simclr(full + local, torch.arange(4))
    with torch.no_grad():
        z1, z2 = simclr.encoder(torch.cat(full)).chunk(2)  # BN over the 2N full views, as the method
        zl = simclr.encoder(torch.cat(local)).chunk(2)  # and over the local ones, a pass of their own
    pairs = [(z1, z2), (z1, zl[0]), (z2, zl[0]), (z1, zl[1]), (z2, zl[1])]
    expected = sum(nt_xent(a, b, 0.2).loss.item() for a, b in pairs) / 5
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    out.loss.backward()
    assert all(p.grad is not None for p in simclr.parameters() if p.requires_grad)


def test_simclr_debias_and_hardness_flags_reach_the_loss(capsys):
    config = parse("simclr", ["--debias", "0.1", "--hardness", "1.0"])
    torch.manual_seed(0)
    simclr = build_method(config, num_samples=4, in_channels=1)
    x1, x2 = views(4)
    out = simclr([x1, x2], torch.arange(4))
    with torch.no_grad():
        z1, z2 = simclr.encoder(torch.cat([x1, x2])).chunk(2)
    expected = debiased_nt_xent(z1, z2, config.params.temperature, tau_plus=0.1, beta=1.0)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-4)
    assert out.loss.item() != pytest.approx(nt_xent(z1, z2, config.params.temperature).loss.item(), rel=1e-3)
    for argv, message in (
        (["--debias", "1"], "--debias must be in [0, 1)"),
        (["--hardness", "-1"], "--hardness"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse("simclr", argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("moco-v2", ["--local-crops", "2"], "--local-crops: moco-v2 has no multi-crop loss"),
        ("instdisc", ["--local-crops", "2"], "--local-crops: instdisc has no multi-crop loss"),
        ("simclr", ["--local-crops", "2", "--local-crop-scale", "0.5", "0.1"], "0 < low <= high <= 1"),
        ("simclr", ["--local-crops", "-1"], "--local-crops must be >= 0"),
    ],
)
def test_local_crops_are_refused_for_other_methods_and_bad_values(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a usage error: exit 2, one line
        parse(name, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_local_crops_default_to_swavs_size_ratio():
    config = parse("simclr", ["--local-crops", "4"])
    assert (config.local_crops, config.local_size, config.local_crop_scale) == (4, 12, (0.05, 0.4))
    assert parse("simclr", ["--local-crops", "2", "--local-crop-size", "16"]).local_size == 16
    assert parse("simclr", []).local_crops == 0  # the paper's two views


# ---------------------------------------------------------------- InstDisc


def test_memory_bank_update_formula():
    bank = MemoryBank(5, 3, momentum=0.5)
    before = bank.bank.clone()
    features = F.normalize(torch.randn(2, 3), dim=1)
    bank.update(features, torch.tensor([4, 1]))
    for row, index in enumerate([4, 1]):
        expected = F.normalize(0.5 * before[index] + 0.5 * features[row], dim=0)
        torch.testing.assert_close(bank.bank[index], expected)
    torch.testing.assert_close(bank.bank[[0, 2, 3]], before[[0, 2, 3]])
    torch.testing.assert_close(bank.bank.norm(dim=1), torch.ones(5))
    assert bank.visited.tolist() == [False, True, False, False, True]


def test_instdisc_full_softmax_loss_and_proximal_term_equal_formula():
    torch.manual_seed(0)
    model = InstDisc("resnet18", TINY, num_samples=10, nce_k=0, proximal_weight=50.0)
    x = views(4, count=1)
    indices = torch.tensor([7, 2, 9, 0])
    model(x, indices)  # first visit: fills the entries, no proximal term yet (random init)
    bank = model.memory.bank.clone()
    out = model(x, indices)
    with torch.no_grad():
        f = F.normalize(model.encoder(x[0]), dim=1)
    nll = proximal = 0.0
    for b, i in enumerate(indices.tolist()):
        denominator = sum(math.exp(dot(f[b], bank[j]) / 0.07) for j in range(10))
        nll += -math.log(math.exp(dot(f[b], bank[i]) / 0.07) / denominator) / 4
        proximal += 50.0 * float(((f[b] - bank[i]) ** 2).sum()) / 4
    assert out.metrics["loss/proximal"].item() == pytest.approx(proximal, rel=1e-4)
    assert out.loss.item() == pytest.approx(nll + proximal, rel=1e-4)
    out.loss.backward()  # the in-place bank update must not break the graph
    assert model.encoder.head.fc.weight.grad.abs().sum() > 0
    expected_bank = F.normalize(0.5 * bank[indices] + 0.5 * f, dim=1)
    torch.testing.assert_close(model.memory.bank[indices], expected_bank)


def test_memory_bank_first_visit_fill_writes_only_unvisited_entries():
    bank = MemoryBank(5, 3, momentum=0.5)
    bank.update(F.normalize(torch.randn(1, 3), dim=1), torch.tensor([2]))
    before = bank.bank.clone()
    features = F.normalize(torch.randn(3, 3), dim=1)
    filled = bank.fill_unvisited(features, torch.tensor([4, 2, 0]))
    assert filled.tolist() == [True, False, True]
    torch.testing.assert_close(bank.bank[[4, 0]], features[[0, 2]])  # the feature itself, no random mix
    torch.testing.assert_close(bank.bank[[1, 2, 3]], before[[1, 2, 3]])  # visited and untouched kept
    assert bank.visited.tolist() == [True, False, True, False, True]


def test_instdisc_first_visit_bank_softmax_equals_formula_with_the_features_as_their_own_entries():
    torch.manual_seed(0)
    model = InstDisc("resnet18", TINY, num_samples=10, nce_k=0, proximal_weight=50.0, bank_init="first-visit")
    x = views(4, count=1)
    indices = torch.tensor([7, 2, 9, 0])
    random_bank = model.memory.bank.clone()
    out = model(x, indices)
    with torch.no_grad():
        f = F.normalize(model.encoder(x[0]), dim=1)
    bank = random_bank.clone()
    bank[indices] = f  # first visits: each instance's entry is its own feature before the loss
    nll = 0.0
    for b in range(len(indices)):
        denominator = sum(math.exp(dot(f[b], bank[j]) / 0.07) for j in range(10))
        nll += -math.log(math.exp(1.0 / 0.07) / denominator) / 4  # positive: f . f = 1
    assert out.metrics["loss/proximal"].item() == 0.0  # no previous feature on a first visit
    assert out.loss.item() == pytest.approx(nll, rel=1e-4)
    torch.testing.assert_close(model.memory.bank[indices], f)  # momentum mix of f with f is f
    torch.testing.assert_close(model.memory.bank[[1, 3]], random_bank[[1, 3]])
    assert model.memory.visited[indices].all() and not model.memory.visited[[1, 3]].any()


def test_instdisc_small_images_use_the_exact_softmax_and_first_visit_bank_photos_the_paper(tmp_path):
    small = parse("instdisc", [])  # Fashion-MNIST, 28 px
    assert (small.params.nce_k, small.params.proximal_weight, small.params.bank_init) == (
        0,
        0.0,
        "first-visit",
    )
    assert small.source("nce_k") == SMALL_IMAGE
    for i in range(2):
        Image.new("RGB", (120, 100), (i * 90, 20, 40)).save(tmp_path / f"{i}.png")
    photos = parse("instdisc", [], data=f"folder:{tmp_path}")
    assert (photos.params.nce_k, photos.params.proximal_weight, photos.params.bank_init) == (
        4096,
        50.0,
        "random",
    )
    paper = parse("instdisc", ["--nce-k", "4096", "--proximal-lambda", "50", "--bank-init", "random"])
    assert (paper.params.nce_k, paper.params.bank_init) == (4096, "random")  # the paper's path, by flags


def test_instdisc_refuses_the_exact_softmax_over_a_data_set_too_large_for_it():
    with pytest.raises(ConfigError, match="--nce-k 4096"):
        InstDisc.from_config(
            InstDisc.Params(nce_k=0), "resnet18", TINY, num_samples=EXACT_SOFTMAX_MAX_SAMPLES + 1
        )


def test_instdisc_nce_loss_equals_formula_with_fixed_normaliser():
    torch.manual_seed(0)
    n, m, tau = 50, 6, 0.07
    model = InstDisc("resnet18", TINY, num_samples=n, nce_k=m, proximal_weight=0.0)
    x = views(3, count=1)
    indices = torch.tensor([5, 17, 33])
    torch.manual_seed(123)
    bank = model.memory.bank.clone()
    first = model(x, indices)
    z = model.nce_normaliser.item()
    with torch.no_grad():
        f = F.normalize(model.encoder(x[0]), dim=1)
    torch.manual_seed(123)
    candidates = sample_noise_indices(3, m, n, indices)  # the same draws as inside forward
    scores = [[dot(f[b], bank[j]) for j in candidates[b].tolist()] for b in range(3)]
    expected_z = n * float(np.mean([math.exp(s / tau) for row in scores for s in row]))
    assert z == pytest.approx(expected_z, rel=1e-4)
    expected = 0.0
    for row in scores:
        p = [math.exp(s / tau) / z for s in row]
        expected += (
            -(math.log(p[0] / (p[0] + m / n)) + sum(math.log(m / n / (pj + m / n)) for pj in p[1:])) / 3
        )
    assert first.loss.item() == pytest.approx(expected, rel=1e-4)
    positive = np.mean([row[0] for row in scores])
    noise = np.mean([s for row in scores for s in row[1:]])
    assert first.metrics["instance/positive_similarity"].item() == pytest.approx(positive, abs=1e-5)
    assert first.metrics["nce/noise_similarity"].item() == pytest.approx(noise, abs=1e-5)
    model(x, indices)
    assert model.nce_normaliser.item() == z  # fixed after the first batch


# ---------------------------------------------------------------- NNCLR


def test_nnclr_loss_equals_formula_with_the_support_sets_nearest_neighbours():
    torch.manual_seed(0)
    nnclr = NNCLR("resnet18", TINY, dim=8, hidden_dim=16, pred_hidden_dim=16, support_size=10)
    support = nnclr.support.clone()  # the set the step searches, before it receives view 1
    x1, x2 = views(6)
    out = nnclr([x1, x2], torch.arange(6))
    with torch.no_grad():
        z = nnclr.encoder(torch.cat([x1, x2]))  # 2NxC, BN over both views as in the step
        z1, z2 = F.normalize(z, dim=1).chunk(2)
        p1, p2 = F.normalize(nnclr.predictor(z), dim=1).chunk(2)

    def neighbour(z: torch.Tensor) -> torch.Tensor:  # by distance, as the paper writes it
        return support[min(range(10), key=lambda j: float((z - support[j]).norm()))]

    def loss(z: torch.Tensor, p: torch.Tensor) -> float:
        total = 0.0
        for i in range(6):
            anchor = neighbour(z[i])
            denominator = sum(math.exp(dot(anchor, p[k]) / 0.1) for k in range(6))
            total += -math.log(math.exp(dot(anchor, p[i]) / 0.1) / denominator) / 6
        return total

    assert out.loss.item() == pytest.approx((loss(z1, p2) + loss(z2, p1)) / 2, rel=1e-4)
    # the support set received view 1's projections (FIFO: slots 0..5), the rest is untouched
    torch.testing.assert_close(nnclr.support[:6], z1, atol=1e-6, rtol=0)
    torch.testing.assert_close(nnclr.support[6:], support[6:])
    assert int(nnclr.support_ptr) == 6


def test_nnclr_support_set_travels_in_the_state_dict_and_wraps_around():
    nnclr = NNCLR("resnet18", TINY, dim=3, hidden_dim=8, pred_hidden_dim=8, support_size=5)
    for step in range(2):
        nnclr([*views(4, seed=step)], torch.arange(4))
    # 8 projections into 5 slots: the second step's last three wrapped to slots 0..2
    assert int(nnclr.support_ptr) == 8 % 5
    state = nnclr.state_dict()
    assert {"support", "support_ptr"} <= set(state) and state["support"].shape == (5, 3)
    torch.testing.assert_close(state["support"].norm(dim=1), torch.ones(5))


def test_nnclr_small_image_recipe_and_a_bad_support_size(capsys):
    config = parse("nnclr", [])
    assert (config.params.temperature, config.params.support_size, config.params.dim) == (0.1, 16_384, 256)
    assert (config.batch_size, config.lr, config.augmentation) == (256, 1.2, "simclr-noflip")
    with pytest.raises(SystemExit) as exit_info:  # a usage error: exit 2, one line
        parse("nnclr", ["--support-size", "0"])
    assert exit_info.value.code == 2
    assert "--support-size and --temperature must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------- all methods


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_one_step_and_exports_its_encoder(name, tmp_path):
    torch.manual_seed(0)
    extra = {"instdisc": ["--nce-k", "16"], "moco-v1": ["--moco-k", "24"], "moco-v2": ["--moco-k", "24"]}
    if name == "neighbours":  # fine-tunes a finished encoder: one of the same network
        simclr = build_method(parse("simclr", []), 40, 1)
        init = make_encoder_record(
            "simclr",
            simclr.encoder_spec(),
            simclr.embedding_network(),
            simclr.embed_dim(),
            28,
            1,
            [0.5],
            [0.5],
        )
        save_encoder(tmp_path / "init.pt", init)
        extra["neighbours"] = ["--init", str(tmp_path / "init.pt")]
    method = build_method(parse(name, ["--batch-size", "8", *extra.get(name, [])]), 40, 1)
    method.train()
    out = method(views(8, method.num_views), torch.arange(8))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    optimiser = torch.optim.SGD(trainable, lr=0.1)
    optimiser.step()
    method.on_step_end(0.1)

    network = method.embedding_network().eval()
    record = make_encoder_record(
        name, method.encoder_spec(), network, method.embed_dim(), SIZE, 1, [0.5], [0.5]
    )
    save_encoder(tmp_path / "encoder.pt", record)
    encoder = Encoder.load(tmp_path / "encoder.pt")
    images = torch.randint(0, 256, (3, 1, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        expected = F.normalize(network((images.float() / 255 - 0.5) / 0.5), dim=1).numpy()
    vectors = encoder.embed(images)
    assert vectors.shape == (3, 128 if name == "instdisc" else 32)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("instdisc", {"optimizer": "sgd", "lr": 0.03, "weight_decay": 5e-4, "nce_k": 4096, "nce_t": 0.07}),
        ("moco-v1", {"optimizer": "sgd", "lr": 0.03, "moco_t": 0.07, "moco_k": 65536, "mlp": False}),
        (
            "moco-v2",
            {"optimizer": "sgd", "moco_t": 0.2, "moco_m": 0.999, "mlp": True, "augmentation": "mocov2"},
        ),
        (
            "moco-v3",
            {"optimizer": "lars", "moco_t": 0.2, "moco_m": 0.99, "moco_dim": 256, "augmentation": "mocov3"},
        ),
        ("simclr", {"optimizer": "lars", "lr": 0.3, "temperature": 0.5, "batch_size": 4096, "proj_dim": 128}),
        (
            "nnclr",
            {"optimizer": "lars", "temperature": 0.1, "support_size": 98_304, "augmentation": "mocov3"},
        ),
    ],
)
def test_paper_defaults_and_help(name, expected, tmp_path):
    for i in range(2):  # photos (>= 96 px): the papers' defaults, untouched by the small-image recipe
        Image.new("RGB", (120, 100), (i * 90, 20, 40)).save(tmp_path / f"{i}.png")
    config = parse(name, [], data=f"folder:{tmp_path}")
    assert {key: by_flag(config)[key] for key in expected} == expected
    assert "paper" in build_parser(method_class(name), "test", "").format_help()


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        method_class("byol")
