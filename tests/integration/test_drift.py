"""drift.detect against real databases: the lifecycle, locks, bad inputs, metrics, the CLI."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from celery import Celery
from prometheus_client import REGISTRY
from sqlalchemy import select, update

from tests.helpers import fleet_gauge, run_fleet
from workers.celery_app import create_app
from workers.configstore import delete_configuration, set_configuration
from workers.db.models import Configuration, DriftFindingRow, FleetAuditLog, TaskRun
from workers.locks import job_locks
from workers.logs import configure_logging
from workers.runtime import Runtime, install
from workers.settings import FleetSettings

PRODUCTION = """
services:
  chat_service:
    replicas: 10
    autoscaling: {enabled: true, min_replicas: 10, max_replicas: 100}
security:
  cors_origins: ["https://app.example.com"]
  csrf_protection: true
monitoring:
  sample_rate: 0.1
"""
STAGING = """
services:
  chat_service:
    replicas: 3
security:
  cors_origins: ["https://staging.example.com"]
  csrf_protection: true
monitoring:
  sample_rate: 0.5
  retention_days: 14
"""
RULES = """
expected:
  - key: "monitoring.retention_days"
    kinds: [missing_in_environment]
    reason: production keeps the default
  - key: "services.*.autoscaling.*"
    environments: [staging]
    kinds: [missing_in_environment]
    reason: staging runs fixed replicas
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    (directory / "environments").mkdir(parents=True)
    (directory / "environments" / "production.yaml").write_text(PRODUCTION)
    (directory / "environments" / "staging.yaml").write_text(STAGING)
    (directory / "drift-rules.yaml").write_text(RULES)
    return directory


@pytest.fixture
def app(db_url: str, redis_url: str, tmp_path: Path, config_dir: Path) -> Iterator[Celery]:
    settings = FleetSettings(
        home=tmp_path, database_url=db_url, redis_url=redis_url, config_dir=config_dir
    )
    rt = install(Runtime(settings))
    application = create_app(rt)
    yield application
    application.close()
    rt.close()


def rt_of(app: Celery) -> Runtime:
    runtime: Runtime = app.fleet_runtime
    return runtime


def seed(app: Celery, environment: str, values: dict[str, Any]) -> None:
    with rt_of(app).sessions.begin() as session:
        for key, value in values.items():
            set_configuration(
                session,
                key=key,
                value=value,
                environment=environment,
                user_id="test",
                now=datetime.now(UTC),
            )


def seed_as_declared(app: Celery) -> None:
    seed(
        app,
        "production",
        {
            "services.chat_service.replicas": 10,
            "services.chat_service.autoscaling.enabled": True,
            "services.chat_service.autoscaling.min_replicas": 10,
            "services.chat_service.autoscaling.max_replicas": 100,
            "security.cors_origins": ["https://app.example.com"],
            "security.csrf_protection": True,
            "monitoring.sample_rate": 0.1,
        },
    )
    seed(
        app,
        "staging",
        {
            "services.chat_service.replicas": 3,
            "security.cors_origins": ["https://staging.example.com"],
            "security.csrf_protection": True,
            "monitoring.sample_rate": 0.5,
            "monitoring.retention_days": 14,
        },
    )


def detect(app: Celery, **kwargs: Any) -> dict[str, Any]:
    result = app.tasks["drift.detect"].apply(kwargs=kwargs)
    assert result.successful(), result.result
    value: dict[str, Any] = result.result
    return value


def stored(app: Celery) -> dict[tuple[str, str, str], DriftFindingRow]:
    with rt_of(app).sessions() as session:
        rows = session.scalars(select(DriftFindingRow)).all()
    return {(r.kind, r.environment, r.key): r for r in rows}


