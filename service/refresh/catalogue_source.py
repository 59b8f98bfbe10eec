"""`--data catalogue[:MONGO_URI]`: the service's catalogue as a training data set.

`training/data/catalogue.py` reads records and GridFS bytes given a URI and a database name; which
database that is (MONGO_URI, or the embedded server under DATA_DIR, `service.connection`) is the
service's knowledge, so the spec is registered here, in the layer above both.
"""

from __future__ import annotations

from service.connection import catalogue_connection
from service.embedded_db import EmbeddedDatabaseError
from training.data.catalogue import load_catalogue
from training.data.datasets import DataError, ImageDataset, register_source


@register_source("catalogue")
def load_catalogue_spec(uri: str, crop_size: int) -> ImageDataset:
    """`catalogue` uses the service's settings (MONGO_URI, or the embedded database under DATA_DIR);
    `catalogue:mongodb://...` names a server directly."""
    try:
        with catalogue_connection(uri or None) as (resolved_uri, settings):
            return load_catalogue(
                resolved_uri, settings.MONGO_DB, crop_size, cache_dir=settings.DATA_DIR / "cache"
            )
    except EmbeddedDatabaseError as exc:  # one line and exit 1, not a traceback
        raise DataError(f"cannot open the catalogue database: {exc}") from exc
