"""The embedded database: SecantusDB (a MongoDB-wire-protocol server) as a SEPARATE child process.

SecantusDB is GPL-2.0, so it is never imported: it runs as `secantusd-py` from the venv's bin
directory and the service talks to it over TCP with pymongo, exactly as it would to mongod.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

log = logging.getLogger("service.embedded_db")


class EmbeddedDatabaseError(RuntimeError):
    """The embedded database could not be started (message says why)."""


PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 180.0  # seconds for a first answer: 8 s idle, over 60 s on a saturated 2-core machine


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn of the child: the kernel sends it SIGKILL when the process that started it dies,
    however it dies (kill -9 included), so no orphan keeps the data directory locked. SIGKILL, not
    SIGTERM: a server busy with a long operation takes minutes to honour SIGTERM; its log makes a
    kill safe (and fsynced on every commit in durable mode). Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_CHOSEN_PORT = 10_000


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server that binds it a moment later. Chosen below the kernel's
    ephemeral range where there is one: a port from that range (what bind(0) gives) can be taken by
    any outgoing connection before the server binds it (seen in CI: "address already in use")."""
    try:
        ephemeral_low = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    candidates = list(range(LOWEST_CHOSEN_PORT, ephemeral_low))
    for port in random.sample(candidates, min(50, len(candidates))):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def secantusd_executable() -> str:
    candidate = Path(sys.executable).parent / "secantusd-py"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("secantusd-py")
    if found is None:
        raise EmbeddedDatabaseError(
            "MONGO_URI is unset and secantusd-py is not installed: pip install '.[embedded]' or set MONGO_URI"
        )
    return found


def wait_for_ping(uri: str, process: subprocess.Popen | None, timeout_s: float) -> None:
    """Poll with `ping` until the server answers (or the process dies, or time runs out)."""
    deadline = time.monotonic() + timeout_s
    client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=250, connectTimeoutMS=250)
    try:
        while True:
            if process is not None and process.poll() is not None:
                raise EmbeddedDatabaseError(f"secantusd-py exited with code {process.returncode}")
            try:
                client.admin.command("ping")
                return
            except PyMongoError as exc:
                if time.monotonic() > deadline:
                    raise EmbeddedDatabaseError(
                        f"no answer from {uri} after {timeout_s:.0f} s: {exc}"
                    ) from exc
    finally:
        client.close()


class EmbeddedDatabase:
    """Start with `start()`, stop with `stop()`; `uri` is what pymongo connects to."""

    def __init__(
        self,
        storage_path: str | Path,
        port: int = 0,
        host: str = "127.0.0.1",
        cache_size: str = "256M",
        durable: bool = True,
    ) -> None:
        self.storage_path = str(storage_path)
        self.host = host
        self.port = port or free_port(host)
        self.cache_size = cache_size
        self.durable = durable  # fsync the log on every commit: an acknowledged write survives a crash
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        if self.storage_path != ":memory:":
            Path(self.storage_path).mkdir(parents=True, exist_ok=True)
        command = [
            secantusd_executable(),
            "--host", self.host,
            "--port", str(self.port),
            "--storage-path", self.storage_path,
            "--cache-size", self.cache_size,
            "--log-level", "WARNING",
        ]  # fmt: skip
        if self.durable and self.storage_path != ":memory:":
            command.append("--sync-on-commit")
        parent = os.getpid()
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, preexec_fn=lambda: _die_with_parent(parent)
        )
        try:
            wait_for_ping(self.uri, self.process, timeout_s)
        except EmbeddedDatabaseError:
            self.stop()
            raise
        log.info(
            "MONGO_URI unset: started embedded SecantusDB (pid %d) on %s:%d, data in %s",
            self.process.pid, self.host, self.port, self.storage_path,
        )  # fmt: skip
        return self.uri

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def exited(self) -> int | None:
        """The exit code once the process has ended (and reaps it: no zombie), else None."""
        return None if self.process is None else self.process.poll()

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Kill whatever is left of the server (crashed or hung) and start it again on the same port
        and files, so clients reconnect to the same address by themselves."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.restarts += 1
        return self.start(timeout_s)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM and wait, so that the server checkpoints its data (a kill -9 can lose it)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("embedded SecantusDB did not stop within %.0f s; killing it", timeout_s)
            self.process.kill()
            self.process.wait()
        log.info("stopped embedded SecantusDB")
