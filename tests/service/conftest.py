"""Service fixtures: the tiny encoder, a running service per test, and a shared labelled catalogue."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
from encoder_files import install_encoder
from service_helpers import (
    CATALOGUE_SIZE,
    Catalogue,
    fashion_mnist_pngs,
    service_client,
    service_settings,
    upload_labelled,
)


@pytest.fixture
def data_dir(tmp_path: Path, encoder_file: Path) -> Path:
    """A DATA_DIR holding model.pt (the service bootstraps an empty index from it)."""
    install_encoder(encoder_file, tmp_path / "model.pt")
    return tmp_path


ServiceFactory = Callable[..., AbstractContextManager[httpx.Client]]


@pytest.fixture
def start_service(data_dir: Path, mongo_uri: str, mongo_db_name: str) -> ServiceFactory:
    """`with start_service(**settings) as client:` a service over real HTTP and an httpx client."""

    def start(**overrides) -> AbstractContextManager[httpx.Client]:
        settings = service_settings(data_dir, mongo_uri, mongo_db_name, **overrides)
        return service_client(settings)

    return start


@pytest.fixture(scope="module")
def catalogue(
    tmp_path_factory: pytest.TempPathFactory, encoder_file: Path, mongo_uri: str, module_db_name: str
) -> Iterator[Catalogue]:
    """A service with CATALOGUE_SIZE labelled Fashion-MNIST test images ingested over HTTP."""
    directory = tmp_path_factory.mktemp("catalogue")
    install_encoder(encoder_file, directory / "model.pt")
    settings = service_settings(directory, mongo_uri, module_db_name)
    items = fashion_mnist_pngs(0, CATALOGUE_SIZE)
    with service_client(settings) as client:
        ids = upload_labelled(client, items, tags="fmnist")
        yield Catalogue(client, ids, [label for _, label in items], [data for data, _ in items], directory)
