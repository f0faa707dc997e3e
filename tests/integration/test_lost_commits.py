"""PostgreSQL commits and the answer is lost on the way back (a proxy lets the COMMIT
through, then cuts the connection: a fault a real server cannot be made to produce).
What the fleet does next reads back what committed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from tasks.canary import analyze, create_deployment
from tasks.canary.demo import latency_canary
from tasks.canary.prometheus import PrometheusSource
from tests.cutting_proxy import CuttingProxy, cutting_proxy
from tests.helpers import free_port
from workers import bookkeeping
from workers.configstore import set_configuration
from workers.db.models import CanaryAnalysis, CanaryDeployment, TaskRun
from workers.runtime import Runtime, install
from workers.settings import FleetSettings


@pytest.fixture
def through_proxy(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> Iterator[tuple[CuttingProxy, Runtime]]:
    url = make_url(postgres_url)
    with cutting_proxy((url.host or "127.0.0.1", url.port or 5432), b"COMMIT", times=0) as proxy:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        rt = install(
            Runtime(FleetSettings(home=tmp_path, database_url=through, redis_url=redis_url))
        )
        yield proxy, rt
        rt.close()


def test_a_run_start_whose_commit_answer_is_lost_is_found_and_finished(
    through_proxy: tuple[CuttingProxy, Runtime],
) -> None:
    """Without the read-back the run's row stayed ``running`` for good (its end is written
    by row id, which the lost answer never gave)."""
    proxy, rt = through_proxy
    request = SimpleNamespace(retries=0, hostname="worker-1@test", headers={}, delivery_info={})
    task = SimpleNamespace(name="fleet.heartbeat", request=request)
    proxy.arm(b"COMMIT")
    bookkeeping._on_prerun("task-1", task, {})
    assert proxy.cuts == 1
    try:
        with bookkeeping._inflight_lock:
            flight = bookkeeping._inflight["task-1"]
        with rt.sessions() as session:
            row = session.scalars(select(TaskRun).where(TaskRun.task_id == "task-1")).one()
        assert flight.row_id == row.id and row.outcome == "running"
    finally:
        with bookkeeping._inflight_lock:
            bookkeeping._inflight.pop("task-1", None)


def _heartbeat(worker: str = "worker-1@test") -> SimpleNamespace:
    request = SimpleNamespace(retries=0, hostname=worker, headers={}, delivery_info={})
    return SimpleNamespace(name="fleet.heartbeat", request=request)


def _runs(rt: Runtime, task_id: str) -> list[TaskRun]:
    with rt.sessions() as session:
        return list(session.scalars(select(TaskRun).where(TaskRun.task_id == task_id)))


def test_a_run_start_cut_before_it_commits_is_written_again(
    through_proxy: tuple[CuttingProxy, Runtime],
) -> None:
    """A backend terminated under the start (as ``pg_terminate_backend`` does): the start
    never committed, the read-back finds nothing, and the start is written once more.
    Before, the run went on with no row at all: a chaos run found fires that had run
    reported as enqueued and never run."""
    proxy, rt = through_proxy
    task = _heartbeat()
    proxy.arm(b"UPDATE task_runs")
    bookkeeping._on_prerun("task-2", task, {})
    try:
        assert proxy.cuts == 1
        with bookkeeping._inflight_lock:
            flight = bookkeeping._inflight["task-2"]
        [row] = _runs(rt, "task-2")
        assert flight.row_id == row.id and row.outcome == "running"
    finally:
        bookkeeping._on_postrun("task-2", task, retval={"ok": True}, state="SUCCESS")
    [row] = _runs(rt, "task-2")
    assert row.outcome == "success"


def test_a_run_whose_start_cannot_be_written_is_recorded_at_its_end(
    through_proxy: tuple[CuttingProxy, Runtime],
) -> None:
    """Both tries of the start cut: the run goes on without a row, and its end writes the
    whole row (with the time it started). The end's own COMMIT answer is lost too: the
    second try finds the row it wrote and does not write another."""
    proxy, rt = through_proxy
    task = _heartbeat()
    proxy.arm(b"UPDATE task_runs", times=2)
    bookkeeping._on_prerun("task-3", task, {})
    with bookkeeping._inflight_lock:
        flight = bookkeeping._inflight["task-3"]
    assert proxy.cuts == 2 and flight.row_id is None and _runs(rt, "task-3") == []
    proxy.arm(b"COMMIT")
    bookkeeping._on_postrun("task-3", task, retval={"ok": True}, state="SUCCESS")
    assert proxy.cuts == 3
    [row] = _runs(rt, "task-3")
    assert row.outcome == "success" and row.worker == "worker-1@test"
    assert row.started_at == flight.row["started_at"] and row.finished_at is not None
    assert row.finished_at >= row.started_at


def test_a_start_that_committed_unseen_is_finished_not_written_twice(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The start committed but neither its answer nor the read-back came back (the
    database went away between): the end finds that row, by its start time to the
    microsecond on either backend, and finishes it."""
    rt = install(Runtime(FleetSettings(home=tmp_path, database_url=db_url, redis_url=redis_url)))
    try:
        task = _heartbeat()
        row = bookkeeping._row_of(task, "task-4", None, {})
        bookkeeping._record_start(rt, row)
        with bookkeeping._inflight_lock:
            bookkeeping._inflight["task-4"] = bookkeeping._InFlight(None, 0.0, row=row)
        bookkeeping._on_postrun("task-4", task, retval=None, state="FAILURE")
        [run] = _runs(rt, "task-4")
        assert run.outcome == "failure" and run.started_at == row["started_at"]
    finally:
        rt.close()


