"""Start-up, the background maintenance loop, and shutdown.

Start-up: start the embedded database when MONGO_URI is unset, connect, create indexes, load (or
bootstrap) the index version, reconcile. Every RELOAD_POLL_SECONDS the loop retries whatever
failed (database down at start-up, reconcile interrupted), loads a new CURRENT if one appeared
(then reconciles), and republishes local changes once they are quiet (debounced). Shutdown
publishes pending changes and stops the embedded database.
"""

from __future__ import annotations

import asyncio
import logging

from service.connection import attach_or_start
from service.db import Database
from service.engine import Engine
from service.errors import DATABASE_DOWN
from service.metrics import ServiceMetrics
from service.reconcile import reconcile
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("service")


async def start(settings: Settings, metrics: ServiceMetrics) -> ServiceState:
    # MONGO_URI, or the embedded database: attached when another process announced it, else started
    # (and announced) here; `embedded` is only a server this process started and must stop.
    uri, embedded = await asyncio.to_thread(attach_or_start, settings)
    db = Database.connect(uri, settings.MONGO_DB, settings.MONGO_TIMEOUT_MS)
    state = ServiceState(settings, db, Engine(settings), metrics, embedded)
    await prepare_database(state)
    await refresh(state)
    return state


async def prepare_database(state: ServiceState) -> bool:
    if not state.db_prepared:
        try:
            await state.db.prepare()
            state.db_prepared = True
        except DATABASE_DOWN as exc:
            log.warning("database not reachable yet (%s); retrying in the background", type(exc).__name__)
    return state.db_prepared


async def refresh(state: ServiceState) -> bool:
    """Load a new CURRENT if there is one, then reconcile when needed. True when a swap happened."""
    async with state.refresh_lock:
        swapped = await state.engine.load_current()
        if swapped:
            state.needs_reconcile = True
        if state.needs_reconcile and state.engine.loaded is not None and await prepare_database(state):
            try:
                await reconcile(state.engine, state.db)
                state.needs_reconcile = False
            except DATABASE_DOWN as exc:
                log.warning("reconcile postponed: database unreachable (%s)", type(exc).__name__)
        return swapped


async def maintenance_loop(state: ServiceState) -> None:
    while True:
        await asyncio.sleep(state.settings.RELOAD_POLL_SECONDS)
        try:
            await refresh(state)
            await state.engine.publish_if_due()
        except asyncio.CancelledError:
            raise
        except Exception:  # the loop must survive anything and try again next tick
            log.exception("maintenance step failed; retrying in %.1f s", state.settings.RELOAD_POLL_SECONDS)


async def stop(state: ServiceState) -> None:
    try:
        await state.engine.publish_if_due(force=True)
    except Exception:
        log.exception("could not publish pending index changes at shutdown (reconcile repairs them)")
    await state.db.close()
    state.engine.shutdown()
    if state.embedded_db is not None:
        await asyncio.to_thread(state.embedded_db.stop)
