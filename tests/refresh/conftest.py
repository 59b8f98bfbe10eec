"""Refresh-loop fixtures: one labelled Fashion-MNIST catalogue per module (uploaded over real HTTP
into the session's MongoDB-wire server), a DATA_DIR per test, and the refresh as a subprocess."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # shared service_helpers

from encoder_files import install_encoder
from refresh_helpers import CATALOGUE_SIZE, CatalogueDb  # noqa: E402
from service_helpers import fashion_mnist_pngs, service_client, service_settings, upload_labelled  # noqa: E402


@pytest.fixture(scope="module")
def catalogue(
    tmp_path_factory: pytest.TempPathFactory, encoder_file: Path, mongo_uri: str, module_db_name: str
) -> CatalogueDb:
    """CATALOGUE_SIZE labelled Fashion-MNIST test images uploaded through POST /images."""
    directory = tmp_path_factory.mktemp("upload")
    install_encoder(encoder_file, directory / "model.pt")
    items = fashion_mnist_pngs(0, CATALOGUE_SIZE)
    settings = service_settings(directory, mongo_uri, module_db_name)
    with service_client(settings) as client:
        ids = upload_labelled(client, items)
    return CatalogueDb(mongo_uri, module_db_name, ids, [l for _, l in items], [d for d, _ in items])


@pytest.fixture
def data_dir(tmp_path: Path, encoder_file: Path) -> Path:
    """A DATA_DIR holding model.pt: the service bootstraps from this random encoder."""
    directory = tmp_path / "data"
    directory.mkdir()
    install_encoder(encoder_file, directory / "model.pt")
    return directory


@pytest.fixture
def service_on(catalogue: CatalogueDb, data_dir: Path):
    """`with service_on(**settings) as client:` the service on the shared catalogue over real HTTP."""

    def start(**overrides) -> Iterator[httpx.Client]:
        settings = service_settings(data_dir, catalogue.uri, catalogue.db_name, **overrides)
        return service_client(settings)

    return start
