"""GET /version: what is running."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from fastapi import APIRouter

from service.deps import StateDep
from service.routing import ContractRoute
from service.schemas import VersionInfo, error_responses

router = APIRouter(tags=["meta"], route_class=ContractRoute)


def service_version() -> str:
    try:
        return package_version("ssl-retrieval")
    except PackageNotFoundError:
        return "0.0.0+local"


@router.get("/version", summary="Service, model and index versions", responses=error_responses(422))
async def version(state: StateDep) -> VersionInfo:
    loaded = state.engine.loaded
    return VersionInfo(
        service=service_version(),
        model_version=loaded.model_version if loaded else None,
        index_version=loaded.version if loaded else None,
        index_type=loaded.index.index_type if loaded else None,
        index_size=loaded.index.ntotal if loaded else None,
        embed_dim=loaded.index.dim if loaded else None,
    )
