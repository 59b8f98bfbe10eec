"""Start-up, the background tasks, and shutdown.

Start-up: start (or attach to) the embedded database when MONGO_URI is unset, connect, create
indexes, load (or bootstrap) the index version; the service then serves at once. Background tasks:
  * maintenance, every RELOAD_POLL_SECONDS: retry whatever failed (database down at start-up,
    reconcile interrupted), reconcile (start-up, after a swap or a database restart), load a new
    CURRENT if one appeared, republish local changes once they are quiet (debounced);
  * the orphan sweep, every ORPHAN_SWEEP_SECONDS (not only inside a reconcile that may not finish);
  * the cache warm-up (service.cache_warmup): search results' records and thumbnails read into
    memory once the caches' change streams are open, yielding to searches;
  * the embedded database's supervisor (only for a server this process started): restarts it when
    it exits or stops answering real queries for EMBEDDED_DB_HANG_SECONDS.
Shutdown publishes pending changes and stops the embedded database. Its steps share a time budget
(SHUTDOWN_TIMEOUT_S) and a step that fails or hangs is logged and passed over, so that the embedded
database is always asked to stop (and checkpoint) before the process ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from datetime import timedelta

from service.cache_warmup import keep_caches_warm
from service.connection import attach_or_start
from service.db import Database
from service.embedded_db import EmbeddedDatabaseError
from service.engine import Engine
from service.errors import DATABASE_DOWN
from service.metrics import ServiceMetrics
from service.reconcile import reconcile, sweep_orphans
from service.replica import Replica
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("service")
PROBE_TIMEOUT_MS = 20_000  # the supervisor's catalogue probe: late is slow, never is hung
# The shutdown's steps before the embedded database's own stop, together. Unbounded, a database that
# stopped answering held each step (a database call, the publish) for the client's socket timeout,
# 30 s or more, one after another, and the embedded database's stop, the last step, never came
# before a supervisor's SIGKILL. A step left when the budget is spent still gets LAST_STEP_S.
SHUTDOWN_TIMEOUT_S = 20.0
LAST_STEP_S = 1.0
BACKGROUND_STOP_TIMEOUT_S = 5.0  # cancelled background tasks end at their next await


async def start(settings: Settings, metrics: ServiceMetrics) -> ServiceState:
    # MONGO_URI, or the embedded database: attached when another process announced it, else started
    # (and announced) here; `embedded` is only a server this process started and must stop.
    uri, embedded = await asyncio.to_thread(attach_or_start, settings)
    db = Database.connect(uri, settings.MONGO_DB, settings.MONGO_TIMEOUT_MS, journal=settings.MONGO_JOURNAL)
    state = ServiceState(settings, db, Engine(settings), metrics, embedded)
    state.replica = Replica(state)
    await prepare_database(state)
    # Searches are served from here on; reconcile always follows in the background at start-up: after
    # a crash the version's resume token alone does not bring the index back to the records (a kill -9
    # test found deleted ids kept and acknowledged uploads missing), so the stream is opened at the
    # token (before any reconcile reads) and the records, the truth, are reconciled as well.
    if await state.engine.load_current():
        await state.replica.on_swap()
        state.needs_reconcile = True
    await state.replica.start()  # follow the catalogue's change stream, contend for the publisher lease
    return state


def background_tasks(state: ServiceState) -> list[asyncio.Task]:
    tasks = [
        asyncio.create_task(maintenance_loop(state), name="maintenance"),
        asyncio.create_task(orphan_sweep_loop(state), name="orphan-sweep"),
        asyncio.create_task(warm_caches_loop(state), name="cache-warmup"),
    ]
    if state.embedded_db is not None:
        tasks.append(asyncio.create_task(supervise_embedded_db(state), name="db-supervisor"))
    return tasks


async def prepare_database(state: ServiceState) -> bool:
    if not state.db_prepared:
        try:
            await state.db.prepare()
            state.db_prepared = True
        except DATABASE_DOWN as exc:
            log.warning("database not reachable yet (%s); retrying in the background", type(exc).__name__)
    return state.db_prepared


def _grace(state: ServiceState) -> timedelta:
    return timedelta(seconds=state.settings.ORPHAN_GRACE_SECONDS)


async def refresh(state: ServiceState) -> bool:
    """Load a new CURRENT if there is one, then reconcile when needed. True when a swap happened."""
    async with state.refresh_lock:
        replica = state.replica
        if replica is not None:
            await replica.adopt_current()  # a peer's republish of our model: nothing to load
        swapped = await state.engine.load_current()
        if swapped:  # the change stream resumes at the version's token, else reconcile
            state.needs_reconcile = replica is None or not await replica.on_swap()
        if state.needs_reconcile and state.engine.loaded is not None and await prepare_database(state):
            try:
                started = time.monotonic()
                report = await reconcile(state.engine, state.db)
                state.needs_reconcile = False
                state.last_reconcile_s = time.monotonic() - started
                if report is not None:
                    log.info("reconcile finished in %.1f s: %s", state.last_reconcile_s, report)
            except DATABASE_DOWN as exc:
                log.warning("reconcile postponed: database unreachable (%s)", type(exc).__name__)
        return swapped


async def maintenance_loop(state: ServiceState) -> None:
    while True:
        try:
            await refresh(state)
            await state.engine.publish_if_due()
        except asyncio.CancelledError:
            raise
        except Exception:  # the loop must survive anything and try again next tick
            log.exception("maintenance step failed; retrying in %.1f s", state.settings.RELOAD_POLL_SECONDS)
        await asyncio.sleep(state.settings.RELOAD_POLL_SECONDS)


async def orphan_sweep_loop(state: ServiceState) -> None:
    """The first sweep follows the start-up reconcile, or its skip when the change stream resumed at
    the loaded version's token (not at the same time: both scan the catalogue), then one every
    ORPHAN_SWEEP_SECONDS."""
    every = state.settings.ORPHAN_SWEEP_SECONDS
    while True:
        await asyncio.sleep(min(every, state.settings.RELOAD_POLL_SECONDS))
        due = state.last_sweep is None or time.monotonic() - state.last_sweep >= every
        if not due or not state.db_prepared or state.needs_reconcile:
            continue
        try:
            started = time.monotonic()
            await sweep_orphans(state.db, _grace(state), state.settings.ORPHAN_SWEEP_DUTY)
            state.last_sweep = time.monotonic()
            state.last_sweep_s = state.last_sweep - started
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # DATABASE_DOWN or a cancelled scan: next time
            log.warning("orphan sweep failed (%s: %s); retrying later", type(exc).__name__, exc)
            state.last_sweep = time.monotonic() - every + state.settings.RELOAD_POLL_SECONDS


async def warm_caches_loop(state: ServiceState) -> None:
    """Once the database is prepared, keep the search caches warm (service.cache_warmup)."""
    while not state.db_prepared:
        await asyncio.sleep(state.settings.RELOAD_POLL_SECONDS)
    engine = state.engine
    await keep_caches_warm(state.db, engine.records, engine.thumbnails, engine.busy)


async def supervise_embedded_db(state: ServiceState) -> None:
    """Restart the embedded database when it exits (reaped: no zombie) or when it has not answered
    a real catalogue query for EMBEDDED_DB_HANG_SECONDS; the client reconnects to the same port.

    The probe has its own client (a request pool that is merely saturated is not a hung server)
    and a generous time limit (an overloaded server answers late, a hung one never), and after a
    restart for silence the limit doubles until the server has answered for that long again: a
    server that is only slow must not be killed in a loop (each restart costs more than it saves).
    """
    settings, server = state.settings, state.embedded_db
    assert server is not None
    probe = Database.connect(server.uri, settings.MONGO_DB, PROBE_TIMEOUT_MS)
    answered = healthy_since = time.monotonic()
    hang_limit = settings.EMBEDDED_DB_HANG_SECONDS
    try:
        while True:
            await asyncio.sleep(settings.EMBEDDED_DB_CHECK_SECONDS)
            exit_code = server.exited()
            reason = None
            if exit_code is not None:
                reason = f"exited with code {exit_code}"
            elif not state.db_prepared:  # index builds over a large catalogue block queries for a while
                answered = time.monotonic()
            else:
                try:
                    await probe.check_catalogue(PROBE_TIMEOUT_MS / 1000)
                    answered = time.monotonic()
                    if answered - healthy_since >= hang_limit:
                        hang_limit = settings.EMBEDDED_DB_HANG_SECONDS
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    silent = time.monotonic() - answered
                    if silent >= hang_limit:
                        reason = f"no answer to catalogue queries for {silent:.0f} s ({type(exc).__name__})"
                        hang_limit *= 2
            if reason is None:
                continue
            log.error("embedded database (pid %s) %s; restarting it", server.pid, reason)
            state.db_problem = f"the embedded database {reason}; restarting it"
            try:
                await asyncio.to_thread(server.restart)
            except EmbeddedDatabaseError as exc:
                state.db_problem = f"the embedded database could not be restarted: {exc}"
                log.error("%s; trying again", state.db_problem)
                continue
            log.info("embedded database restarted (pid %s)", server.pid)
            state.db_problem = None
            state.needs_reconcile = True  # cheap when nothing is missing; repairs what the crash interrupted
            answered = healthy_since = time.monotonic()
    finally:
        await probe.close()


async def stop_background(tasks: list[asyncio.Task]) -> None:
    """Cancel the background tasks and wait for them, at most BACKGROUND_STOP_TIMEOUT_S."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=BACKGROUND_STOP_TIMEOUT_S)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("shutdown: background task %s had failed", task.get_name(), exc_info=task.exception())
    for task in pending:
        log.error("shutdown: background task %s did not stop in time", task.get_name())