def test_a_clean_fleet_has_only_its_expected_differences(app: Celery) -> None:
    seed_as_declared(app)
    summary = detect(app)
    assert summary["new"] == 4
    assert {(f["environment"], f["key"]) for f in summary["findings"]} == {
        ("production", "monitoring.retention_days"),
        ("staging", "services.chat_service.autoscaling.enabled"),
        ("staging", "services.chat_service.autoscaling.min_replicas"),
        ("staging", "services.chat_service.autoscaling.max_replicas"),
    }
    assert all(f["kind"] == "missing_in_environment" for f in summary["findings"])
    assert all((f["severity"], f["expected"]) == ("info", True) for f in summary["findings"])
    assert summary["findings"][0]["reason"] in (
        "production keeps the default",
        "staging runs fixed replicas",
    )


def test_lifecycle_open_update_resolve_reopen(app: Celery) -> None:
    seed_as_declared(app)
    detect(app)
    key = ("value_changed", "production", "security.csrf_protection")

    seed(app, "production", {"security.csrf_protection": False})
    first = detect(app)
    assert first["new"] == 2  # the value, and the live schema check (CSRF off in production)
    row = stored(app)[key]
    assert (row.severity, row.before, row.after, row.resolved_at) == (
        "critical",
        "true",
        "false",
        None,
    )
    opened_at = row.first_seen

    again = detect(app)
    assert (again["new"], again["resolved"]) == (0, 0)
    row = stored(app)[key]
    assert row.first_seen == opened_at and row.last_seen > opened_at

    seed(app, "production", {"security.csrf_protection": True})
    fixed = detect(app)
    assert fixed["resolved"] == 2
    assert {(f["kind"], f["key"]) for f in fixed["resolved_findings"]} == {
        ("value_changed", "security.csrf_protection"),
        ("schema_violation", "security.csrf_protection"),
    }
    assert stored(app)[key].resolved_at is not None

    seed(app, "production", {"security.csrf_protection": False})
    back = detect(app)
    assert back["new"] == 2
    row = stored(app)[key]
    assert row.resolved_at is None and row.times_opened == 2 and row.first_seen == opened_at


def test_every_desired_live_kind_is_found_and_ranked(app: Celery) -> None:
    seed_as_declared(app)
    seed(app, "production", {"services.chat_service.replicas": 4, "feature.debug": True})
    with rt_of(app).sessions.begin() as session:
        delete_configuration(
            session,
            key="monitoring.sample_rate",
            environment="production",
            user_id="test",
            now=datetime.now(UTC),
        )
    seed(app, "staging", {"services.chat_service.replicas": "3"})
    detect(app)
    found = stored(app)
    assert (
        found[("value_changed", "production", "services.chat_service.replicas")].severity
        == "critical"
    )
    assert (
        found[("schema_violation", "production", "services.chat_service.replicas")].source == "live"
    )
    assert found[("unexpected_in_live", "production", "feature.debug")].after == "true"
    assert found[("missing_in_live", "production", "monitoring.sample_rate")].before == "0.1"
    staging = found[("value_changed", "staging", "services.chat_service.replicas")]
    assert (staging.severity, staging.before, staging.after) == ("warning", "3", '"3"')


def test_a_run_for_one_environment_leaves_the_others_and_the_comparisons_alone(app: Celery) -> None:
    seed_as_declared(app)
    seed(app, "staging", {"services.chat_service.replicas": 1})
    seed(app, "production", {"services.chat_service.replicas": 4})  # seen again below
    detect(app)
    before = stored(app)
    seed(app, "staging", {"services.chat_service.replicas": 3})
    summary = detect(app, environment="production")
    assert summary["environments"] == ["production"]
    after = stored(app)
    staging = ("value_changed", "staging", "services.chat_service.replicas")
    assert after[staging].resolved_at is None
    assert after[staging].last_seen == before[staging].last_seen  # not seen by this run
    cross = ("missing_in_environment", "production", "monitoring.retention_days")
    assert after[cross].resolved_at is None and before[cross].resolved_at is None
    assert after[cross].last_seen == before[cross].last_seen
    production = ("value_changed", "production", "services.chat_service.replicas")
    assert after[production].last_seen > before[production].last_seen


