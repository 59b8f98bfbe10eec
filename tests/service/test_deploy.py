"""Deployment files: docker-compose.yml validated by docker-compose itself, the Dockerfile's essentials,
and the settings/CLI the containers rely on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import service.__main__ as service_cli
from service import lifecycle
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")


def compose_config(*config_options: str, profile: str | None = None) -> str:
    profiles = ["--profile", profile] if profile else []
    command = [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), *profiles, "config", *config_options]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=ROOT, env={"PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def as_json(yaml_text: str) -> dict:
    """Parse YAML with docker-compose's own interpreter (it depends on PyYAML; the venv does not)."""
    shebang = Path(COMPOSE).read_text(errors="replace").splitlines()[0]
    interpreter = shebang[2:].strip().split()[0] if shebang.startswith("#!") else "python3"
    code = "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"
    result = subprocess.run(
        [interpreter, "-c", code], input=yaml_text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (make setup apt-installs it)")
def test_compose_file_is_valid_and_complete() -> None:
    services = compose_config("--services", profile="train").split()
    assert {"mongo", "api", "trainer"} <= set(services)

    config = as_json(compose_config(profile="train"))
    mongo, api, trainer = (config["services"][name] for name in ("mongo", "api", "trainer"))
    assert mongo["image"] == "mongo:7"
    assert "mongosh" in mongo["healthcheck"]["test"] and "ping" in json.dumps(mongo["healthcheck"]["test"])
    assert any(volume.startswith("mongo-data:") for volume in mongo["volumes"])
    assert api["depends_on"]["mongo"]["condition"] == "service_healthy"
    assert api["environment"]["MONGO_URI"] == "mongodb://mongo:27017"
    assert "/health/ready" in json.dumps(api["healthcheck"]["test"])
    assert {p["target"] for p in api["ports"]} == {8000}
    assert trainer["profiles"] == ["train"]
    assert trainer["command"][:3] == ["python", "-m", "training.moco"] and "--catalogue" in trainer["command"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert trainer["environment"]["MONGO_URI"] == api["environment"]["MONGO_URI"]
    assert {v.split(":")[0] for v in trainer["volumes"]} == {v.split(":")[0] for v in api["volumes"]}
    # docker sends SIGKILL after stop_grace_period: the drain of requests in flight and the shutdown's
    # budget (publish, close) must fit in it, or the publish at shutdown is cut off.
    needed = (
        service_cli.GRACEFUL_SHUTDOWN_S + lifecycle.BACKGROUND_STOP_TIMEOUT_S + lifecycle.SHUTDOWN_TIMEOUT_S
    )
    production = as_json(compose_config(profile="production"))["services"]
    for name, spec in [("api", api)] + [(n, production[n]) for n in ("api-1", "api-2")]:
        assert seconds(spec.get("stop_grace_period", "10s")) >= needed, name


def seconds(duration: str) -> float:
    """A compose duration ("40s", "1m30s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(value) * units[unit] for value, unit in re.findall(r"([0-9.]+)([hms])", duration))


def test_dockerfile_essentials() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert "USER app" in text and "useradd" in text
    assert 'VOLUME ["/data"]' in text
    command = next(line for line in text.splitlines() if line.startswith("CMD"))
    assert "python -m service.demo --model-only && exec python -m service" in command
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_settings_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("API_KEY", "")  # what compose passes for an unset variable
    monkeypatch.setenv("MONGO_URI", "mongodb://db:27017")
    settings = Settings(_env_file=None)
    assert settings.MAX_UPLOAD_BYTES == 1234 and settings.API_KEY is None
    assert settings.MONGO_URI == "mongodb://db:27017"
    assert settings.index_dir == settings.DATA_DIR / "index"
    assert (settings.CLASSIFY_K, settings.CLASSIFY_TAU, settings.SEARCH_MAX_K) == (200, 0.07, 1000)


def test_cli_help_documents_the_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "--host" in result.stdout and "--port" in result.stdout and "default 8000" in result.stdout
    assert "MONGO_URI" in result.stdout


def test_cli_rejects_bad_settings_in_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "MAX_UPLOAD_BYTES": "lots", "MONGO_URI": "mongodb://127.0.0.1:1"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid settings: MAX_UPLOAD_BYTES: ")
    assert "valid integer" in lines[0]


def test_cli_sets_the_gil_switch_interval_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    served_with: list[float] = []
    options: list[dict] = []

    def run(*args, **kwargs) -> None:
        served_with.append(sys.getswitchinterval())
        options.append(kwargs)

    monkeypatch.setattr(service_cli.uvicorn, "run", run)
    monkeypatch.setenv("GIL_SWITCH_INTERVAL_MS", "0.25")
    monkeypatch.setenv("MONGO_URI", "mongodb://127.0.0.1:1")  # not contacted: uvicorn.run is replaced
    before = sys.getswitchinterval()
    try:
        service_cli.main(["--port", "8123"])
    finally:
        sys.setswitchinterval(before)
    assert served_with == [pytest.approx(0.00025)]
    # requests in flight cannot hold the shutdown (publish, the embedded database's stop) forever
    assert options[0]["timeout_graceful_shutdown"] == service_cli.GRACEFUL_SHUTDOWN_S
    monkeypatch.setenv("GIL_SWITCH_INTERVAL_MS", "0")
    with pytest.raises(SystemExit, match="GIL_SWITCH_INTERVAL_MS"):
        service_cli.main([])
