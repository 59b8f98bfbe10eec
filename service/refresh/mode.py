"""Catalogue mode of the training entry points: `python -m training.moco` without `--data` (or with
`--catalogue`) refreshes the service's catalogue instead of only training.

The training command line (training/cli.py) knows nothing of the service; an entry point hands it
`CATALOGUE_MODE`, which adds the refresh's settings (`RefreshOptions`, flags by the same generic
mapping as the engine's), fills the catalogue defaults (data from the service's database, outputs
under DATA_DIR/refresh/<method>, the serving model's input size) and runs the refresh's stages
(service/refresh/stages.py) instead of plain training.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from service.refresh.stages import RefreshOptions, current_input_size, run_refresh, served_encoder
from service.settings import Settings
from training.config import SERVED_ENCODER, RunConfig
from training.flags import add_settings
from training.methods import method_class


class CatalogueMode:
    """The `training.cli.RunMode` that turns a training command into a catalogue refresh."""

    options_type = RefreshOptions

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_settings(
            parser,
            RefreshOptions,
            title="catalogue refresh (the default when --data is not given)",
            description="train on the catalogue in MongoDB (MONGO_URI, or the embedded database under "
            "DATA_DIR), re-embed it, build, evaluate and publish a new index version that the service "
            "picks up",
        )

    def applies(self, given: Mapping[str, Any]) -> bool:
        data = given.get("data")
        return data is None or bool(given.get("catalogue")) or str(data).startswith("catalogue")

    def defaults(self, given: Mapping[str, Any], method: str) -> tuple[dict[str, Any], int | None]:
        """Data from the service's database, outputs under DATA_DIR/refresh/<method>; the images'
        size is the current serving model's (so a refresh keeps the catalogue's scale). A method
        that fine-tunes a finished encoder (`training.neighbours`) starts from the served one
        unless --init names another; `--init current` asks for it with any method."""
        settings = Settings()
        data = given.get("data")
        filled: dict[str, Any] = {
            "data": data if data and str(data).startswith("catalogue") else "catalogue",
            "out": settings.DATA_DIR / "refresh" / method,
        }
        init = given.get("init")
        if init == SERVED_ENCODER or (init is None and method_class(method).needs_initial_embeddings):
            filled["init"] = str(served_encoder(settings.index_dir, settings.INDEX_STORAGE_URL))
        return filled, current_input_size(settings.index_dir, settings.INDEX_STORAGE_URL)

    def run(self, config: RunConfig, options: RefreshOptions) -> int:
        return run_refresh(config, options)


CATALOGUE_MODE = CatalogueMode()