def test_an_analysis_whose_commit_answer_is_lost_is_not_recorded_twice(
    through_proxy: tuple[CuttingProxy, Runtime],
) -> None:
    """The analysis committed (an error: Prometheus down), its answer lost: the failure
    handler finds it and adds no second analysis, which would count one inconclusive more."""
    proxy, rt = through_proxy
    now = datetime.now(UTC)
    with rt.sessions.begin() as session:
        set_configuration(
            session,
            key="database.postgresql.pool_size",
            value=10,
            environment="production",
            user_id="admin",
            now=now,
        )
        spec = latency_canary("pool", "canary", "database.postgresql.pool_size", 25)
        create_deployment(session, spec, now, "test")
    down = PrometheusSource(f"http://127.0.0.1:{free_port()}", attempts=1, sleep=lambda _: None)
    proxy.arm(b"COMMIT")
    result = analyze(rt, down, now=now)
    assert proxy.cuts == 1
    assert result["analyses"][0]["skipped"] is True
    with rt.sessions() as session:
        analyses = session.scalar(select(func.count()).select_from(CanaryAnalysis))
        row = session.scalars(select(CanaryDeployment)).one()
    assert analyses == 1 and row.inconclusives == 0 and row.state == "analyzing"


def test_a_secret_snapshot_whose_commit_answer_is_lost_audits_nothing_twice(
    through_proxy: tuple[CuttingProxy, Runtime], postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The check's statuses and their audit rows committed, the answer lost: the check
    fails (and is retried); the retry finds them committed and audits no change again."""
    from tasks.secrets import _snapshot
    from tasks.secrets.model import Status
    from workers.db.models import FleetAuditLog, SecretRotationStatus

    proxy, proxied = through_proxy
    now = datetime.now(UTC)
    found = [Status("db/chatbot", "ok", version=3), Status("apis/openai", "due_soon", version=1)]
    proxy.arm(b"COMMIT")
    with pytest.raises(Exception):  # noqa: B017 - the cut connection, whatever its class
        _snapshot(proxied, found, now)
    assert proxy.cuts == 1
    direct = install(
        Runtime(FleetSettings(home=tmp_path, database_url=postgres_url, redis_url=redis_url))
    )
    try:
        changes, gone = _snapshot(direct, found, now)  # the retry
        assert (changes, gone) == ([], [])
        with direct.sessions() as session:
            audited = session.scalars(
                select(FleetAuditLog.subject).where(FleetAuditLog.action == "secret_status_changed")
            ).all()
            rows = session.scalar(select(func.count()).select_from(SecretRotationStatus))
        assert sorted(audited) == ["apis/openai", "db/chatbot"] and rows == 2
    finally:
        direct.close()


def test_overlapping_secret_checks_take_turns_and_audit_each_change_once(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A first check holds its snapshot transaction open (it has written its statuses and
    their audit rows, not committed yet); a second check meanwhile waits on the snapshot
    lock, then sees the first's rows and audits nothing again. Without the lock the second
    read the table before the first committed and audited every change a second time."""
    import threading

    from sqlalchemy import text

    from tasks.secrets import SNAPSHOT_LOCK, _snapshot, snapshot_in
    from tasks.secrets.model import Status
    from tests.helpers import wait_for
    from workers.db.models import FleetAuditLog

    rt = install(
        Runtime(FleetSettings(home=tmp_path, database_url=postgres_url, redis_url=redis_url))
    )
    now = datetime.now(UTC)
    found = [Status("db/chatbot", "ok", version=3), Status("apis/openai", "due_soon", version=1)]
    second: list[object] = []
    with rt.sessions.begin() as first:
        assert len(snapshot_in(first, found, now)[0]) == 2
        thread = threading.Thread(target=lambda: second.append(_snapshot(rt, found, now)))
        thread.start()

        def waiting() -> bool:
            with rt.engine.connect() as connection:
                return bool(
                    connection.execute(
                        text(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND NOT granted AND objid = :k"
                        ),
                        {"k": SNAPSHOT_LOCK},
                    ).scalar()
                )

        wait_for(waiting, timeout=10, what="the second check to wait on the snapshot lock")
    thread.join(10)
    assert second == [([], [])]
    with rt.sessions() as session:
        audited = session.scalars(
            select(FleetAuditLog.subject).where(FleetAuditLog.action == "secret_status_changed")
        ).all()
    rt.close()
    assert sorted(audited) == ["apis/openai", "db/chatbot"]


def test_a_second_try_of_a_start_never_calls_its_own_first_row_lost(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A first try whose COMMIT lands only after the read-back looked: the second try's
    sweep for runs left by dead workers leaves this start's own row alone (a row of the
    same task and attempt started earlier is still swept)."""
    rt = install(Runtime(FleetSettings(home=tmp_path, database_url=db_url, redis_url=redis_url)))
    try:
        task = _heartbeat()
        earlier = bookkeeping._row_of(task, "task-5", None, {})
        bookkeeping._record_start(rt, earlier)  # a worker that died mid-run
        row = bookkeeping._row_of(task, "task-5", None, {})
        bookkeeping._record_start(rt, row)
        bookkeeping._record_start(rt, row)  # the second try
        outcomes = {(r.started_at == row["started_at"], r.outcome) for r in _runs(rt, "task-5")}
        assert outcomes == {(False, "lost"), (True, "running")}
    finally:
        rt.close()
