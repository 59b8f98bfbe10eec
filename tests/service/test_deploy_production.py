"""The compose `production` profile, validated by docker-compose itself: a three-member MongoDB
replica set with its one-shot initiation, two API replicas on it, and Caddy balancing them with
health checks; `docker compose up` without the profile stays the single-node set-up."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_deploy import COMPOSE, ROOT, as_json, compose_config

MEMBERS = ["mongo-rs-1", "mongo-rs-2", "mongo-rs-3"]
REPLICAS = ["api-1", "api-2"]
PRODUCTION = {*MEMBERS, "mongo-rs-init", *REPLICAS, "proxy"}
CADDYFILE = ROOT / "service" / "deploy" / "Caddyfile"
INIT_SCRIPT = ROOT / "service" / "deploy" / "mongo-rs-init.js"


@pytest.fixture(scope="module")
def services() -> dict:
    if COMPOSE is None:
        pytest.skip("docker-compose is not installed (make setup apt-installs it)")
    return as_json(compose_config(profile="production"))["services"]


def test_the_default_up_is_still_single_node(services: dict) -> None:
    always_on = {name for name, service in services.items() if not service.get("profiles")}
    assert always_on == {"mongo", "api"}  # what `docker compose up` starts
    assert {name for name, s in services.items() if s.get("profiles") == ["production"]} == PRODUCTION


def test_replica_set_members_and_initiation(services: dict) -> None:
    for name in MEMBERS:
        member = services[name]
        assert member["image"] == "mongo:7"
        assert member["command"][:3] == ["mongod", "--replSet", "rs0"]
        assert "ping" in " ".join(member["healthcheck"]["test"])
    assert len({services[name]["volumes"][0].split(":")[0] for name in MEMBERS}) == 3  # one volume each

    init = services["mongo-rs-init"]
    assert init["restart"] == "no" and init["image"] == "mongo:7"
    assert {name: d["condition"] for name, d in init["depends_on"].items()} == dict.fromkeys(
        MEMBERS, "service_healthy"
    )
    mounted = init["volumes"][0]
    assert mounted.split(":")[0] == str(INIT_SCRIPT) and INIT_SCRIPT.is_file()
    assert init["command"][-1] == mounted.split(":")[1]
    script = INIT_SCRIPT.read_text()
    assert re.findall(r'host: "([\w-]+):27017"', script) == MEMBERS
    assert 'rs.initiate({ _id: "rs0"' in script and "quit(1)" in script  # idempotent, fails loudly


def test_api_replicas_share_the_store_and_use_the_replica_set(services: dict) -> None:
    uri = "mongodb://" + ",".join(f"{m}:27017" for m in MEMBERS) + "/?replicaSet=rs0"
    ids = set()
    for name in REPLICAS:
        api = services[name]
        assert api["environment"]["MONGO_URI"] == uri
        ids.add(api["environment"]["REPLICA_ID"])
        assert api["depends_on"]["mongo-rs-init"]["condition"] == "service_completed_successfully"
        assert "/health/ready" in " ".join(api["healthcheck"]["test"])
        assert "ports" not in api  # reached through the proxy only
        assert api["image"] == services["api"]["image"]
    assert ids == set(REPLICAS)
    volumes = {tuple(v.split(":")[:2]) for name in REPLICAS for v in services[name]["volumes"]}
    assert volumes == {("retrieval-data", "/data")}  # one index store for both


def test_proxy_balances_the_replicas_with_health_checks(services: dict) -> None:
    proxy = services["proxy"]
    assert proxy["image"].startswith("caddy:2")
    assert set(proxy["depends_on"]) == set(REPLICAS)
    assert proxy["volumes"][0].split(":")[:2] == [str(CADDYFILE), "/etc/caddy/Caddyfile"]
    config = CADDYFILE.read_text()
    upstreams = re.search(r"reverse_proxy ([^{]+)\{", config).group(1).split()
    assert upstreams == [f"{name}:8000" for name in REPLICAS]
    assert re.search(r"health_uri /health/ready\b", config)
    published = {(p["published"], p["target"]) for p in proxy["ports"]}
    assert published == {(8080, 8080)} and ":8080 {" in config


CADDY = shutil.which("caddy") or shutil.which("caddy", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(CADDY is None, reason="caddy is not installed (make setup apt-installs it)")
def test_caddy_accepts_the_proxy_configuration(tmp_path) -> None:
    command = [CADDY, "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert result.returncode == 0 and "Valid configuration" in result.stdout + result.stderr, result.stderr
