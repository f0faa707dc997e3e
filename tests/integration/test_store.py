"""The same store tests on PostgreSQL and on SQLite (the embedded default)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from workers.celery_app import create_app
from workers.db.models import Configuration, ConfigurationHistory, FeatureFlag, TaskRun
from workers.runtime import Runtime, install
from workers.settings import FleetSettings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def app(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[Celery]:
    settings = FleetSettings(
        home=tmp_path,
        database_url=db_url,
        redis_url=redis_url,
        extra_job_modules=["tests.jobs_for_tests"],
    )
    rt = install(Runtime(settings))
    application = create_app(rt)
    yield application
    application.close()
    rt.close()


def _runs(app: Celery) -> list[TaskRun]:
    with app.fleet_runtime.sessions() as session:
        return list(session.scalars(select(TaskRun).order_by(TaskRun.id)))


def test_a_run_leaves_its_task_runs_row(app: Celery) -> None:
    before = datetime.now(UTC)
    result = app.tasks["fleet.heartbeat"].apply(kwargs={"hold_seconds": 0})
    assert result.successful(), result.result
    (run,) = _runs(app)
    assert (run.job, run.task_id, run.outcome, run.error) == (
        "fleet.heartbeat",
        result.id,
        "success",
        None,
    )
    assert run.args == {"hold_seconds": 0}
    assert run.result is not None and set(run.result) >= {"redis_ms", "database_ms"}
    assert run.finished_at is not None and before <= run.started_at <= run.finished_at
    assert run.started_at.tzinfo is not None


def test_retries_and_failures_are_recorded_with_their_error(app: Celery) -> None:
    flaky, refused = f"store-{uuid.uuid4().hex}", f"store-{uuid.uuid4().hex}"
    app.tasks["test.flaky"].apply(kwargs={"key": flaky, "fail_times": 1})
    app.tasks["test.refused"].apply(kwargs={"key": refused})
    runs = _runs(app)
    assert [(r.job, r.outcome, r.attempt) for r in runs] == [
        ("test.flaky", "retry", 0),
        ("test.flaky", "success", 1),
        ("test.refused", "failure", 0),
    ]
    assert runs[0].error == f"TransientError: attempt 1 of {flaky} failed"
    assert runs[2].error == f"PermanentError: {refused}: the record is malformed"


def test_secrets_in_errors_are_redacted_in_task_runs(app: Celery) -> None:
    from workers.logs import register_secret

    register_secret("tok-98765-secret")
    app.tasks["test.secretive"].apply(kwargs={"value": "tok-98765-secret"})
    errors = " ".join(r.error or "" for r in _runs(app))
    assert "tok-98765-secret" not in errors and "***" in errors


def test_a_run_whose_worker_died_is_marked_lost_when_it_runs_again(app: Celery) -> None:
    rt = app.fleet_runtime
    with rt.sessions.begin() as session:
        session.add(
            TaskRun(
                job="fleet.heartbeat",
                task_id="t-lost",
                started_at=NOW,
                outcome="running",
                attempt=0,
            )
        )
    app.tasks["fleet.heartbeat"].apply(kwargs={}, task_id="t-lost")
    runs = _runs(app)
    assert [(r.task_id, r.outcome) for r in runs] == [("t-lost", "lost"), ("t-lost", "success")]
    assert runs[0].error == "worker lost before the run finished"


def test_a_retry_that_starts_before_its_first_attempt_ended_is_not_a_lost_run(
    app: Celery,
) -> None:
    """Celery sends a retry before the first attempt's own end is recorded: the retry may
    start first. The first attempt was not lost."""
    from prometheus_client import REGISTRY

    def lost() -> float:
        labels = {"task": "fleet.heartbeat", "outcome": "lost"}
        return REGISTRY.get_sample_value("fleet_task_runs_total", labels) or 0.0

    rt = app.fleet_runtime
    before = lost()
    with rt.sessions.begin() as session:
        session.add(
            TaskRun(
                job="fleet.heartbeat",
                task_id="t-retried",
                started_at=NOW,
                outcome="running",
                attempt=0,
            )
        )
    app.tasks["fleet.heartbeat"].apply(kwargs={}, task_id="t-retried", retries=1)
    runs = _runs(app)
    assert [(r.attempt, r.outcome) for r in runs] == [(0, "retry"), (1, "success")]
    assert lost() == before


def _config(key: str, tenant: str | None = None, active: bool = True) -> Configuration:
    return Configuration(
        key=key,
        value='"v"',
        meta="{}",
        environment="production",
        scope="service",
        tenant_id=tenant,
        active=active,
        created_at=NOW,
        updated_at=NOW,
    )


def test_one_active_configuration_per_key_scope_and_tenant(db_engine: Any) -> None:
    with Session(db_engine) as session, session.begin():
        session.add_all([_config("a"), _config("a", active=False), _config("a", tenant="t1")])
    for duplicate in (_config("a"), _config("a", tenant="t1")):
        with Session(db_engine) as session, pytest.raises(IntegrityError):
            session.add(duplicate)
            session.commit()


def test_history_takes_configurations_rows_as_they_are(db_engine: Any) -> None:
    """The reference archives with INSERT INTO configuration_history SELECT * ..."""
    with Session(db_engine) as session, session.begin():
        session.add(_config("database.postgresql.pool_size"))
    with db_engine.begin() as connection:
        connection.execute(text("INSERT INTO configuration_history SELECT * FROM configurations"))
    with Session(db_engine) as session:
        (archived,) = session.scalars(select(ConfigurationHistory)).all()
    assert archived.key == "database.postgresql.pool_size"
    assert archived.created_at == NOW


def test_datetimes_round_trip_in_utc(db_engine: Any) -> None:
    paris = NOW.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    flag = FeatureFlag(
        key="new_ui_enabled",
        environment="production",
        name="New UI",
        flag_type="boolean",
        default_variant="off",
        variants="[]",
        created_at=paris,
        created_by="admin",
        updated_at=paris + timedelta(hours=1),
        updated_by="admin",
    )
    with Session(db_engine) as session, session.begin():
        session.add(flag)
    with Session(db_engine) as session:
        stored = session.get(FeatureFlag, ("new_ui_enabled", "production"))
    assert stored is not None
    assert stored.created_at == NOW and stored.created_at.tzinfo == UTC
    assert stored.impression_count == 0 and stored.last_evaluated is None
