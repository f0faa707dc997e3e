"""End to end, as production runs it: two workers, a scheduler and the exporter on the test
PostgreSQL and Redis; a real Prometheus loaded with the shipped prometheus.yml (targets moved
to loopback) and the shipped rules; a real Alertmanager whose webhook is a receiver here.

The rules are the shipped ones with time shortened (``for:`` dropped, ranges of minutes
made seconds, the dead man's switch intervals made a few seconds), so that minutes become
seconds; every expression, label and annotation is otherwise what production loads."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from sqlalchemy import distinct, func, select, update

from tasks.secrets.stores import open_store
from tests.alertmanager_server import Alert, WebhookReceiver, alertmanager
from tests.helpers import ROOT, FleetProcess, free_port, run_fleet, wait_for
from tests.prometheus_server import prometheus_from_config
from workers.configstore import set_configuration
from workers.db.models import FleetSecretVersion, SecretRotationStatus, TaskRun
from workers.runtime import Runtime
from workers.settings import FleetSettings

PROMETHEUS = ROOT / "monitoring" / "prometheus"
DASHBOARDS = ROOT / "monitoring" / "grafana" / "dashboards"
RUNBOOK = ROOT / "monitoring" / "RUNBOOK.md"
PRODUCTION = """
security:
  csrf_protection: true
"""
# Every two seconds. Worker A consumes default and drift, worker B drift and secrets: so
# drift.detect runs on both, and secrets.check_rotation stops when B stops.
SCHEDULE = """
schedules:
  - {name: heartbeat, job: fleet.heartbeat, cron: "*/2 * * * * *", misfire_grace_seconds: 2}
  - {name: drift, job: drift.detect, cron: "*/2 * * * * *", misfire_grace_seconds: 2}
  - name: secret-rotation-check
    job: secrets.check_rotation
    cron: "*/2 * * * * *"
    misfire_grace_seconds: 2
  - name: refused
    job: test.refused
    kwargs: {key: always}
    cron: "*/2 * * * * *"
    misfire_grace_seconds: 2
"""
# The dead man's switch fires after three of these without a success: soon for the job the
# test stops, late enough for the others that a loaded machine cannot trip them.
INTERVALS = {"fleet.heartbeat": 40, "drift.detect": 40, "secrets.check_rotation": 5}

Spawn = Callable[..., FleetProcess]


def shortened_rules(directory: Path) -> list[Path]:
    """The shipped rules and alerts with minutes made seconds (see the module docstring)."""

    def shorten(expression: str) -> str:
        return re.sub(r"\[\d+m\]", "[20s]", expression)

    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    for group in rules["groups"]:
        if group["name"] == "fleet-job-intervals":
            group["rules"] = [
                {
                    "record": "fleet:job_expected_interval_seconds",
                    "expr": f"vector({seconds})",
                    "labels": {"task": task},
                }
                for task, seconds in INTERVALS.items()
            ]
        for rule in group["rules"]:
            rule["expr"] = shorten(str(rule["expr"]))
    alerts = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            rule["expr"] = shorten(str(rule["expr"]))
            rule.pop("for", None)
    paths = [directory / "rules.yml", directory / "alerts.yml"]
    for path, document in zip(paths, (rules, alerts), strict=True):
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    return paths


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
    fleet_env["FLEET_EXTRA_JOB_MODULES"] = '["tests.jobs_for_tests"]'
    settings = FleetSettings(
        home=Path(fleet_env["FLEET_HOME"]),
        database_url=fleet_env["FLEET_DATABASE_URL"],
        redis_url=fleet_env["FLEET_REDIS_URL"],
        config_dir=config,
    )
    rt = Runtime(settings)
    yield fleet_env, rt
    rt.close()


def query(url: str, expression: str) -> list[dict[str, Any]]:
    """An instant query; fails the test with Prometheus's error when it has one."""
    body = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=10).json()
    assert body["status"] == "success", f"{expression}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def scalar(url: str, expression: str) -> float | None:
    result = query(url, expression)
    return float(result[0]["value"][1]) if result else None


def named(name: str, status: str = "firing", **labels: str) -> Callable[[Alert], bool]:
    def match(alert: Alert) -> bool:
        found = alert["labels"]
        return (
            alert["status"] == status
            and found.get("alertname") == name
            and all(found.get(k) == v for k, v in labels.items())
        )

    return match


