"""Mined-neighbour fine-tuning (`python -m training.neighbours`): the mining against brute force,
the draws against the drawable sets, the engine making the second view from the drawn image,
--init (weights, normalisation, settings, refusals) and exact resume with the mined table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_engine import assert_same_state, one_thread  # noqa: F401 (an autouse fixture)
from tiny_runs import tiny_trainer

import training.methods.neighbours as neighbours_module
from training.cli import build_trainer, parse_config
from training.config import SMALL_IMAGE
from training.encoder import read_encoder_record
from training.errors import TrainingError
from training.methods.neighbours import (
    MinedNeighbours,
    agreement_mask,
    mine_neighbours,
    mutual_mask,
    pixel_embedding,
)
from training.models import build_embedding_network
from training.neighbours import main

BACKBONE = {"in_channels": 1, "small_stem": True, "width": 0.0625}


@pytest.fixture(scope="module")
def init_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished (one-step) SimCLR encoder of the tiny runs' network, whitened as saved."""
    out = tmp_path_factory.mktemp("init")
    tiny_trainer("simclr", out, "--max-steps", "1").fit()
    return out / "encoder.pt"


def unit_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_mined_neighbours_are_the_nearest_other_images_block_by_block(monkeypatch):
    monkeypatch.setattr(neighbours_module, "MINING_BLOCK", 64)  # several blocks, one partial
    embeddings = unit_rows(300, 8)
    mined = mine_neighbours(embeddings, 5)
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)
    expected = similarity.argsort(dim=1, descending=True)[:, :5]
    assert torch.equal(mined, expected)
    assert not (mined == torch.arange(300).view(-1, 1)).any()  # never itself
    assert mine_neighbours(unit_rows(4, 3), 10).shape == (4, 3)  # at most the others


def test_mutual_neighbours_are_the_reciprocal_ones():
    mined = mine_neighbours(unit_rows(200, 6, seed=1), 4)
    mask = mutual_mask(mined)
    for i in range(200):
        for slot in range(4):
            j = int(mined[i, slot])
            assert bool(mask[i, slot]) == (i in mined[j].tolist())
    assert 0 < mask.float().mean() < 1  # some are, some are not


def test_agreement_is_membership_in_the_other_table_block_by_block(monkeypatch):
    monkeypatch.setattr(neighbours_module, "MINING_BLOCK", 64)
    mined = mine_neighbours(unit_rows(200, 6, seed=3), 4)
    others = mine_neighbours(unit_rows(200, 6, seed=3) + 0.3 * unit_rows(200, 6, seed=4), 7)
    mask = agreement_mask(mined, others)
    for i in range(200):
        for slot in range(4):
            assert bool(mask[i, slot]) == (int(mined[i, slot]) in others[i].tolist())
    assert 0 < mask.float().mean() < 1  # some agree, some do not


def test_the_pixel_view_is_whitened_raw_pixels_of_small_images():
    generator = torch.Generator().manual_seed(5)
    # 80 patterns with geometrically spaced strengths: distinct principal directions to compare
    patterns = torch.randn(80, 784, generator=generator) * 0.93 ** torch.arange(80.0).view(-1, 1)
    mix = torch.randn(300, 80, generator=generator) @ patterns
    images = (128 + 20 * mix).clamp(0, 255).round().to(torch.uint8).view(300, 1, 28, 28)
    view = pixel_embedding(images)
    assert view.shape == (300, 64)  # PIXEL_DIMS directions
    assert torch.allclose(view.norm(dim=1), torch.ones(300), atol=1e-5)
    assert torch.equal(view, pixel_embedding(images))  # seeded: every rank mines the same
    pixels = F.normalize(images.flatten(1).float(), dim=1)  # the direct formula
    centred = pixels - pixels.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / (len(pixels) - 1))
    top = eigenvalues.argsort(descending=True)[:64]
    direct = F.normalize(centred @ eigenvectors[:, top] * eigenvalues[top] ** -0.25, dim=1)
    direct = direct * (view * direct).sum(0).sign()  # each direction's sign is arbitrary
    assert torch.allclose(view, direct, atol=1e-3)
    photos = torch.randint(0, 256, (40, 3, 96, 96), dtype=torch.uint8, generator=generator)
    assert pixel_embedding(photos).shape == (40, 40)  # resized to 32 px; at most its 40 images' rank


