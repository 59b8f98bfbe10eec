"""Request dependencies as `Annotated` aliases (full-stack-fastapi-template style).

All are `async def`: they only look things up, and FastAPI runs a plain `def` dependency in its
thread pool, a thread hand-off per dependency per request (several per search) that costs
milliseconds on a busy machine."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from pydantic import SecretStr

from service.db import Database
from service.engine import Engine, Loaded
from service.schemas import error_responses
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("service.auth")


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_db(state: StateDep) -> Database:
    return state.db


async def get_engine(state: StateDep) -> Engine:
    return state.engine


async def get_loaded(state: StateDep) -> Loaded:
    """The model + index snapshot this request runs on to the end (503 when none is loaded)."""
    return state.engine.require()


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_db)]
EngineDep = Annotated[Engine, Depends(get_engine)]
LoadedDep = Annotated[Loaded, Depends(get_loaded)]
ApiKeyHeader = Annotated[str | None, Header(alias="X-API-Key", description="needed when API_KEY is set")]


def _check_key(request: Request, expected: SecretStr | None, given: str | None) -> None:
    """Constant-time comparison (hmac.compare_digest); the key itself is never logged."""
    if expected is None:
        return
    where = f"{request.method} {request.url.path} from {request.client.host if request.client else '?'}"
    if not given:
        log.warning("refused %s: no X-API-Key header", where)
        raise HTTPException(401, "missing X-API-Key header", headers={"WWW-Authenticate": "ApiKey"})
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        log.warning("refused %s: wrong X-API-Key", where)
        raise HTTPException(403, "invalid API key")


async def require_write_key(request: Request, settings: SettingsDep, x_api_key: ApiKeyHeader = None) -> None:
    """Writes and admin: the key is needed whenever API_KEY is set."""
    _check_key(request, settings.API_KEY, x_api_key)


async def require_read_key(request: Request, settings: SettingsDep, x_api_key: ApiKeyHeader = None) -> None:
    """Reads: open unless PROTECT_READS is true."""
    _check_key(request, settings.API_KEY if settings.PROTECT_READS else None, x_api_key)


WriteAccess = Depends(require_write_key)
ReadAccess = Depends(require_read_key)
AUTH_ERRORS = error_responses(401, 403)  # documented on every guarded operation