def seed_overdue_secret(rt: Runtime) -> None:
    store = open_store(rt.settings, rt.engine)
    store.write("svc/old", {"password": "old-pass-1"})
    with rt.engine.begin() as connection:
        connection.execute(
            update(FleetSecretVersion)
            .where(FleetSecretVersion.path == "platform/svc/old")
            .values(created_time=datetime.now(UTC) - timedelta(days=40))
        )


def set_csrf(rt: Runtime, value: bool) -> None:
    with rt.sessions.begin() as session:
        set_configuration(
            session,
            key="security.csrf_protection",
            value=value,
            environment="production",
            user_id="on-call",
            now=datetime.now(UTC),
        )


def open_findings(env: dict[str, str]) -> int:
    report = run_fleet("drift", "report", "--json", env=env)
    assert report.returncode == 0, report.stderr
    return len(orjson.loads(report.stdout))


def test_alerts_fire_and_resolve_through_alertmanager_with_two_workers(
    fleet: tuple[dict[str, str], Runtime], spawn: Spawn, tmp_path: Path
) -> None:
    env, rt = fleet
    seed_overdue_secret(rt)
    set_csrf(rt, False)  # production's live CSRF protection off: critical drift
    ports = {name: free_port() for name in ("a", "b", "scheduler", "exporter")}

    def worker(name: str, queues: str) -> FleetProcess:
        port = str(ports[name])
        args = ("worker", "-Q", queues, "-c", "1", "-n", f"worker-{name}", "--metrics-port", port)
        return spawn(*args, env=env, name=f"worker-{name}")

    worker("a", "default,drift")
    worker_b = worker("b", "drift,secrets")
    schedule = str(tmp_path / "schedule.yaml")
    spawn(
        "scheduler", "--schedule-file", schedule, "--metrics-port", str(ports["scheduler"]), env=env
    )
    spawn("exporter", "--metrics-port", str(ports["exporter"]), env=env)
    for port in ports.values():  # up before Prometheus's first look: no "down" at start
        wait_for(lambda p=port: serving(p), timeout=60, what=f"/metrics on port {port}")
    targets = {
        "fleet-workers": [f"127.0.0.1:{ports['a']}", f"127.0.0.1:{ports['b']}"],
        "fleet-schedulers": [f"127.0.0.1:{ports['scheduler']}"],
        "fleet-exporter": [f"127.0.0.1:{ports['exporter']}"],
    }
    rules = shortened_rules(tmp_path)
    config = PROMETHEUS / "prometheus.yml"
    with (
        WebhookReceiver() as receiver,
        alertmanager(receiver.url) as am_url,
        prometheus_from_config(config, targets, rules, alertmanager_url=am_url) as url,
    ):
        # Production drift, the overdue secret and the failing job reach the receiver.
        drift = receiver.wait_for(
            named("FleetProductionDriftCritical", kind="value_changed"), 120, "drift alert"
        )
        assert "production" in drift["annotations"]["description"]
        receiver.wait_for(named("FleetSecretRotationOverdue", path="svc/old"), 60, "overdue")
        failing = receiver.wait_for(
            named("FleetTaskFailureRatioHigh", task="test.refused"), 60, "failure ratio"
        )
        assert failing["annotations"]["summary"] == "More than 10% of test.refused runs fail"

        # Fleet-wide gauges: once, equal to the database, whatever the number of workers.
        def ran_on_both() -> bool:
            with rt.sessions() as session:
                workers = select(func.count(distinct(TaskRun.worker))).where(
                    TaskRun.job == "drift.detect", TaskRun.outcome == "success"
                )
                return session.scalar(workers) == 2

        wait_for(ran_on_both, timeout=60, what="drift.detect run by both workers")
        wait_for(
            lambda: scalar(url, "sum(fleet_drift_findings)") == open_findings(env),
            timeout=30,
            what="Prometheus's open findings to equal fleet drift report's",
        )
        with rt.sessions() as session:
            statuses = session.scalar(select(func.count()).select_from(SecretRotationStatus))
        assert scalar(url, "sum(fleet_secrets)") == statuses
        assert query(url, '{__name__=~"fleet_.+", exported_job!=""}') == []
        assert query(url, '{__name__=~"fleet_.+", exported_instance!=""}') == []
        per_task = query(url, "count by (task) (fleet_job_last_success_timestamp_seconds)")
        assert {r["metric"]["task"]: r["value"][1] for r in per_task} == dict.fromkeys(
            INTERVALS, "1"
        )
        check_dashboards(url)

        # The drift is fixed: the alert resolves, whichever worker ran the detection.
        set_csrf(rt, True)
        receiver.wait_for(
            named("FleetProductionDriftCritical", "resolved", kind="value_changed"),
            60,
            "the drift alert resolved",
        )

        # Worker B stops: only secrets.check_rotation, which only B runs, stops succeeding.
        worker_b.stop()
        receiver.wait_for(
            named("FleetJobNotSucceeding", task="secrets.check_rotation"), 60, "dead man's switch"
        )
        worker("b", "drift,secrets")
        receiver.wait_for(
            named("FleetJobNotSucceeding", "resolved", task="secrets.check_rotation"),
            90,
            "the dead man's switch resolved",
        )
        received = receiver.alerts()

    switched = {
        a["labels"]["task"] for a in received if a["labels"]["alertname"] == "FleetJobNotSucceeding"
    }
    assert switched == {"secrets.check_rotation"}
    names = {a["labels"]["alertname"] for a in received}
    assert not names & {"FleetWorkersDown", "FleetSchedulerDown", "FleetExporterDown"}
    assert not names & {"FleetBrokerDown", "FleetDatabaseUnreachable"}
    sections = {line[3:].strip() for line in RUNBOOK.read_text().splitlines() if line[:3] == "## "}
    for alert in received:
        labels, annotations = alert["labels"], alert["annotations"]
        assert labels["severity"] in {"critical", "warning"}, labels
        assert labels["alertname"] in sections, labels
        assert annotations["runbook"] == f"monitoring/RUNBOOK.md#{labels['alertname'].lower()}"
        assert annotations["summary"] and annotations["description"]
        assert "{{" not in annotations["summary"] + annotations["description"]
        assert not any(label.startswith("exported_") for label in labels), labels


