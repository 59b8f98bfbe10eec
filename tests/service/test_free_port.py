"""`free_port`: the port a test server or the embedded database binds a moment later is chosen
below the kernel's ephemeral range, where outgoing connections cannot take it meanwhile."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import service.embedded_db as embedded_db
from service.embedded_db import LOWEST_CHOSEN_PORT, free_port


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return True


def test_ports_come_from_below_the_ephemeral_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "range").write_text("40000\t60999\n")
    monkeypatch.setattr(embedded_db, "EPHEMERAL_RANGE_FILE", tmp_path / "range")
    ports = {free_port() for _ in range(20)}
    assert all(LOWEST_CHOSEN_PORT <= port < 40000 for port in ports), ports
    assert len(ports) > 1  # random, so parallel callers rarely meet
    assert all(bindable(port) for port in ports)


def test_a_taken_port_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "range").write_text(f"{port + 1} 60999\n")
        monkeypatch.setattr(embedded_db, "LOWEST_CHOSEN_PORT", port)  # the only candidate is taken
        monkeypatch.setattr(embedded_db, "EPHEMERAL_RANGE_FILE", tmp_path / "range")
        other = free_port()
        assert other != port and bindable(other)  # the kernel's choice, as a last resort


@pytest.mark.parametrize("content", [None, "1024 65535", "not numbers"])
def test_without_a_usable_range_the_kernel_chooses(
    content: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "range"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(embedded_db, "EPHEMERAL_RANGE_FILE", path)
    assert bindable(free_port())
