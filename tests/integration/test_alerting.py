"""End to end: a real Prometheus, loaded with monitoring/prometheus/{rules,alerts}.yml,
scrapes a running worker and scheduler; an overdue secret and critical drift in production
become alerts in its /api/v1/alerts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from tasks.secrets.stores import open_store
from tests.helpers import ROOT, FleetProcess, free_port, wait_for
from tests.prometheus_server import prometheus
from workers.configstore import set_configuration
from workers.db.models import FleetSecretVersion
from workers.runtime import Runtime
from workers.settings import FleetSettings

RULES = [ROOT / "monitoring" / "prometheus" / name for name in ("rules.yml", "alerts.yml")]
PRODUCTION = """
security:
  csrf_protection: true
"""
# The scheduler drives the two jobs (every five seconds, so the test need not wait minutes).
SCHEDULE = """
schedules:
  - {name: drift, job: drift.detect, cron: "*/5 * * * * *", misfire_grace_seconds: 5}
  - name: secret-rotation-check
    job: secrets.check_rotation
    cron: "*/5 * * * * *"
    misfire_grace_seconds: 5
"""

Spawn = Callable[..., FleetProcess]


@pytest.fixture
def fleet(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[dict[str, str], Runtime]]:
    config = tmp_path / "config"
    (config / "environments").mkdir(parents=True)
    (config / "environments" / "production.yaml").write_text(PRODUCTION)
    (config / "drift-rules.yaml").write_text("expected: []\n")
    (config / "rotation-policies.yaml").write_text(
        "policies:\n  - {path: 'svc/*', rotation_interval_days: 30, notify_days: 7}\n"
    )
    (tmp_path / "schedule.yaml").write_text(SCHEDULE)
    fleet_env["FLEET_CONFIG_DIR"] = str(config)
    settings = FleetSettings(
        home=Path(fleet_env["FLEET_HOME"]),
        database_url=fleet_env["FLEET_DATABASE_URL"],
        redis_url=fleet_env["FLEET_REDIS_URL"],
        config_dir=config,
    )
    rt = Runtime(settings)
    yield fleet_env, rt
    rt.close()


def active_alerts(url: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v1/alerts", timeout=5)
    response.raise_for_status()
    alerts: list[dict[str, Any]] = response.json()["data"]["alerts"]
    return alerts


def alert(url: str, name: str, **labels: str) -> dict[str, Any] | None:
    for candidate in active_alerts(url):
        found = candidate["labels"]
        if found["alertname"] == name and all(found.get(k) == v for k, v in labels.items()):
            return candidate
    return None


def up(url: str, job: str) -> bool:
    body = httpx.get(f"{url}/api/v1/query", params={"query": f'up{{job="{job}"}}'}, timeout=5)
    result = body.json()["data"]["result"]
    return bool(result) and all(float(r["value"][1]) == 1 for r in result)


def test_an_overdue_secret_and_production_drift_raise_their_alerts(
    fleet: tuple[dict[str, str], Runtime], spawn: Spawn, tmp_path: Path
) -> None:
    env, rt = fleet
    # An overdue secret (40 days old, due every 30) and one that is fine.
    store = open_store(rt.settings, rt.engine)
    store.write("svc/old", {"password": "old-pass-1"})
    store.write("svc/new", {"password": "new-pass-1"})
    with rt.engine.begin() as connection:
        connection.execute(
            update(FleetSecretVersion)
            .where(FleetSecretVersion.path == "platform/svc/old")
            .values(created_time=datetime.now(UTC) - timedelta(days=40))
        )
    # Production's live CSRF protection switched off: critical drift from the declared value.
    with rt.sessions.begin() as session:
        set_configuration(
            session,
            key="security.csrf_protection",
            value=False,
            environment="production",
            user_id="on-call",
            now=datetime.now(UTC),
        )

    worker_port, scheduler_port = free_port(), free_port()
    worker = spawn("worker", "-c", "1", "--metrics-port", str(worker_port), env=env)
    scheduler = spawn(
        "scheduler",
        "--schedule-file",
        str(tmp_path / "schedule.yaml"),
        "--metrics-port",
        str(scheduler_port),
        env=env,
    )
    jobs = {
        "fleet-workers": [f"127.0.0.1:{worker_port}"],
        "fleet-schedulers": [f"127.0.0.1:{scheduler_port}"],
    }
    with prometheus(jobs, rule_files=RULES) as url:
        wait_for(lambda: up(url, "fleet-workers"), timeout=90, what="the worker scraped")
        wait_for(lambda: up(url, "fleet-schedulers"), timeout=90, what="the scheduler scraped")

        def raised() -> tuple[dict[str, Any], dict[str, Any]] | None:
            overdue = alert(url, "FleetSecretRotationOverdue", path="svc/old")
            drift = alert(url, "FleetProductionDriftCritical", kind="value_changed")
            return (overdue, drift) if overdue and drift else None

        overdue, drift = wait_for(
            raised,
            timeout=120,
            what=f"both alerts; worker log:\n{worker.output()[-2000:]}\n"
            f"scheduler log:\n{scheduler.output()[-2000:]}",
            interval=0.5,
        )
        assert overdue["state"] in {"pending", "firing"}
        assert overdue["labels"]["severity"] == "critical"
        assert overdue["annotations"]["summary"] == "Secret svc/old is overdue for rotation"
        assert overdue["annotations"]["runbook"].endswith("#fleetsecretrotationoverdue")
        assert drift["state"] in {"pending", "firing"}
        assert drift["labels"]["severity"] == "critical"
        assert "production" in drift["annotations"]["description"]

        names = {a["labels"]["alertname"] for a in active_alerts(url)}
        # The fine secret raises nothing, and the fleet itself is up.
        assert alert(url, "FleetSecretRotationOverdue", path="svc/new") is None
        assert not names & {"FleetWorkersDown", "FleetSchedulerDown", "FleetBrokerDown"}
