"""`--init current` in a catalogue refresh: the encoder of the current index version (what the
service serves), filled in at parse time; `training.neighbours` starts from it without the flag; both
refused in one line where there is no served encoder (another method's refresh keeps its random
start)."""

from __future__ import annotations

from pathlib import Path

import pytest

from index.search_index import SearchIndex
from index.store import IndexStore
from service.refresh.mode import CATALOGUE_MODE
from training.cli import parse_config
from training.config import INIT


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty DATA_DIR for the refresh's settings (no index version yet)."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    for name in ("INDEX_DIR", "INDEX_STORAGE_URL", "MODEL_CHECKPOINT"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def parse(method: str, *argv: str):
    return parse_config(method, list(argv), prog=method, mode=CATALOGUE_MODE)


def test_init_current_is_the_current_versions_encoder(data_dir: Path, encoder_file: Path) -> None:
    store = IndexStore(data_dir / "index")
    store.publish(SearchIndex.empty_flat(16), encoder_path=encoder_file)
    newest = store.publish(SearchIndex.empty_flat(16), encoder_path=encoder_file)
    served = store.version_dir(newest) / "encoder.pt"

    config, _ = parse("moco-v2", "--init", "current")
    assert config.init == str(served) and config.source("init") == "catalogue"
    assert (config.width, config.crop_size, config.small_stem) == (0.25, 28, True)
    assert config.source("width") == INIT
    neighbours, _ = parse("neighbours")  # the stage fine-tunes the served encoder by default
    assert neighbours.init == str(served) and neighbours.width == 0.25
    explicit, _ = parse("neighbours", "--init", str(encoder_file))  # a named file still wins
    assert explicit.init == str(encoder_file) and explicit.source("init") == "flag"
    plain, _ = parse("moco-v2")  # other methods train from scratch unless asked
    assert plain.init is None


def test_without_a_served_encoder_it_is_refused_in_one_line(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (("neighbours",), ("moco-v2", "--init", "current")):
        with pytest.raises(SystemExit) as exit_info:
            parse(*argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--init current: the service has no index version with an encoder yet" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (data_dir / "refresh").exists()  # nothing written


def test_init_current_outside_a_refresh_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("neighbours", "--data", "fashion-mnist", "--init", "current")
    assert exit_info.value.code == 2
    assert "only a catalogue refresh (no --data) has one" in capsys.readouterr().err
