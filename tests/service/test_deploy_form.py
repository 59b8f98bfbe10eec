"""A service that bootstraps from a bare encoder file (no deploy form beside it) writes the form
first, so the published version carries it and every start serves the compiled form, not the eager
training graph; where the form cannot be written, the model is folded at load and still serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from service_helpers import service_settings, with_engine

import training.inference
from index.store import INFERENCE_ENCODER_FILE, IndexStore
from service.catalogue import Limits
from service.db import Database
from service.engine import Engine, Loaded
from service.random_model import write_random_encoder
from training.encoder import Encoder


@pytest.fixture
def bare_data_dir(tmp_path: Path) -> Path:
    write_random_encoder(tmp_path / "model.pt", width=0.25, seed=5)
    assert not (tmp_path / INFERENCE_ENCODER_FILE).exists()
    return tmp_path


IMAGES = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def loaded_state(settings) -> tuple[str, np.ndarray, str]:
    """(runtime, embeddings of IMAGES, version) of what the engine loads."""

    async def body(
        engine: Engine, db: Database, loaded: Loaded, limits: Limits
    ) -> tuple[str, np.ndarray, str]:
        return loaded.encoder.runtime, loaded.encoder.embed(IMAGES), loaded.version

    return with_engine(settings, body)


def test_a_bare_model_is_served_in_its_compiled_form(bare_data_dir: Path, mongo_uri, mongo_db_name) -> None:
    settings = service_settings(bare_data_dir, mongo_uri, mongo_db_name)
    runtime, vectors, version = loaded_state(settings)

    assert runtime in ("onnxruntime", "torchscript")
    assert (bare_data_dir / INFERENCE_ENCODER_FILE).is_file()  # written beside the model
    store = IndexStore(settings.index_dir)
    assert (store.version_dir(version) / INFERENCE_ENCODER_FILE).is_file()  # and carried by the version
    exact = Encoder.load(bare_data_dir / "model.pt").embed(IMAGES)  # the training graph
    assert np.abs(vectors - exact).max() < 1e-4


def test_where_the_form_cannot_be_written_the_model_is_folded_at_load(
    bare_data_dir: Path, mongo_uri, mongo_db_name, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args, **kwargs) -> None:
        raise PermissionError(13, "Permission denied", str(bare_data_dir))

    monkeypatch.setattr(training.inference, "save_encoder", read_only)
    runtime, vectors, _ = loaded_state(service_settings(bare_data_dir, mongo_uri, mongo_db_name))

    exact = Encoder.load(bare_data_dir / "model.pt").embed(IMAGES)
    assert runtime == "eager" and np.abs(vectors - exact).max() < 1e-4
    assert not (bare_data_dir / INFERENCE_ENCODER_FILE).exists()