def tiny_method(num_samples: int, **params) -> MinedNeighbours:
    return MinedNeighbours("resnet18", BACKBONE, num_samples, dim=16, **params)


def test_draws_come_only_from_the_drawable_neighbours_uniformly():
    embeddings = unit_rows(120, 6, seed=2)
    method = tiny_method(120, k=4, mutual=True)
    labels = torch.arange(120) % 3
    line = method.use_initial_embeddings(embeddings, labels)
    assert "without any" in line
    neighbours, drawable = method.neighbours, method.drawable
    assert torch.equal(neighbours, mine_neighbours(embeddings, 4))
    assert torch.equal(drawable, mutual_mask(neighbours))
    same = (labels[neighbours] == labels.view(-1, 1))[drawable].float().mean()
    assert f"{same:.1%} of their image's class" in line  # the purity, reported
    lonely = ~drawable.any(dim=1)
    assert lonely.any() and not lonely.all()  # both kinds are exercised
    torch.manual_seed(0)
    indices = torch.arange(120).repeat(200)
    first, drawn = method.view_sources(indices)
    assert torch.equal(first, indices)
    is_self = drawn == indices
    assert torch.equal(is_self, lonely[indices])  # p = 1: a neighbour whenever there is one
    slot = (neighbours[indices] == drawn.view(-1, 1)).float().argmax(dim=1)
    assert drawable[indices[~is_self], slot[~is_self]].all()  # and only a drawable one
    # uniform over an image's drawable neighbours: each drawn 200 / count times, within 5 sigma
    image = int(drawable.sum(dim=1).argmax())
    counts = torch.bincount(slot[(indices == image)], minlength=4)[drawable[image]].float()
    expected = 200 / len(counts)
    assert ((counts - expected).abs() < 5 * expected**0.5).all(), counts


def test_agree_pixels_keeps_only_the_neighbours_the_pixels_also_find():
    generator = torch.Generator().manual_seed(6)
    images = torch.randint(0, 256, (150, 1, 28, 28), dtype=torch.uint8, generator=generator)
    pixels = pixel_embedding(images)
    embeddings = F.normalize(pixels[:, :16] + 0.5 * unit_rows(150, 16, seed=7), dim=1)  # related views
    method = tiny_method(150, k=5, agree_pixels=20)
    line = method.use_initial_embeddings(embeddings, torch.arange(150) % 4, images)
    assert "(also in the pixels top 20)" in line
    expected = agreement_mask(mine_neighbours(embeddings, 5), mine_neighbours(pixels, 20))
    assert torch.equal(method.drawable, expected)
    assert 0 < expected.float().mean() < 1
    with pytest.raises(ValueError, match="needs the training images"):
        tiny_method(150, k=5, agree_pixels=20).use_initial_embeddings(embeddings)


def test_neighbour_p_mixes_in_the_image_itself_and_unmined_is_simclr():
    method = tiny_method(50, k=3, neighbour_p=0.3)
    indices = torch.arange(50).repeat(100)
    torch.manual_seed(1)
    assert torch.equal(method.view_sources(indices)[1], indices)  # nothing mined: itself
    method.use_initial_embeddings(unit_rows(50, 5))
    torch.manual_seed(1)
    share = (method.view_sources(indices)[1] != indices).float().mean()
    assert 0.25 < share < 0.35  # 5000 draws of p = 0.3: sigma 0.0065
    method = tiny_method(50, k=3, neighbour_p=0.0)
    method.use_initial_embeddings(unit_rows(50, 5))
    assert torch.equal(method.view_sources(indices)[1], indices)