def test_a_second_concurrent_run_skips_and_says_so(app: Celery) -> None:
    seed_as_declared(app)
    with job_locks(rt_of(app).redis, ["drift:production"], ttl=60) as busy:
        assert busy is None
        result = detect(app)
    assert result == {
        "skipped": True,
        "reason": "another drift run holds the drift:production lock",
        "environment": None,
    }
    with rt_of(app).sessions() as session:
        run = session.scalars(select(TaskRun).where(TaskRun.job == "drift.detect")).one()
    assert run.outcome == "skipped"
    assert stored(app) == {}


def test_bad_inputs_give_findings_and_log_lines_and_the_run_goes_on(
    app: Celery, config_dir: Path
) -> None:
    seed_as_declared(app)
    (config_dir / "environments" / "staging.yaml").write_text("services: [1, 2\nx: 1\n")
    (config_dir / "environments" / "qa.yaml").write_text("- not\n- a mapping\n")
    (config_dir / "drift-rules.yaml").write_text("expected:\n  - key: a\n")
    with rt_of(app).sessions.begin() as session:
        session.execute(
            update(Configuration)
            .where(
                Configuration.key == "services.chat_service.replicas",
                Configuration.environment == "production",
                Configuration.active.is_(True),
            )
            .values(value="{oops")
        )
    stream = io.StringIO()
    configure_logging(level="INFO", log_format="json", stream=stream)
    summary = detect(app)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    events = {line["event"] for line in lines}
    assert {"drift_source_unusable", "drift_live_value_unusable", "drift_rules_unusable"} <= events
    found = stored(app)
    invalid = {(env, key) for kind, env, key in found if kind == "invalid_source"}
    staging_file = str(config_dir / "environments" / "staging.yaml")
    assert ("staging", f"{staging_file}:2") in invalid, invalid
    assert ("qa", str(config_dir / "environments" / "qa.yaml") + ":1") in invalid
    assert ("production", "services.chat_service.replicas") in invalid
    assert ("all", str(config_dir / "drift-rules.yaml")) in invalid
    # The rest still ran: production's other keys are compared, without the bad value.
    assert ("missing_in_live", "production", "services.chat_service.replicas") not in found
    assert summary["by_kind"]["invalid_source"] == 4
    # The broken rules file declares nothing: no finding is taken as expected.
    assert not any(row.expected for row in found.values())


def test_metrics_follow_the_findings(app: Celery) -> None:
    seed_as_declared(app)
    seed(app, "production", {"security.csrf_protection": False})
    detect(app)

    def gauge(env: str, kind: str, severity: str) -> float | None:
        labels = {"environment": env, "kind": kind, "severity": severity}
        return fleet_gauge(rt_of(app).sessions, "fleet_drift_findings", labels)

    assert gauge("production", "value_changed", "critical") == 1
    assert gauge("production", "schema_violation", "critical") == 1
    assert gauge("production", "missing_in_environment", "info") == 1
    last = fleet_gauge(
        rt_of(app).sessions, "fleet_drift_last_run_timestamp_seconds", {"environment": "production"}
    )
    assert last is not None and abs(last - datetime.now(UTC).timestamp()) < 60

    seed(app, "production", {"security.csrf_protection": True})
    resolved_before = (
        REGISTRY.get_sample_value(
            "fleet_drift_findings_resolved_total",
            {"environment": "production", "kind": "value_changed", "severity": "critical"},
        )
        or 0
    )
    detect(app)
    assert gauge("production", "value_changed", "critical") is None  # the series is gone
    assert (
        REGISTRY.get_sample_value(
            "fleet_drift_findings_resolved_total",
            {"environment": "production", "kind": "value_changed", "severity": "critical"},
        )
        == resolved_before + 1
    )