# Grafana's built-in variables, as Grafana would substitute them for a 6-hour view.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "6h"}


def check_dashboards(url: str) -> None:
    """Every panel query of every dashboard evaluates against the real Prometheus, and a
    panel drawn per task draws one series per task."""
    checked = 0
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = orjson.loads(path.read_bytes())
        panels = [p for top in board["panels"] for p in (top, *top.get("panels", []))]
        for panel in panels:
            for target in panel.get("targets", []):
                expression = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expression = expression.replace(variable, value)
                assert "$" not in expression, f"{path.name}: {panel['title']}: {expression}"
                result = query(url, expression)
                checked += 1
                if target.get("legendFormat") == "{{task}}":
                    tasks = [r["metric"].get("task") for r in result]
                    assert tasks and None not in tasks, f"{path.name}: {panel['title']}"
                    assert len(tasks) == len(set(tasks)), f"{path.name}: {panel['title']}"
    assert checked > 30


ROLLOUT_SCHEDULE = """
schedules:
  - {name: rollouts, job: rollouts.advance, cron: "*/2 * * * * *", misfire_grace_seconds: 2}
"""


def test_rollout_alerts_fire_through_alertmanager_from_a_workers_first_rollback(
    fleet: tuple[dict[str, str], Runtime], spawn: Spawn, tmp_path: Path
) -> None:
    """The three rollout alerts, from the shipped rules (times shortened) through a real
    Prometheus and Alertmanager: a rollout a worker rolls back (its judge finds no data and
    fails closed), one a person's change stops (conflict), one whose step began 7 hours ago
    (stuck). The rollback is the worker's first: its counter series is scraped at 0 before
    it, so increase() sees it (a series first scraped at 1 never alerted)."""
    from tasks.rollouts import start_rollout
    from tasks.rollouts.demo import latency_rollout
    from tests.flags import add_flags, human_update
    from workers.db.models import FlagRollout

    env, rt = fleet
    now = datetime.now(UTC)
    add_flags(rt, "new_back", "new_conflict", "new_stuck")
    for name, key in (("conflicted", "new_conflict"), ("stuck", "new_stuck")):
        with rt.sessions.begin() as session:
            spec = latency_rollout(name, key, "production", min_step="10h", min_impressions=0)
            start_rollout(session, spec, now, "test")
    human_update(rt, "new_conflict", 50.0)
    with rt.sessions.begin() as session:
        stuck = session.scalars(select(FlagRollout).where(FlagRollout.name == "stuck")).one()
        stuck.step_started_at = now - timedelta(hours=7)

    ports = {name: free_port() for name in ("worker", "scheduler", "exporter")}
    targets = {
        "fleet-workers": [f"127.0.0.1:{ports['worker']}"],
        "fleet-schedulers": [f"127.0.0.1:{ports['scheduler']}"],
        "fleet-exporter": [f"127.0.0.1:{ports['exporter']}"],
    }
    (tmp_path / "rollouts.yaml").write_text(ROLLOUT_SCHEDULE)
    rules = shortened_rules(tmp_path)
    with (
        WebhookReceiver() as receiver,
        alertmanager(receiver.url) as am_url,
        prometheus_from_config(
            PROMETHEUS / "prometheus.yml", targets, rules, alertmanager_url=am_url
        ) as url,
    ):
        env["FLEET_PROMETHEUS_URL"] = url
        worker = ("worker", "-Q", "canary", "-c", "1", "--metrics-port", str(ports["worker"]))
        spawn(*worker, env=env, name="worker")
        spawn("exporter", "--metrics-port", str(ports["exporter"]), env=env)
        wait_for(
            lambda: scalar(url, 'sum(fleet_rollout_steps_total{decision="rollback"})') == 0,
            timeout=60,
            what="the worker's rollback counter scraped at 0",
        )
        from tasks.drift.model import KINDS
        from tasks.impressions.records import REASONS

        at_zero = {  # every alerted counter series the worker knows of, before any event
            'fleet_task_runs_total{task="rollouts.advance", outcome="lost"}': 1,
            "fleet_messages_refused_total": 5,
            "fleet_impressions_dead_lettered_total": len(REASONS),
            "fleet_canary_decisions_total": 3,
            "fleet_rollout_steps_total": 6,
            'fleet_drift_findings_opened_total{environment="production"}': 2 * len(KINDS),
        }
        for series, count in at_zero.items():
            assert scalar(url, f"count({series})") == count, series
            assert scalar(url, f"sum({series})") == 0, series
        spawn(
            "scheduler",
            "--schedule-file",
            str(tmp_path / "rollouts.yaml"),
            "--metrics-port",
            str(ports["scheduler"]),
            env=env,
        )
        receiver.wait_for(named("FleetRolloutConflict"), 90, "the conflict alert")
        with rt.sessions.begin() as session:
            spec = latency_rollout(
                "back",
                "new_back",
                "production",
                min_impressions=0,
                treatment={"selector": 'flag="new_back",flag_variant="missing"'},
                analysis={"window": 20, "step": 1, "min_samples": 8, "inconclusive_limit": 2},
            )
            start_rollout(session, spec, datetime.now(UTC), "test")
        receiver.wait_for(named("FleetRolloutRolledBack"), 90, "the rolled-back alert")
        receiver.wait_for(
            named("FleetRolloutStuck", flag="new_stuck", environment="production"),
            60,
            "the stuck alert",
        )
        assert scalar(url, 'sum(fleet_rollout_steps_total{decision="rollback"})') == 1
        received = receiver.alerts()

    with rt.sessions() as session:
        states = dict(session.execute(select(FlagRollout.name, FlagRollout.state)).all())
    assert states == {"conflicted": "conflict", "stuck": "active", "back": "rolled_back"}
    stuck_alerts = [a for a in received if a["labels"]["alertname"] == "FleetRolloutStuck"]
    assert {a["labels"]["flag"] for a in stuck_alerts} == {"new_stuck"}
    sections = {line[3:].strip() for line in RUNBOOK.read_text().splitlines() if line[:3] == "## "}
    for alert in received:
        if alert["labels"]["alertname"].startswith("FleetRollout"):
            assert alert["labels"]["alertname"] in sections
            assert "{{" not in alert["annotations"]["description"]
