"""The search page: `GET /` (service/web/index.html), its static files under `/static`, and
`GET /ui/config`, the limits the page checks before it sends anything."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from index.expansion import MAX_EXPANSION
from service.deps import SettingsDep

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Revalidate on every load (ETag -> 304): a page upgraded with the service never runs stale code.
REVALIDATE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


class RevalidatedStaticFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope):
        response = await super().get_response(path, scope)
        response.headers.update(REVALIDATE)
        return response


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=REVALIDATE)


@router.get("/ui/config")
async def page_config(settings: SettingsDep) -> dict:
    """What the page needs to know up front: limits (to refuse an oversize file before uploading
    it) and whether writes or reads need the API key (no secret is revealed)."""
    return {
        "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
        "max_files_per_request": settings.MAX_FILES_PER_REQUEST,
        "max_request_bytes": settings.MAX_REQUEST_BYTES,
        "search_max_k": settings.SEARCH_MAX_K,
        "classify_k": settings.CLASSIFY_K,
        "search_expand": settings.SEARCH_EXPAND,
        "max_expand": MAX_EXPANSION,
        "writes_need_key": settings.API_KEY is not None,
        "reads_need_key": settings.API_KEY is not None and settings.PROTECT_READS,
    }


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", RevalidatedStaticFiles(directory=WEB_DIR), name="static")
