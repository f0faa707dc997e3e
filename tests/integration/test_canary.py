"""canary.analyze end to end: a real Prometheus scrapes a baseline and two canaries (one
turns bad); the healthy canary is promoted and the bad one rolled back, with the
configurations, history and audit rows to show it. A Prometheus that is down leads to a
rollback after the deadline, never to a promotion."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tasks.canary import analyze, create_deployment
from tasks.canary.demo import latency_canary
from tasks.canary.spec import CanarySpec
from tests.helpers import free_port, run_fleet, wait_for
from tests.platform_reader import Reader, Watcher
from tests.prometheus_server import latency_app, prometheus, samples_in
from workers.configstore import active_value, set_configuration
from workers.db import make_engine
from workers.db.models import (
    CanaryAnalysis,
    CanaryDeployment,
    ConfigurationAuditLog,
    ConfigurationHistory,
    FleetAuditLog,
)
from workers.runtime import Runtime, install
from workers.settings import FleetSettings


def spec(
    name: str,
    canary_job: str,
    key: str,
    *,
    critical: bool = False,
    subset: dict[str, Any] | None = None,
    **analysis: Any,
) -> CanarySpec:
    made = latency_canary(
        name,
        canary_job,
        key,
        25,
        critical=critical,
        **{"inconclusive_limit": 3, "min_samples": 10, **analysis},
    )
    if subset is None:
        return made
    return CanarySpec.model_validate({**made.model_dump(), "subset": subset})


def runtime_for(postgres_url: str, redis_url: str, tmp_path: Path, prometheus_url: str) -> Runtime:
    return install(
        Runtime(
            FleetSettings(
                home=tmp_path,
                database_url=postgres_url,
                redis_url=redis_url,
                prometheus_url=prometheus_url,
            )
        )
    )


def seed(rt: Runtime, key: str) -> None:
    with rt.sessions.begin() as session:
        set_configuration(
            session,
            key=key,
            value=10,
            environment="production",
            user_id="admin",
            now=datetime.now(UTC),
        )


@pytest.fixture(scope="module")
def scraped() -> Iterator[str]:
    bad = {"latency": 0.1}
    apps = {
        "baseline": latency_app(lambda: 0.1, seed=1),
        "canary_good": latency_app(lambda: 0.1, seed=2),
        "canary_bad": latency_app(lambda: bad["latency"], seed=3),
    }
    with prometheus({job: [app.address] for job, app in apps.items()}) as url:
        bad["latency"] = 0.35  # the bad canary turns bad
        wait_for(
            lambda: (
                samples_in(url, 'count_over_time(app_latency_seconds{job="canary_bad"}[20s])') >= 15
            ),
            timeout=60,
            what="20 seconds of samples",
            interval=0.5,
        )
        yield url
    for app in apps.values():
        app.close()


@pytest.fixture
def watcher(redis_url: str, postgres_url: str) -> Iterator[Watcher]:
    engine = make_engine(postgres_url)
    watching = Watcher(redis_url, engine)
    yield watching
    watching.close()
    engine.dispose()


def test_the_healthy_canary_is_promoted_and_the_bad_one_rolled_back(
    scraped: str, postgres_url: str, redis_url: str, tmp_path: Path, watcher: Watcher
) -> None:
    """Through the platform's eyes: a reader reading through the cache and a watcher on
    the change events, for tenants in the subset (acme; zeta, which had its own value)
    and outside it (beta), and for the environment scope."""
    rt = runtime_for(postgres_url, redis_url, tmp_path, scraped)
    reader = Reader(rt.engine, rt.redis)
    pool, tokens = "database.postgresql.pool_size", "services.chat_service.max_tokens"
    for key in (pool, tokens):
        seed(rt, key)
        with rt.sessions.begin() as session:
            set_configuration(
                session,
                key=key,
                value=12,
                environment="production",
                scope="tenant",
                tenant_id="zeta",
                user_id="admin",
                now=datetime.now(UTC),
            )

    def view(key: str) -> dict[str, Any]:
        return {
            "env": reader.get(key, "production", "environment"),
            "acme": reader.get(key, "production", "tenant", "acme"),
            "zeta": reader.get(key, "production", "tenant", "zeta"),
            "beta": reader.get(key, "production", "tenant", "beta"),
        }

    before = {"env": 10, "acme": 10, "zeta": 12, "beta": 10}
    assert view(pool) == view(tokens) == before  # and now cached
    subset = {"tenants": ["acme", "zeta"]}
    with rt.sessions.begin() as session:
        for name, job, key in (
            ("pool-25", "canary_good", pool),
            ("tokens-25", "canary_bad", tokens),
        ):
            create_deployment(
                session,
                spec(name, job, key, subset=subset),
                datetime.now(UTC),
                "test",
                notify=rt.redis,
            )
    started = watcher.take(4)
    assert {(e["key"], e["scope"], e["tenant_id"]) for e in started} == {
        (k, "tenant", t) for k in (pool, tokens) for t in ("acme", "zeta")
    }
    assert all(e["channel"] == "config_changes:production" for e in started)
    assert all(e["value_seen"] == 25 for e in started)  # published after the commit
    during = {"env": 10, "acme": 25, "zeta": 25, "beta": 10}
    assert view(pool) == view(tokens) == during

    for _ in range(2):
        result = analyze(rt)
    assert result["deployments"]["promoted"] == 1 and result["deployments"]["rolled_back"] == 1
    decided = watcher.take(5)  # pool: environment, acme, zeta; tokens: acme, zeta
    assert sorted(
        (e["key"], e["scope"], e["tenant_id"] or "", e["value_seen"]) for e in decided
    ) == [
        (pool, "environment", "", 25),
        (pool, "tenant", "acme", None),  # the override deleted
        (pool, "tenant", "zeta", 12),  # zeta's own value put back
        (tokens, "tenant", "acme", None),
        (tokens, "tenant", "zeta", 12),
    ]
    assert view(pool) == {"env": 25, "acme": 25, "zeta": 12, "beta": 25}  # never stale
    assert view(tokens) == before
    with rt.sessions() as session:
        states = {d.name: d for d in session.scalars(select(CanaryDeployment))}
        assert states["pool-25"].state == "promoted"
        assert states["tokens-25"].state == "rolled_back"
        assert "2 failing analyses" in (states["tokens-25"].decision_reason or "")
        analyses = session.scalars(select(CanaryAnalysis).order_by(CanaryAnalysis.id)).all()
        bad = [a for a in analyses if a.deployment_id == states["tokens-25"].id]
        assert [a.verdict for a in bad] == ["fail", "fail"]
        assert bad[0].results[0]["classification"] == "high" and bad[0].score == 0.0
        promoted = active_value(session, pool, "production")
        restored = active_value(session, tokens, "production")
        assert promoted is not None and json.loads(promoted.value or "") == 25
        assert restored is not None and json.loads(restored.value or "") == 10
        actions = session.scalars(
            select(ConfigurationAuditLog.action).where(ConfigurationAuditLog.key == tokens)
        ).all()
        assert sorted(actions) == [
            "CANARY_ROLLBACK",
            "CANARY_ROLLBACK",
            "CANARY_START",
            "CANARY_START",
            "SET",
            "SET",
        ]
        history = session.scalars(
            select(ConfigurationHistory.scope).where(ConfigurationHistory.key == pool)
        ).all()
        assert sorted(history) == ["environment", "tenant", "tenant", "tenant"]
        fleet = session.scalars(select(FleetAuditLog.action)).all()
        assert {"canary_started", "canary_promoted", "canary_rolled_back"} <= set(fleet)
    rt.close()


def test_a_change_made_meanwhile_is_a_conflict_and_nothing_is_overwritten(
    scraped: str, postgres_url: str, redis_url: str, tmp_path: Path, watcher: Watcher
) -> None:
    rt = runtime_for(postgres_url, redis_url, tmp_path, scraped)
    seed(rt, "c.key")
    seed(rt, "d.key")
    with rt.sessions.begin() as session:
        create_deployment(
            session,
            spec("edited", "canary_good", "c.key", subset={"service": "chat"}),
            datetime.now(UTC),
            "test",
            notify=rt.redis,
        )
        create_deployment(
            session,
            spec("overridden", "canary_bad", "d.key", subset={"tenants": ["acme"]}),
            datetime.now(UTC),
            "test",
            notify=rt.redis,
        )
    watcher.take(2)
    with rt.sessions.begin() as session:  # a human edits, through the platform
        set_configuration(
            session,
            key="c.key",
            value=11,
            environment="production",
            user_id="alice",
            now=datetime.now(UTC),
            notify=rt.redis,
        )
        set_configuration(
            session,
            key="d.key",
            value=99,
            environment="production",
            scope="tenant",
            tenant_id="acme",
            user_id="bob",
            now=datetime.now(UTC),
            notify=rt.redis,
        )
    watcher.take(2)
    analyze(rt)
    result = analyze(rt)
    assert {a["deployment"]: a["decision"] for a in result["analyses"]} == {
        "edited": "conflict",
        "overridden": "conflict",
    }
    reader = Reader(rt.engine, rt.redis)
    assert reader.get("c.key", "production", "environment") == 11  # alice's value stands
    assert reader.get("d.key", "production", "tenant", "acme") == 99  # and bob's
    with rt.sessions() as session:
        rows = {r.name: r for r in session.scalars(select(CanaryDeployment))}
        assert rows["edited"].state == rows["overridden"].state == "conflict"
        assert "environment is v" in (rows["edited"].decision_reason or "")
        assert "(by alice)" in (rows["edited"].decision_reason or "")
        assert rows["overridden"].conflict[0]["changed_by"] == "bob"  # type: ignore[index]
        fleet = session.scalars(select(FleetAuditLog.action)).all()
        assert fleet.count("canary_conflict") == 2
    with pytest.raises(AssertionError):
        watcher.wait_for(1, timeout=0.5)  # nothing written, nothing announced
    rt.close()


def test_an_error_in_one_analysis_is_recorded_and_never_leaves_it_analyzing(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    class Broken:
        def range_samples(self, *_: Any) -> list[float]:
            raise ValueError("Expecting value: line 1 column 1 (char 0)")  # not JSON

    rt = runtime_for(postgres_url, redis_url, tmp_path, "http://127.0.0.1:1")
    seed(rt, "e.key")
    with rt.sessions.begin() as session:
        create_deployment(
            session,
            spec("broken", "canary_good", "e.key", inconclusive_limit=2),
            datetime.now(UTC),
            "test",
        )
    first = analyze(rt, Broken())["analyses"][0]  # type: ignore[arg-type]
    assert first["verdict"] == "error" and "ValueError: Expecting value" in first["reason"]
    second = analyze(rt, Broken())["analyses"][0]  # type: ignore[arg-type]
    assert (second["state"], second["decision"]) == ("rolled_back", "rollback")
    with rt.sessions() as session:
        assert [a.verdict for a in session.scalars(select(CanaryAnalysis))] == ["error", "error"]
    rt.close()


def test_a_deployment_past_its_max_duration_is_rolled_back(
    scraped: str, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    rt = runtime_for(postgres_url, redis_url, tmp_path, scraped)
    seed(rt, "f.key")
    with rt.sessions.begin() as session:
        create_deployment(
            session,
            spec(
                "slow",
                "canary_good",
                "f.key",
                passes=100,
                max_duration=3600,
                subset={"tenants": ["acme"]},
            ),
            datetime.now(UTC),
            "test",
        )
    assert analyze(rt)["analyses"][0]["state"] == "analyzing"
    later = datetime.now(UTC) + timedelta(seconds=3601)
    outcome = analyze(rt, now=later)["analyses"][0]
    assert (outcome["state"], outcome["decision"]) == ("rolled_back", "rollback")
    assert "max_duration (3600s)" in outcome["reason"]
    with rt.sessions() as session:
        assert active_value(session, "f.key", "production", "tenant", "acme") is None
    rt.close()


def test_too_few_samples_never_promote(
    scraped: str, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    rt = runtime_for(postgres_url, redis_url, tmp_path, scraped)
    seed(rt, "a.key")
    seed(rt, "b.key")
    thin = spec(
        "thin", "canary_good", "a.key", critical=True, min_samples=500, inconclusive_limit=2
    )
    quiet = thin.model_copy(
        update={
            "name": "thin-not-critical",
            "change": thin.change.model_copy(update={"key": "b.key"}),
            "metrics": [thin.metrics[0].model_copy(update={"critical": False})],  # as default
        }
    )
    with rt.sessions.begin() as session:
        create_deployment(session, thin, datetime.now(UTC), "test")
        create_deployment(session, quiet, datetime.now(UTC), "test")
    analyze(rt)
    result = analyze(rt)
    verdicts = {a["deployment"]: a["verdict"] for a in result["analyses"]}
    # a critical metric without data fails the analysis; otherwise it is inconclusive
    assert verdicts == {"thin": "fail", "thin-not-critical": "nodata"}
    with rt.sessions() as session:
        rows = {r.name: r for r in session.scalars(select(CanaryDeployment))}
        assert rows["thin"].state == "rolled_back"
        assert "2 failing analyses" in (rows["thin"].decision_reason or "")
        assert rows["thin-not-critical"].state == "rolled_back"
        assert "missing data is not health" in (rows["thin-not-critical"].decision_reason or "")
        reasons = session.scalars(select(CanaryAnalysis.reason)).all()
        assert all(
            "at least 500 each are needed" in (r or "") or "NODATA" in (r or "") for r in reasons
        ), reasons
    rt.close()


def test_prometheus_down_rolls_back_after_the_deadline_never_promotes(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    rt = runtime_for(postgres_url, redis_url, tmp_path, f"http://127.0.0.1:{free_port()}")
    seed(rt, "b.key")
    with rt.sessions.begin() as session:
        create_deployment(
            session, spec("blind", "canary_good", "b.key", passes=1), datetime.now(UTC), "test"
        )
    first = analyze(rt)["analyses"][0]
    assert (first["verdict"], first["decision"]) == ("error", None)
    assert "Prometheus" in first["reason"]
    with rt.engine.begin() as connection:  # the outage began 61 s ago: the deadline is 60 s
        connection.execute(
            update(CanaryDeployment).values(
                prometheus_down_since=datetime.now(UTC) - timedelta(seconds=61)
            )
        )
    second = analyze(rt)["analyses"][0]
    assert (second["state"], second["decision"]) == ("rolled_back", "rollback")
    with rt.sessions() as session:
        assert active_value(session, "b.key", "production").value == "10"  # type: ignore[union-attr]
    rt.close()


def test_no_prometheus_configured_is_said_plainly(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    rt = install(
        Runtime(FleetSettings(home=tmp_path, database_url=postgres_url, redis_url=redis_url))
    )
    assert analyze(rt) == {
        "skipped": True,
        "reason": "canary analysis needs Prometheus: FLEET_PROMETHEUS_URL is not set",
    }
    rt.close()


def test_cli_start_status_abort(fleet_env: dict[str, str], tmp_path: Path) -> None:
    spec_file = tmp_path / "canary.yaml"
    spec_file.write_text(
        "name: rate-limit-2x\n"
        "change: {key: security.rate_limiting.requests_per_minute, environment: production,"
        " value: 20000}\n"
        "canary: 'instance=\"c1\"'\nbaseline: 'instance=\"b1\"'\n"
        "subset: {tenants: [acme]}\n"
        "metrics:\n  - {name: errors, query: 'rate(app_errors_total{$selector}[1m])'}\n"
    )
    started = run_fleet("canary", "start", str(spec_file), env=fleet_env)
    assert started.returncode == 0, started.stderr
    assert "canary rate-limit-2x started" in started.stdout
    assert "candidate written for its subset (1 override)" in started.stdout
    again = run_fleet("canary", "start", str(spec_file), env=fleet_env)
    assert again.returncode == 2 and "exists already" in again.stderr
    other = tmp_path / "other.yaml"
    other.write_text(spec_file.read_text().replace("rate-limit-2x", "rate-limit-3x"))
    busy = run_fleet("canary", "start", str(other), env=fleet_env)
    assert busy.returncode == 2 and "rate-limit-2x is still judging production" in busy.stderr
    status = json.loads(run_fleet("canary", "status", "--json", env=fleet_env).stdout)
    assert [(s["name"], s["state"]) for s in status] == [("rate-limit-2x", "pending")]
    aborted = run_fleet("canary", "abort", "rate-limit-2x", env=fleet_env)
    assert aborted.returncode == 0, aborted.stderr
    status = json.loads(run_fleet("canary", "status", "--json", env=fleet_env).stdout)
    assert status[0]["state"] == "aborted"
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec_file.read_text().replace("{$selector}", '{job="x"}'))
    refused = run_fleet("canary", "start", str(bad), env=fleet_env)
    assert refused.returncode == 2 and "must contain $selector" in refused.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [\n")
    unreadable = run_fleet("canary", "start", str(broken), env=fleet_env)
    assert unreadable.returncode == 2
    assert unreadable.stderr.startswith(f"fleet: error: {broken}: not valid YAML")


def test_a_database_error_in_an_analysis_is_recorded_apart_and_the_others_go_on(
    scraped: str, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The database refuses the analysis's own transaction (a trigger, as a constraint or
    a full disk would): the analysis is recorded as ``error`` in a transaction of its own
    and the next deployment is still analyzed."""
    rt = runtime_for(postgres_url, redis_url, tmp_path, scraped)
    seed(rt, "g.key")
    seed(rt, "h.key")
    with rt.sessions.begin() as session:
        create_deployment(session, spec("refused", "canary_good", "g.key"), datetime.now(UTC), "t")
        create_deployment(session, spec("fine", "canary_good", "h.key"), datetime.now(UTC), "t")
    with rt.engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE FUNCTION refuse_pass() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.verdict = 'pass' AND NEW.deployment_id = (SELECT id FROM "
            "canary_deployments WHERE name = 'refused') THEN "
            "RAISE EXCEPTION 'disk full (simulated)'; END IF; RETURN NEW; END $$"
        )
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_pass BEFORE INSERT ON canary_analyses "
            "FOR EACH ROW EXECUTE FUNCTION refuse_pass()"
        )
    outcomes = {a["deployment"]: a for a in analyze(rt)["analyses"]}
    assert outcomes["refused"]["verdict"] == "error"
    assert "disk full (simulated)" in outcomes["refused"]["reason"]
    assert outcomes["fine"]["verdict"] == "pass"
    with rt.sessions() as session:
        rows = {r.name: r for r in session.scalars(select(CanaryDeployment))}
        assert (rows["refused"].state, rows["refused"].inconclusives) == ("analyzing", 1)
        assert rows["fine"].passes == 1
    rt.close()
