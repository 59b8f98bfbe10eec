"""Catalogue mode of the training entry points: `python -m training.moco` without `--data` (or with
`--catalogue`) refreshes the service's catalogue instead of only training.

The training command line (training/cli.py) knows nothing of the service; an entry point hands it
`CATALOGUE_MODE`, which adds the refresh's flags, fills the catalogue defaults (data from the
service's database, outputs under DATA_DIR/refresh/<method>, the serving model's input size) and
runs the refresh's stages (service/refresh/stages.py) instead of plain training.
"""

from __future__ import annotations

import argparse

from service.refresh.stages import current_input_size, run_refresh
from service.settings import Settings


class CatalogueMode:
    """The `training.cli.RunMode` that turns a training command into a catalogue refresh."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "catalogue refresh (the default when --data is not given)",
            "train on the catalogue in MongoDB (MONGO_URI, or the embedded database under DATA_DIR), "
            "re-embed it, build, evaluate and publish a new index version that the service picks up",
        )
        group.add_argument(
            "--catalogue", action="store_true", help="refresh from the catalogue (implied without --data)"
        )
        group.add_argument(
            "--no-publish",
            action="store_true",
            help="stop after evaluation; the new version is not made current",
        )
        group.add_argument(
            "--force-publish", action="store_true", help="publish even when the quality guard says worse"
        )
        group.add_argument(
            "--quality-margin",
            type=float,
            default=0.01,
            help="largest drop in held-out kNN top-1 (absolute, 0.01 = 1 point) still published",
        )
        group.add_argument("--index-type", default="auto", help="index.build --type for the new version")
        group.add_argument("--target-recall", type=float, default=0.95, help="index.build --target-recall")

    def applies(self, args: argparse.Namespace) -> bool:
        return args.data is None or args.catalogue or args.data.startswith("catalogue")

    def resolve(self, args: argparse.Namespace) -> None:
        """Data from the service's database, outputs under DATA_DIR/refresh/<method>, and the crop
        size of the model currently serving (so a refresh keeps the catalogue's scale)."""
        settings = Settings()
        args.catalogue = True
        if args.data is None or not args.data.startswith("catalogue"):
            args.data = "catalogue"
        if args.out is None:
            args.out = settings.DATA_DIR / "refresh" / args.method
        if args.crop_size is None:
            args.crop_size = current_input_size(settings.index_dir) or 224

    def run(self, args: argparse.Namespace) -> int:
        return run_refresh(args)


CATALOGUE_MODE = CatalogueMode()
