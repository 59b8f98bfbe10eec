"""The training commands: paper defaults in --help, one-line errors with the right exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import instdisc, moco, simclr

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--data",
    "fashion-mnist",
    "--arch",
    "resnet18",
    "--width",
    "0.0625",
    "--no-tensorboard",
    "--no-progress",
]
TINY += ["--knn-every", "0"]


def run_command(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # busy shared cores: one thread is many times faster
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )


def help_text(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks


HELP_EXPECTATIONS = [
    (
        moco.main,
        ["--version", "1"],
        [
            "--lr LR base lr for a batch of 256; used: lr * batch-size / 256 (default: 0.03, the paper's)",
            "(default: step, the paper's)",
            "(default: [120, 160], the paper's)",
            "softmax temperature (default: 0.07, the paper's)",
            "(default: instdisc, the paper's)",
        ],
    ),
    (
        moco.main,
        ["--version", "2"],
        [
            "(default: 0.03, the paper's)",
            "(default: cosine, the paper's)",
            "temperature (default: 0.2, the paper's)",
            "(default: mocov2, the paper's)",
        ],
    ),
    (
        moco.main,
        ["--version", "3"],
        [
            "optimiser (default: lars, the paper's)",
            "(default: 0.6, the paper's)",
            "warm-up before the schedule (default: 10, the paper's; images <= 64 px: 0.05)",
        ],
    ),
    (
        simclr.main,
        [],
        [
            "optimiser (default: lars, the paper's)",
            "(default: 0.3, the paper's; images <= 64 px: 1.2)",
            "(default: 1e-06, the paper's)",
            "(default: simclr, the paper's; images <= 64 px: simclr-noflip)",
            "(default: 0.5, the paper's; images <= 64 px: 0.2)",
        ],
    ),
    (
        instdisc.main,
        [],
        [
            "(default: 0.0005, the paper's)",
            "(default: [120, 160], the paper's)",
            "(default: instdisc, the paper's)",
            "--nce-k",
        ],
    ),
]


@pytest.mark.parametrize(("main", "argv", "expected"), HELP_EXPECTATIONS)
def test_help_shows_each_papers_defaults(main, argv, expected, capsys):
    text = help_text(main, argv, capsys)
    for fragment in expected:
        assert fragment in text, fragment


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2_with_one_line(tmp_path):
    unknown_arch = run_command("training.simclr", "--arch", "resnet9000", "--out", str(tmp_path))
    assert_one_line_error(unknown_arch, 2, "argument --arch: invalid choice: 'resnet9000'")
    splits = run_command("training.moco", *TINY, "--batch-size", "100", "--num-splits", "8")
    assert_one_line_error(splits, 2, "--batch-size 100 does not divide into --num-splits 8")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_runtime_errors_exit_1_with_one_line(tmp_path):
    missing = run_command(
        "training.instdisc", *TINY, "--resume", str(tmp_path / "nope.pt"), "--out", str(tmp_path)
    )
    assert_one_line_error(missing, 1, f"error: checkpoint not found: {tmp_path / 'nope.pt'}")
    (tmp_path / "empty").mkdir()
    empty = run_command(
        "training.simclr", *TINY, "--data", f"folder:{tmp_path / 'empty'}", "--out", str(tmp_path)
    )
    assert_one_line_error(empty, 1, "no image files")
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"]  # nothing half-written


def test_a_folder_with_a_corrupt_file_trains_and_reports_the_skip(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = tmp_path / "data" / ("shirts" if i % 2 else "shoes")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "data" / "shoes" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_command(
        "training.moco", "--version", "2", *TINY, "--data", f"folder:{tmp_path / 'data'}",
        "--crop-size", "32", "--batch-size", "16", "--moco-k", "64", "--epochs", "1",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "warning: folder:" in result.stderr
        and "skipped 1 unreadable image file(s): shoes/broken.png" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert (tmp_path / "run" / "encoder.pt").is_file() and (tmp_path / "run" / "checkpoint.pt").is_file()
