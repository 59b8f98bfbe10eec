"""Which MongoDB a process of this project talks to, shared by the service, ingest and refresh.

`MONGO_URI` when set. Otherwise the embedded SecantusDB under `DATA_DIR/db`: a storage directory
can be opened by one server only, so the process that starts it records its address in
`DATA_DIR/db.json`, and the others (a refresh or an ingest while the service runs) attach to that
server instead of starting a second one on the same files. A file lock makes check-and-start atomic.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from service.embedded_db import START_TIMEOUT_S, EmbeddedDatabase, EmbeddedDatabaseError, wait_for_ping
from service.settings import Settings

ATTACH_TIMEOUT_S = 5.0  # a running server that does not answer within this is an error, not "gone"
ORPHAN_EXIT_TIMEOUT_S = 30.0  # how long an orphaned server gets to checkpoint and exit


def _discovery_file(settings: Settings) -> Path:
    return settings.DATA_DIR / "db.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedEmbeddedDatabase(EmbeddedDatabase):
    """An EmbeddedDatabase that announces itself in DATA_DIR/db.json while it runs."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings.db_dir, port=settings.EMBEDDED_DB_PORT, durable=settings.EMBEDDED_DB_DURABLE
        )
        self.discovery = _discovery_file(settings)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        uri = super().start(timeout_s)
        tmp = self.discovery.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"uri": uri, "pid": self.process.pid, "owner": os.getpid()}))
        os.replace(tmp, self.discovery)
        return uri

    def stop(self, timeout_s: float = 20.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            if json.loads(self.discovery.read_text()).get("owner") == os.getpid():
                self.discovery.unlink()
        super().stop(timeout_s)


def _read_discovery(path: Path) -> tuple[str, int, int | None] | None:
    """(uri, server pid, owner pid) from DATA_DIR/db.json, or None when there is none or it is unreadable."""
    try:
        running = json.loads(path.read_text())
        owner = running.get("owner")
        return str(running["uri"]), int(running["pid"]), None if owner is None else int(owner)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _retire_orphan(pid: int, timeout_s: float = ORPHAN_EXIT_TIMEOUT_S) -> None:
    """A server whose owner died (it got SIGTERM from the kernel, see embedded_db._die_with_parent,
    or it predates that): make sure it is asked to stop, and wait for it to let go of the files."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid) and time.monotonic() < deadline + 10:
            time.sleep(0.1)


def attach_or_start(settings: Settings) -> tuple[str, EmbeddedDatabase | None]:
    """(uri, the server this process started or None). The caller stops a server it started."""
    if settings.MONGO_URI:
        return settings.MONGO_URI, None
    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    with open(settings.DATA_DIR / "db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        discovery = _discovery_file(settings)
        running = _read_discovery(discovery)
        if running is not None and running[2] is not None and not _alive(running[2]) and _alive(running[1]):
            _retire_orphan(running[1])  # its owner was killed: never attach to an orphan
        if running is not None and _alive(running[1]):
            uri, pid, _ = running
            try:
                wait_for_ping(uri, None, timeout_s=ATTACH_TIMEOUT_S)
            except EmbeddedDatabaseError as exc:
                # Never a second server on the same files: that could corrupt them.
                raise EmbeddedDatabaseError(
                    f"the embedded database announced in {discovery} (pid {pid}, {uri}) is running but "
                    f"does not answer ({exc}); stop it, or delete {discovery.name} if pid {pid} is not it"
                ) from exc
            return uri, None
        discovery.unlink(missing_ok=True)  # left by a process that died
        server = SharedEmbeddedDatabase(settings)
        return server.start(), server


@contextlib.contextmanager
def catalogue_connection(uri: str | None = None) -> Iterator[tuple[str, Settings]]:
    """(uri, settings) for a command-line tool; a server started here is stopped on exit."""
    settings = Settings()
    if uri:
        yield uri, settings
        return
    resolved, started = attach_or_start(settings)
    try:
        yield resolved, settings
    finally:
        if started is not None:
            started.stop()
