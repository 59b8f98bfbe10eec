"""The typed run configuration: layering (paper < small-image < file < flags), defaults that follow
the data, validation with one-line errors, and the whole config stored in every checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import simclr
from training.cli import parse_config
from training.config import FILE, FLAG, PAPER, SMALL_IMAGE, RunConfig
from training.methods.simclr import SimCLR

TINY = ["--arch", "resnet18", "--width", "0.0625", "--knn-every", "0", "--no-tensorboard", "--no-progress"]


def image_folder(root: Path, size: int, count: int, suffix: str) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}{suffix}")
    return root


def test_a_file_sets_values_and_flags_override_it(tmp_path):
    run_toml = tmp_path / "run.toml"
    run_toml.write_text("lr = 0.5\nbatch-size = 64\ntemperature = 0.1\nlr_steps = [3, 4]\nmomentum = 0.8\n")
    config, _ = parse_config("simclr", ["--data", "fashion-mnist", "--config", str(run_toml), "--lr", "0.25"])
    assert config.lr == 0.25 and config.source("lr") == FLAG  # the flag wins over the file
    assert config.batch_size == 64 and config.source("batch_size") == FILE
    assert config.lr_steps == (3.0, 4.0) and config.optimizer_momentum == 0.8
    assert config.params.temperature == 0.1 and config.source("temperature") == FILE  # a method setting
    assert config.optimizer == "lars" and config.source("optimizer") == PAPER
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # one config per run, never written to


@pytest.mark.parametrize(
    ("argv", "toml", "message"),
    [
        (["--batch-size", "0"], None, "--batch-size must be positive"),
        (["--lr-schedule", "step"], None, "--lr-schedule step needs --lr-steps"),
        ([], 'lr = "fast"\n', "lr must be float, got 'fast'"),
        ([], "learning_rate = 0.1\n", "unknown setting 'learning_rate'"),
        ([], "lr = [1, 2\n", "not a readable TOML file"),
        (["--amp", "fp16", "--device", "cpu"], None, "--amp fp16 needs a CUDA device"),
    ],
)
def test_invalid_settings_are_one_line_and_exit_2(argv, toml, message, tmp_path, capsys):
    if toml is not None:
        (tmp_path / "run.toml").write_text(toml)
        argv = [*argv, "--config", str(tmp_path / "run.toml")]
    with pytest.raises(SystemExit) as exit_info:
        simclr.main(["--data", "fashion-mnist", *argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_a_folder_of_small_pngs_gets_its_native_crop_the_small_stem_and_the_small_image_recipe(tmp_path):
    folder = image_folder(tmp_path / "small", 28, 6, ".png")
    config, _ = parse_config("simclr", ["--data", f"folder:{folder}"])
    assert (config.crop_size, config.small_stem) == (28, True)
    for name, value in SimCLR.small_image_defaults.items():
        holder = config.params if hasattr(config.params, name) else config  # method settings or run's
        assert getattr(holder, name) == value and config.source(name) == SMALL_IMAGE
    assert config.optimizer == "lars"  # what the recipe does not change stays the paper's
    flagged, _ = parse_config(
        "simclr", ["--data", f"folder:{folder}", "--crop-size", "24", "--no-small-stem"]
    )
    assert (flagged.crop_size, flagged.small_stem) == (24, False)  # explicit flags always win


def test_a_folder_of_photos_gets_the_paper_defaults(tmp_path):
    folder = image_folder(tmp_path / "photos", 200, 4, ".jpg")
    config, _ = parse_config("simclr", ["--data", f"folder:{folder}"])
    assert (config.crop_size, config.small_stem) == (224, False)
    assert (config.batch_size, config.warmup_epochs, config.lr) == (4096, 10.0, 0.3)
    assert config.source("batch_size") == PAPER


def test_the_settings_are_printed_at_start_and_the_checkpoint_stores_the_whole_config(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", "fashion-mnist", "--subset", "64", "--batch-size", "32", "--max-steps", "1", *TINY]
    assert simclr.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "optimizer=lars [paper]" in printed
        and "lr=1.2 [small-image]" in printed
        and "crop_size=28 [data]" in printed
        and "batch_size=32 [flag]" in printed
    )
    config, _ = parse_config("simclr", [*argv, "--out", str(out)])
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["config"] == config.to_dict()
    assert saved["config"]["params"]["temperature"] == 0.2 and saved["config"]["sources"]["lr"] == SMALL_IMAGE
    assert saved["config"]["sources"]["optimizer"] == PAPER
    rebuilt = RunConfig(
        **{k: v for k, v in saved["config"].items() if k not in ("params", "sources")}
        | {"out": Path(saved["config"]["out"]), "adam_betas": tuple(saved["config"]["adam_betas"])}
        | {"lr_steps": tuple(saved["config"]["lr_steps"])},
        params=SimCLR.Params(**saved["config"]["params"]),
        sources=tuple(saved["config"]["sources"].items()),
    )
    assert rebuilt.to_dict() == config.to_dict()


def test_the_papers_step_decay_follows_the_runs_length_unless_given():
    paper, _ = parse_config("instdisc", ["--data", "fashion-mnist"])
    assert (paper.epochs, paper.lr_steps, paper.source("lr_steps")) == (200, (120.0, 160.0), PAPER)
    # 120 and 160 of 200 epochs: a 100-epoch run decays at 60 and 80 (without scaling it never would)
    shorter, _ = parse_config("instdisc", ["--data", "fashion-mnist", "--epochs", "100"])
    assert shorter.lr_steps == (60.0, 80.0) and shorter.source("lr_steps").startswith(PAPER + ", scaled")
    given, _ = parse_config("instdisc", ["--data", "fashion-mnist", "--epochs", "100", "--lr-steps", "50"])
    assert given.lr_steps == (50.0,) and given.source("lr_steps") == FLAG
