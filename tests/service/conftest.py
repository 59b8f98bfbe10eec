"""Service fixtures: the tiny encoder, a running service per test, and a shared labelled catalogue."""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
from service_helpers import (
    CATALOGUE_SIZE,
    Catalogue,
    fashion_mnist_pngs,
    running_service,
    service_settings,
    upload,
)


@pytest.fixture
def data_dir(tmp_path: Path, encoder_file: Path) -> Path:
    """A DATA_DIR holding model.pt (the service bootstraps an empty index from it)."""
    shutil.copyfile(encoder_file, tmp_path / "model.pt")
    return tmp_path


ServiceFactory = Callable[..., AbstractContextManager[httpx.Client]]


@pytest.fixture
def start_service(data_dir: Path, mongo_uri: str, mongo_db_name: str) -> ServiceFactory:
    """`with start_service(**settings) as client:` a service over real HTTP and an httpx client."""

    def start(**overrides) -> AbstractContextManager[httpx.Client]:
        settings = service_settings(data_dir, mongo_uri, mongo_db_name, **overrides)
        return _client_for(settings)

    return start


class _client_for:
    def __init__(self, settings) -> None:
        self.settings = settings

    def __enter__(self) -> httpx.Client:
        self._server = running_service(self.settings)
        self.base_url = self._server.__enter__()
        self._client = httpx.Client(base_url=self.base_url, timeout=60)
        return self._client

    def __exit__(self, *exc_info) -> None:
        self._client.close()
        self._server.__exit__(*exc_info)


@pytest.fixture(scope="module")
def catalogue(
    tmp_path_factory: pytest.TempPathFactory, encoder_file: Path, mongo_uri: str, module_db_name: str
) -> Iterator[Catalogue]:
    """A service with CATALOGUE_SIZE labelled Fashion-MNIST test images ingested over HTTP."""
    directory = tmp_path_factory.mktemp("catalogue")
    shutil.copyfile(encoder_file, directory / "model.pt")
    settings = service_settings(directory, mongo_uri, module_db_name)
    items = fashion_mnist_pngs(0, CATALOGUE_SIZE)
    by_label: dict[str, list[int]] = defaultdict(list)
    for position, (_, label) in enumerate(items):
        by_label[label].append(position)
    ids = [0] * CATALOGUE_SIZE
    with _client_for(settings) as client:
        for label, positions in by_label.items():
            for start in range(0, len(positions), 32):
                chunk = positions[start : start + 32]
                reply = upload(
                    client, [(items[p][0], f"fmnist-{p}.png") for p in chunk], label=label, tags="fmnist"
                )
                for position, item in zip(chunk, reply["items"], strict=True):
                    ids[position] = item["id"]
        yield Catalogue(client, ids, [label for _, label in items], [data for data, _ in items], directory)