class ShutdownSteps:
    """Runs the shutdown's steps within one time budget: a step that fails or outlasts what is left of
    it is logged and passed over, and the steps after it still run."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    async def run(self, what: str, step: Awaitable[object]) -> None:
        timeout = max(self.deadline - time.monotonic(), LAST_STEP_S)
        try:
            await asyncio.wait_for(step, timeout)
        except TimeoutError:
            log.error("shutdown: %s did not finish within %.1f s; passed over", what, timeout)
        except Exception:
            log.exception("shutdown: %s failed; passed over", what)


async def stop(state: ServiceState) -> None:
    steps = ShutdownSteps(SHUTDOWN_TIMEOUT_S)
    try:
        if state.replica is not None:
            await steps.run("stopping the change-stream follower", state.replica.stop())
            await steps.run("renewing the publisher lease", state.replica.renew_for_shutdown())
        publish = state.engine.publish_if_due(force=True)  # only the lease holder publishes
        await steps.run("publishing pending index changes (reconcile repairs them)", publish)
        if state.replica is not None:
            await steps.run("releasing the publisher lease", state.replica.release())
        await steps.run("closing the database client", state.db.close())
        state.engine.shutdown()
    finally:  # whatever happened above: a server this process started is stopped, and checkpoints
        if state.embedded_db is not None:
            await asyncio.to_thread(state.embedded_db.stop)