def test_init_takes_the_encoders_network_weights_and_normalisation(init_encoder, tmp_path):
    record = read_encoder_record(init_encoder)
    argv = ["--data", "fashion-mnist", "--subset", "96", "--batch-size", "32", "--knn-every", "0"]
    config, _ = parse_config("neighbours", [*argv, "--init", str(init_encoder), "--out", str(tmp_path)])
    sources = dict(config.sources)
    for name, value in (("arch", "resnet18"), ("width", 0.0625), ("small_stem", True), ("crop_size", 28)):
        assert getattr(config, name) == value and sources[name] == "init encoder", name
    assert config.embedding_grid == record["network"]["grid"] == 2
    assert sources["lr"] == "recipe" and config.epochs == 3  # the measured recipe, named as such
    # small images draw only the neighbours the pixels also find; a flag still wins
    assert config.params.agree_pixels == 100 and sources["agree_pixels"] == SMALL_IMAGE
    flagged, _ = parse_config("neighbours", [*argv, "--init", str(init_encoder), "--agree-pixels", "0"])
    assert flagged.params.agree_pixels == 0 and flagged.source("agree_pixels") == "flag"
    trainer = build_trainer(config, torch.device("cpu"))
    assert (trainer.mean, trainer.std) == (record["mean"], record["std"])
    saved = build_embedding_network({k: v for k, v in record["network"].items() if k != "whitening"})
    saved.load_state_dict({k: v for k, v in record["state_dict"].items() if not k.startswith("whitening.")})
    ours = trainer.method.embedding_network().backbone.eval()
    theirs = saved.backbone.eval()
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():  # (channels_last in the trainer: other kernels, equal to rounding)
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-4, atol=1e-6)
    # mined in the encoder's own (whitened) retrieval embedding: a neighbour per image, not itself
    assert trainer.method.drawable.all()
    assert not (trainer.method.neighbours == torch.arange(96).view(-1, 1)).any()


def test_the_engine_makes_the_second_view_from_the_drawn_neighbour(init_encoder, tmp_path):
    trainer = tiny_trainer("neighbours", tmp_path, "--init", str(init_encoder))
    trainer.augment = lambda batch, view: batch.float()  # views that show which image they came from
    indices = torch.arange(16)
    torch.manual_seed(3)
    _, drawn = trainer.method.view_sources(indices)
    torch.manual_seed(3)
    first, second = trainer.views(indices)
    assert torch.equal(first, trainer.images[indices].float())
    assert torch.equal(second, trainer.images[drawn].float())
    assert not torch.equal(first, second)


def test_a_resumed_run_continues_exactly_with_the_mined_table(init_encoder, tmp_path):
    init = ["--init", str(init_encoder)]
    straight = tiny_trainer("neighbours", tmp_path / "straight", *init, "--max-steps", "4")
    straight.fit()
    tiny_trainer("neighbours", tmp_path / "split", *init, "--max-steps", "2").fit()
    resumed = tiny_trainer("neighbours", tmp_path / "split", *init, "--max-steps", "4", "--resume", "auto")
    resumed.fit()
    assert_same_state(straight.method, resumed.method)  # the neighbour table included
    assert not torch.equal(straight.method.neighbours[:, 0], torch.arange(96))


def test_bad_init_is_refused_in_one_line(init_encoder, tmp_path, capsys):
    base = ["--data", "fashion-mnist", "--subset", "96", "--knn-every", "0", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(base)
    assert exit_info.value.code == 2
    assert "give --init ENCODER" in capsys.readouterr().err
    not_an_encoder = tmp_path / "notes.txt"
    not_an_encoder.write_text("hello")
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--init", str(not_an_encoder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--init:" in err and "Traceback" not in err
    # another network than the encoder's: refused before any training, nothing written
    assert main([*base, "--init", str(init_encoder), "--width", "0.125", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "is not this run's" in err and "Traceback" not in err
    assert not (tmp_path / "encoder.pt").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--init", str(init_encoder), "--agree-pixels", "-1"])
    assert exit_info.value.code == 2
    assert "--agree-pixels 0 or more" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="is not this run's"):
        tiny_trainer("neighbours", tmp_path, "--init", str(init_encoder), "--width", "0.125")


@pytest.mark.parametrize("method", ["moco-v2", "moco-v3"])
def test_init_starts_a_momentum_encoder_equal_to_the_loaded_online_one(method, init_encoder, tmp_path):
    queue = ["--moco-k", "64"] if method == "moco-v2" else []
    trainer = tiny_trainer(method, tmp_path, "--init", str(init_encoder), *queue)
    model = trainer.method
    online, momentum = (
        (model.encoder_q, model.encoder_k)
        if method == "moco-v2"
        else (model.base_encoder, model.momentum_encoder)
    )
    record = read_encoder_record(init_encoder)
    assert torch.equal(online.backbone.conv1.weight, record["state_dict"]["backbone.conv1.weight"])
    for (name, ours), (_, theirs) in zip(
        online.state_dict().items(), momentum.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