def test_an_expiring_rule_opens_its_finding_and_every_event_is_audited(
    app: Celery, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: when an ``expected`` rule expires, its finding is opened again (counted,
    so the new-drift alert fires, and logged); openings and resolutions are written to
    fleet_audit_log, without values."""
    import tasks.drift

    seed_as_declared(app)
    seed(app, "production", {"monitoring.sample_rate": 0.9})
    (config_dir / "drift-rules.yaml").write_text(
        RULES
        + """  - key: "monitoring.sample_rate"
    environments: [production]
    kinds: [value_changed]
    reason: load test until the end of June
    expires: 2026-06-30
"""
    )
    before = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
    monkeypatch.setattr(tasks.drift, "clock", lambda: before)
    detect(app)
    key = ("value_changed", "production", "monitoring.sample_rate")
    assert (stored(app)[key].severity, stored(app)[key].expected) == ("info", True)

    labels = {"environment": "production", "kind": "value_changed", "severity": "critical"}
    opened_before = REGISTRY.get_sample_value("fleet_drift_findings_opened_total", labels) or 0
    stream = io.StringIO()
    configure_logging(level="INFO", log_format="json", stream=stream)
    monkeypatch.setattr(tasks.drift, "clock", lambda: before + timedelta(days=1))
    expired = detect(app)
    assert expired["new"] == 1 and expired["new_findings"] == [stored(app)[key].fingerprint]
    row = stored(app)[key]
    assert (row.severity, row.expected, row.times_opened) == ("critical", False, 2)
    assert row.opened_at == before + timedelta(days=1)
    assert REGISTRY.get_sample_value("fleet_drift_findings_opened_total", labels) == (
        opened_before + 1
    )
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["key"] for line in lines if line["event"] == "drift_finding_opened"] == [
        "monitoring.sample_rate"
    ]
    again = detect(app)
    assert again["new"] == 0  # opened once, not at every run

    seed(app, "production", {"monitoring.sample_rate": 0.1})
    assert detect(app)["resolved"] == 1
    with rt_of(app).sessions() as session:
        events = session.scalars(
            select(FleetAuditLog)
            .where(FleetAuditLog.subject == "value_changed:production:monitoring.sample_rate")
            .order_by(FleetAuditLog.id)
        ).all()
    assert [(e.action, e.metadata_["severity"]) for e in events] == [
        ("drift_finding_opened", "info"),
        ("drift_finding_opened", "critical"),
        ("drift_finding_resolved", "critical"),
    ]
    assert events[0].metadata_["reason"] == "load test until the end of June"
    assert all(e.actor == "config-fleet" for e in events)
    assert "0.9" not in json.dumps([e.metadata_ for e in events])


def test_fleet_run_and_drift_report(fleet_env: dict[str, str], config_dir: Path) -> None:
    fleet_env["FLEET_CONFIG_DIR"] = str(config_dir)
    done = run_fleet("run", "drift.detect", "--arg", "environment=production", env=fleet_env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["environments"] == ["production"]
    assert summary["by_kind"] == {"missing_in_live": 7}
    assert summary["by_severity"] == {"critical": 7}

    report = run_fleet("drift", "report", "--json", "-e", "production", env=fleet_env)
    assert report.returncode == 0, report.stderr
    rows = json.loads(report.stdout)
    assert len(rows) == 7 and all(r["kind"] == "missing_in_live" for r in rows)

    table = run_fleet("drift", "report", env=fleet_env)
    assert table.returncode == 0 and "services.chat_service.replicas" in table.stdout

    unknown = run_fleet("run", "drift.detect", "--arg", "environment=qa", env=fleet_env)
    assert unknown.returncode == 1
    assert "unknown environment 'qa' (known: production, staging)" in unknown.stderr


def test_secrets_in_live_configuration_never_reach_findings_or_logs(app: Celery) -> None:
    seed_as_declared(app)
    with rt_of(app).sessions.begin() as session:
        set_configuration(
            session,
            key="external_apis.openai.api_key",
            value="sk-live-98765",
            environment="production",
            user_id="t",
            now=datetime.now(UTC),
            sensitive=True,
        )
    stream = io.StringIO()
    configure_logging(level="INFO", log_format="json", stream=stream)
    summary = detect(app)
    assert "sk-live-98765" not in json.dumps(summary) + stream.getvalue()
    row = stored(app)[("unexpected_in_live", "production", "external_apis.openai.api_key")]
    assert row.after == "***"


@pytest.fixture(autouse=True)
def _no_fleet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)


def test_desired_files_are_parsed_once_per_content(app: Celery, config_dir: Path) -> None:
    seed_as_declared(app)
    client = rt_of(app).redis
    detect(app)
    cached = set(client.scan_iter("fleet:drift:desired:*"))
    assert len(cached) == 2  # production and staging
    detect(app)
    assert set(client.scan_iter("fleet:drift:desired:*")) == cached
    staging = config_dir / "environments" / "staging.yaml"
    staging.write_text(staging.read_text().replace("replicas: 3", "replicas: 2"))
    summary = detect(app)
    assert len(set(client.scan_iter("fleet:drift:desired:*"))) == 3  # the edit is a new entry
    changed = [f for f in summary["findings"] if f["kind"] == "value_changed"]
    assert [(f["environment"], f["key"], f["before"], f["after"]) for f in changed] == [
        ("staging", "services.chat_service.replicas", "2", "3")
    ]


# Planted secrets: never in findings, logs, JSON, metrics or any table ---------------------

SECRETS = ("98765432109876", "redis-secret-5555", "live-secret-7777", "tok-live-3333")
PLANTED = """
database:
  postgresql:
    password: 98765432109876
  redis:
    host: redis.internal
    password: redis-secret-5555
security:
  csrf_protection: true
"""
SENSITIVE_RULES = 'sensitive: ["*password*", "*token*"]\n'


# Where the platform keeps the live values (the seeding wrote them there, as it would).
PLATFORMS_OWN = {"configurations", "configuration_history", "configuration_audit_log"}


def _everywhere(app: Celery, output: str) -> str:
    """Everything the run left behind: its output and logs, every row of every other table,
    the workers' and the exporter's metrics."""
    from prometheus_client import generate_latest

    from monitoring.exporter import build_fleet_registry
    from workers.db.models import Base

    rt = rt_of(app)
    parts = [output, generate_latest(REGISTRY).decode()]
    parts.append(generate_latest(build_fleet_registry(rt)).decode())
    with rt.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            if table.name in PLATFORMS_OWN:
                continue
            rows = connection.execute(table.select()).all()
            parts.append(repr(rows))
    return "\n".join(parts)


def test_planted_secrets_leak_nowhere_with_good_or_broken_rules(
    app: Celery, config_dir: Path
) -> None:
    from tasks.drift import LAST_GOOD_RULES

    (config_dir / "environments" / "production.yaml").write_text(PLANTED)
    (config_dir / "environments" / "staging.yaml").unlink()
    rules = config_dir / "drift-rules.yaml"
    rules.write_text(SENSITIVE_RULES)
    seed(
        app,
        "production",
        {
            "database.redis.host": "redis.internal",
            "database.redis.password": "live-secret-7777",  # differs from desired
            "external_apis.stripe.api_token": "tok-live-3333",  # not declared, not marked
            "security.csrf_protection": True,
        },
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
        "FLEET_HOME": str(rt_of(app).settings.home),
        "FLEET_DATABASE_URL": rt_of(app).settings.database_url or "",
        "FLEET_REDIS_URL": rt_of(app).settings.redis_url or "",
        "FLEET_CONFIG_DIR": str(config_dir),
    }
    for phase in ("good rules", "broken, the last good kept", "broken, none kept"):
        if phase != "good rules":
            rules.write_text("sensitive: [unclosed\n")
        if phase == "broken, none kept":
            rt_of(app).redis.delete(LAST_GOOD_RULES)
        stream = io.StringIO()
        configure_logging(level="DEBUG", log_format="json", stream=stream)
        summary = detect(app)
        report = run_fleet("drift", "report", "--json", env=env)
        table = run_fleet("drift", "report", env=env)
        assert report.returncode == 0 and table.returncode == 0, report.stderr + table.stderr
        output = json.dumps(summary) + stream.getvalue() + report.stdout + table.stdout
        found = _everywhere(app, output)
        assert [s for s in SECRETS if s in found] == [], phase
        kinds = {(f["kind"], f["key"]) for f in summary["findings"]}
        assert ("schema_violation", "database.postgresql.password") in kinds, phase
        assert ("value_changed", "database.redis.password") in kinds, phase
        if phase != "good rules":
            invalid = [f for f in summary["findings"] if f["kind"] == "invalid_source"]
            which = (
                "using the last good rules"
                if phase == "broken, the last good kept"
                else "every value is treated as sensitive"
            )
            assert invalid and which in invalid[0]["message"], phase


@pytest.mark.parametrize("whole_read", [False, True])
def test_stale_entries_of_the_platforms_cache_are_found_and_healed_on_request(
    app: Celery, redis_url: str, monkeypatch: pytest.MonkeyPatch, whole_read: bool
) -> None:
    """Entries in the reference's key format (both spellings) against the active rows:
    current ones pass, stale, orphaned and unreadable ones are ``stale_cache``; a secret's
    cached value never appears. With healing on, the entries go and the platform's change
    events are published; the next run resolves the findings."""
    import tasks.drift.cache
    from tests.platform_reader import Watcher

    if whole_read:  # the environments' rows read at once, as for a large cache
        monkeypatch.setattr(tasks.drift.cache, "WHOLE_READ", 1)
    rt = rt_of(app)
    seed_as_declared(app)
    with rt.sessions.begin() as session:
        set_configuration(
            session,
            key="security.csrf_protection",
            value=False,
            environment="production",
            scope="tenant",
            tenant_id="acme",
            user_id="t",
            now=datetime.now(UTC),
        )
        set_configuration(
            session,
            key="database.postgresql.password",
            value="hunter2-live",
            environment="production",
            sensitive=True,
            user_id="t",
            now=datetime.now(UTC),
        )
    cache = rt.redis
    cache.set("config:production:environment:services.chat_service.replicas", "10")  # fresh
    cache.set("config::production:environment:monitoring.sample_rate", "0.25")  # stale
    cache.set("config::production:tenant:security.csrf_protection:acme", "true")  # stale
    cache.set("config:production:service:security.cors_origins", '["x"]')  # no such row
    cache.set("config:staging:environment:monitoring.sample_rate", "{not json")
    cache.set("config::production:environment:database.postgresql.password", '"hunter2-old"')
    cache.set(
        "config:production:environment:services.chat_service.autoscaling.enabled", "true"
    )  # fresh
    result = detect(app)
    assert result["cache_entries"] == 7 and result["cache_healed"] == 0
    found = {k: r for k, r in stored(app).items() if k[0] == "stale_cache"}
    assert sorted((env, key) for _, env, key in found) == [
        ("production", "database.postgresql.password@environment"),
        ("production", "monitoring.sample_rate@environment"),
        ("production", "security.cors_origins@service"),
        ("production", "security.csrf_protection@tenant/acme"),
        ("staging", "monitoring.sample_rate@environment"),
    ]
    rate = found[("stale_cache", "production", "monitoring.sample_rate@environment")]
    assert (rate.before, rate.after, rate.severity) == ("0.1", "0.25", "critical")
    secret = found[("stale_cache", "production", "database.postgresql.password@environment")]
    assert (secret.before, secret.after) == ("***", "***")
    everything = json.dumps(result) + json.dumps([r.message for r in found.values()])
    assert "hunter2" not in everything
    assert cache.get("config::production:environment:monitoring.sample_rate") == b"0.25"

    monkeypatch.setattr(rt, "settings", rt.settings.model_copy(update={"drift_heal_cache": True}))
    watcher = Watcher(redis_url, rt.engine)
    try:
        healed = detect(app)
        assert healed["cache_healed"] == 5
        events = watcher.wait_for(5)
        assert sorted(
            (e["environment"], e["scope"], e["key"], e["tenant_id"] or "") for e in events
        ) == [
            ("production", "environment", "database.postgresql.password", ""),
            ("production", "environment", "monitoring.sample_rate", ""),
            ("production", "service", "security.cors_origins", ""),
            ("production", "tenant", "security.csrf_protection", "acme"),
            ("staging", "environment", "monitoring.sample_rate", ""),
        ]
    finally:
        watcher.close()
    assert sorted(k.decode() for k in cache.keys("config:*")) == [
        "config:production:environment:services.chat_service.autoscaling.enabled",
        "config:production:environment:services.chat_service.replicas",
    ]
    with rt.sessions() as session:
        audited = session.scalars(
            select(FleetAuditLog.subject).where(FleetAuditLog.action == "drift_cache_healed")
        ).all()
    assert len(audited) == 5
    detect(app)
    assert not [
        k for k, r in stored(app).items() if k[0] == "stale_cache" and r.resolved_at is None
    ]


def test_an_unreachable_platform_cache_is_said_not_passed(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers import free_port

    rt = rt_of(app)
    seed_as_declared(app)
    down = {"drift_cache_redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    monkeypatch.setattr(rt, "settings", rt.settings.model_copy(update=down))
    detect(app)
    problems = [k for k in stored(app) if k[0] == "invalid_source"]
    assert ("invalid_source", "production", "platform cache") in problems


def test_service_and_tenant_overrides_are_checked_as_the_layers_they_are(app: Celery) -> None:
    rt = rt_of(app)
    seed_as_declared(app)
    now = datetime.now(UTC)

    def override(key: str, value: Any, scope: str, tenant: str | None, **extra: Any) -> None:
        with rt.sessions.begin() as session:
            set_configuration(
                session,
                key=key,
                value=value,
                environment="production",
                scope=scope,
                tenant_id=tenant,
                user_id="t",
                now=now,
                **extra,
            )

    override("services.chat_service.replicas", 500, "tenant", "acme")  # over the schema's 100
    override("feature.old_flag", True, "tenant", "acme")  # production no longer declares it
    override("monitoring.sample_rate", 0.1, "tenant", "beta")  # the environment's own value
    override("security.csrf_protection", True, "service", None)  # the environment's too
    override("security.csrf_protection", True, "tenant", "gamma")  # the service's value
    override("monitoring.sample_rate", 0.2, "tenant", "delta")  # a real override: fine
    override("database.postgresql.password", "hunter2-tenant", "tenant", "acme", sensitive=True)
    result = detect(app)
    found = {
        (kind, key): row
        for (kind, env, key), row in stored(app).items()
        if "@" in key and env == "production"
    }
    assert sorted(found) == [
        ("orphan_override", "database.postgresql.password@tenant/acme"),
        ("orphan_override", "feature.old_flag@tenant/acme"),
        ("redundant_override", "monitoring.sample_rate@tenant/beta"),
        ("redundant_override", "security.csrf_protection@service"),
        ("redundant_override", "security.csrf_protection@tenant/gamma"),
        ("schema_violation", "services.chat_service.replicas@tenant/acme"),
    ]
    orphan = found[("orphan_override", "feature.old_flag@tenant/acme")]
    assert (orphan.severity, orphan.after) == ("critical", "true")
    assert orphan.message == "tenant override for tenant acme of a key production does not declare"
    gamma = found[("redundant_override", "security.csrf_protection@tenant/gamma")]
    assert gamma.severity == "info" and "equal to the service value" in gamma.message
    secret = found[("orphan_override", "database.postgresql.password@tenant/acme")]
    assert secret.after == "***"
    assert "hunter2" not in json.dumps(result) + json.dumps([r.message for r in found.values()])
    labels = [
        sample.labels
        for metric in REGISTRY.collect()
        if metric.name.startswith("fleet_drift")
        for sample in metric.samples
    ]
    assert labels and not any(
        value in {"acme", "beta", "gamma", "delta"} for label in labels for value in label.values()
    )
    # The override fixed: its findings resolve at the next run.
    override("services.chat_service.replicas", 12, "tenant", "acme")
    detect(app)
    still = stored(app)[
        ("schema_violation", "production", "services.chat_service.replicas@tenant/acme")
    ]
    assert still.resolved_at is not None


def _git(*args: str, cwd: Path) -> str:
    import subprocess

    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_desired_configuration_from_git(
    app: Celery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local bare repository as the remote: findings record the commit; a new commit that
    fixes a drift resolves it at the next run; an unreachable remote leaves the last
    fetched commit in use, said in the summary and counted."""
    rt = rt_of(app)
    seed_as_declared(app)
    work, bare = tmp_path / "work", tmp_path / "remote.git"
    (work / "config" / "environments").mkdir(parents=True)
    _git("init", "--quiet", "-b", "main", cwd=work)
    (work / "config" / "environments" / "production.yaml").write_text(
        PRODUCTION.replace("replicas: 10", "replicas: 7")  # live has 10: drift
    )
    (work / "config" / "environments" / "staging.yaml").write_text(STAGING)
    (work / "config" / "drift-rules.yaml").write_text(RULES)
    _git("add", ".", cwd=work)
    _git("commit", "--quiet", "-m", "first", cwd=work)
    first = _git("rev-parse", "HEAD", cwd=work)
    _git("init", "--quiet", "--bare", str(bare), cwd=tmp_path)
    _git("push", "--quiet", str(bare), "main", cwd=work)
    git_settings = {"drift_git_url": str(bare), "drift_git_ref": "main", "drift_git_path": "config"}
    monkeypatch.setattr(rt, "settings", rt.settings.model_copy(update=git_settings))

    result = detect(app)
    assert result["desired"]["git"] | {"url": None} == {
        "url": None,
        "ref": "main",
        "commit": first,
        "fresh": True,
        "error": None,
    }
    key = ("value_changed", "production", "services.chat_service.replicas")
    assert stored(app)[key].desired_commit == first
    assert {row.desired_commit for row in stored(app).values()} == {first}

    (work / "config" / "environments" / "production.yaml").write_text(PRODUCTION)  # the fix
    _git("commit", "--quiet", "-am", "replicas back to 10", cwd=work)
    second = _git("rev-parse", "HEAD", cwd=work)
    _git("push", "--quiet", str(bare), "main", cwd=work)
    result = detect(app)
    assert result["desired"]["git"]["commit"] == second
    assert stored(app)[key].resolved_at is not None
    open_rows = [row for row in stored(app).values() if row.resolved_at is None]
    assert open_rows and {row.desired_commit for row in open_rows} == {second}

    failures = REGISTRY.get_sample_value("fleet_drift_git_fetch_failures_total") or 0.0
    bare.rename(tmp_path / "moved.git")  # the remote is gone
    result = detect(app)
    source = result["desired"]["git"]
    assert (source["commit"], source["fresh"]) == (second, False)
    assert "git fetch" in source["error"]
    assert REGISTRY.get_sample_value("fleet_drift_git_fetch_failures_total") == failures + 1
    assert result["resolved"] == 0 and result["new"] == 0  # compared as before, not emptied
