"""Refresh-loop fixtures: one labelled Fashion-MNIST catalogue per module (uploaded over real HTTP
into the session's MongoDB-wire server), a DATA_DIR per test, and the refresh as a subprocess."""

from __future__ import annotations

import shutil
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # shared service_helpers

from refresh_helpers import CATALOGUE_SIZE, CatalogueDb  # noqa: E402
from service_helpers import (  # noqa: E402
    fashion_mnist_pngs,
    running_service,
    service_settings,
    upload,
)


@pytest.fixture(scope="module")
def catalogue(
    tmp_path_factory: pytest.TempPathFactory, encoder_file: Path, mongo_uri: str, module_db_name: str
) -> CatalogueDb:
    """CATALOGUE_SIZE labelled Fashion-MNIST test images uploaded through POST /images."""
    directory = tmp_path_factory.mktemp("upload")
    shutil.copyfile(encoder_file, directory / "model.pt")
    items = fashion_mnist_pngs(0, CATALOGUE_SIZE)
    by_label: dict[str, list[int]] = defaultdict(list)
    for position, (_, label) in enumerate(items):
        by_label[label].append(position)
    ids = [0] * CATALOGUE_SIZE
    settings = service_settings(directory, mongo_uri, module_db_name)
    with running_service(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        for label, positions in by_label.items():
            for start in range(0, len(positions), 32):
                chunk = positions[start : start + 32]
                reply = upload(client, [(items[p][0], f"fmnist-{p}.png") for p in chunk], label=label)
                for position, item in zip(chunk, reply["items"], strict=True):
                    ids[position] = item["id"]
    return CatalogueDb(mongo_uri, module_db_name, ids, [l for _, l in items], [d for d, _ in items])


@pytest.fixture
def data_dir(tmp_path: Path, encoder_file: Path) -> Path:
    """A DATA_DIR holding model.pt: the service bootstraps from this random encoder."""
    directory = tmp_path / "data"
    directory.mkdir()
    shutil.copyfile(encoder_file, directory / "model.pt")
    return directory


@pytest.fixture
def service_on(catalogue: CatalogueDb, data_dir: Path):
    """`with service_on(**settings) as client:` the service on the shared catalogue over real HTTP."""

    def start(**overrides) -> Iterator[httpx.Client]:
        settings = service_settings(data_dir, catalogue.uri, catalogue.db_name, **overrides)
        return _ServiceClient(settings)

    return start


class _ServiceClient:
    def __init__(self, settings) -> None:
        self.settings = settings

    def __enter__(self) -> httpx.Client:
        self._server = running_service(self.settings)
        self._client = httpx.Client(base_url=self._server.__enter__(), timeout=60)
        return self._client

    def __exit__(self, *exc_info) -> None:
        self._client.close()
        self._server.__exit__(*exc_info)
