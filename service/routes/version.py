"""GET /version: what is running."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from fastapi import APIRouter

from service.deps import StateDep

router = APIRouter(tags=["meta"])


def service_version() -> str:
    try:
        return package_version("ssl-retrieval")
    except PackageNotFoundError:
        return "0.0.0+local"


@router.get("/version", summary="Service, model and index versions")
async def version(state: StateDep) -> dict:
    loaded = state.engine.loaded
    return {
        "service": service_version(),
        "model_version": loaded.model_version if loaded else None,
        "index_version": loaded.version if loaded else None,
        "index_type": loaded.index.index_type if loaded else None,
        "index_size": loaded.index.ntotal if loaded else None,
        "embed_dim": loaded.index.dim if loaded else None,
    }
