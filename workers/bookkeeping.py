"""Run bookkeeping, once for every job, through Celery's signals.

For each run: a ``task_runs`` row (written ``running`` at start, given its outcome at the
end), log context (job, task id, schedule), and the run metrics. A row left ``running`` by
a worker that died is marked ``lost`` when the same task starts again elsewhere.

Bookkeeping never breaks a run: if the database is away, the run goes on, the metrics are
still counted and the failure to record is logged.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from celery import signals
from sqlalchemy import insert, update

from workers.db.models import TaskRun
from workers.fleetstate import LAST_SUCCESS, record_health
from workers.logs import get_logger, redact
from workers.runtime import installed

log = get_logger("fleet.runs")

SCHEDULE_HEADER = "fleet_schedule"
FIRE_HEADER = "fleet_fire"
# Results bigger than this are summarized in task_runs rather than stored whole.
MAX_RESULT_BYTES = 64 * 1024
MAX_ERROR_CHARS = 2000


@dataclass
class _InFlight:
    row_id: int | None
    started: float
    error: str | None = None


_inflight: dict[str, _InFlight] = {}
_inflight_lock = threading.Lock()


def now() -> datetime:
    return datetime.now(UTC)


def describe_error(exc: BaseException | str | None) -> str | None:
    if exc is None:
        return None
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = " ".join(redact(text).split())
    return text[:MAX_ERROR_CHARS]


def outcome_of(state: str | None, retval: Any) -> str:
    if state == "SUCCESS":
        if isinstance(retval, dict) and retval.get("skipped") is True:
            return "skipped"
        return "success"
    if state == "RETRY":
        return "retry"
    return "failure"


def result_summary(retval: Any) -> dict[str, Any] | None:
    if retval is None or isinstance(retval, BaseException):
        return None
    try:
        encoded = orjson.dumps(retval, default=str)
    except TypeError:
        return {"unserializable": type(retval).__name__}
    if len(encoded) > MAX_RESULT_BYTES:
        return {"truncated": True, "bytes": len(encoded)}
    value = orjson.loads(encoded)
    return value if isinstance(value, dict) else {"value": value}


def _request_header(task: Any, name: str) -> str | None:
    request = getattr(task, "request", None)
    if request is None:
        return None
    value = getattr(request, name, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(name)
    return str(value) if value is not None else None


def _metrics() -> Any:
    # Imported here: a worker decides on multiprocess metrics before the first import.
    from monitoring import metrics

    return metrics


def _on_prerun(task_id: str, task: Any, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    schedule = _request_header(task, SCHEDULE_HEADER)
    structlog.contextvars.bind_contextvars(job=task.name, task_id=task_id, schedule=schedule)
    started = time.monotonic()
    row_id = None
    rt = installed()
    if rt is not None:
        try:
            row_id = _record_start(rt, task, task_id, schedule, kwargs or {})
        except Exception as exc:
            log.warning("task_run_record_failed", phase="start", error=describe_error(exc))
    with _inflight_lock:
        _inflight[task_id] = _InFlight(row_id=row_id, started=started)
    log.info("task_started", attempt=getattr(task.request, "retries", 0) or 0)


def _record_start(
    rt: Any, task: Any, task_id: str, schedule: str | None, kwargs: dict[str, Any]
) -> int:
    at = now()
    attempt = getattr(task.request, "retries", 0) or 0
    with rt.sessions.begin() as session:
        # An earlier attempt still "running" asked for this retry: its worker may not have
        # recorded its end yet (the retry can start first). It is not lost; its own end
        # writes the outcome, or, if its worker died, this marks it "retry".
        session.execute(
            update(TaskRun)
            .where(
                TaskRun.task_id == task_id,
                TaskRun.outcome == "running",
                TaskRun.attempt < attempt,
            )
            .values(outcome="retry", finished_at=at)
        )
        # The same attempt running again: the message came back after its worker died.
        lost = session.execute(
            update(TaskRun)
            .where(
                TaskRun.task_id == task_id,
                TaskRun.outcome == "running",
                TaskRun.attempt >= attempt,
            )
            .values(outcome="lost", finished_at=at, error="worker lost before the run finished")
            .returning(TaskRun.id)
        ).all()
        row_id = session.execute(
            insert(TaskRun)
            .values(
                job=task.name,
                task_id=task_id,
                schedule=schedule,
                args=orjson.loads(orjson.dumps(kwargs, default=str)),
                attempt=attempt,
                worker=getattr(task.request, "hostname", None),
                started_at=at,
                outcome="running",
            )
            .returning(TaskRun.id)
        ).scalar_one()
    if lost:
        _metrics().TASK_RUNS.labels(task.name, "lost").inc(len(lost))
        log.warning("task_run_lost", runs=len(lost))
    return int(row_id)


def _on_failure(task_id: str, exception: BaseException, sender: Any = None, **_: Any) -> None:
    error = describe_error(exception)
    with _inflight_lock:
        flight = _inflight.get(task_id)
        if flight is not None:
            flight.error = error
            return
    # Failures seen by the worker's parent process (hard time limit, a child that died):
    # the run's own process never reached its postrun.
    name = getattr(sender, "name", "unknown")
    _metrics().TASK_RUNS.labels(name, "failure").inc()
    log.error("task_failed_outside_its_process", job=name, task_id=task_id, error=error)
    rt = installed()
    if rt is None:
        return
    try:
        with rt.sessions.begin() as session:
            session.execute(
                update(TaskRun)
                .where(TaskRun.task_id == task_id, TaskRun.outcome == "running")
                .values(outcome="failure", finished_at=now(), error=error)
            )
    except Exception as exc:
        log.warning("task_run_record_failed", phase="failure", error=describe_error(exc))


def _on_retry(request: Any = None, reason: Any = None, **_: Any) -> None:
    task_id = getattr(request, "id", None)
    with _inflight_lock:
        flight = _inflight.get(task_id) if task_id else None
        if flight is not None:
            cause = getattr(reason, "exc", None) or reason  # celery's Retry wraps the error
            flight.error = describe_error(cause if isinstance(cause, BaseException) else str(cause))


def _on_postrun(
    task_id: str, task: Any, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    with _inflight_lock:
        flight = _inflight.pop(task_id, None)
    outcome = outcome_of(state, retval)
    seconds = time.monotonic() - flight.started if flight else 0.0
    metrics = _metrics()
    metrics.TASK_RUNS.labels(task.name, outcome).inc()
    metrics.TASK_DURATION.labels(task.name).observe(seconds)
    error = flight.error if flight else None
    rt = installed()
    if rt is not None and flight is not None and flight.row_id is not None:
        try:
            with rt.sessions.begin() as session:
                finished = now()
                session.execute(
                    update(TaskRun)
                    .where(TaskRun.id == flight.row_id)
                    .values(
                        outcome=outcome,
                        finished_at=finished,
                        error=error if outcome in ("failure", "retry") else None,
                        result=result_summary(retval) if outcome != "failure" else None,
                    )
                )
                if outcome in ("success", "skipped"):
                    # The dead man's switch: read by fleet exporter, whichever worker ran it.
                    succeeded = {task.name: finished.timestamp()}
                    record_health(session, LAST_SUCCESS, succeeded, finished)
        except Exception as exc:
            log.warning("task_run_record_failed", phase="finish", error=describe_error(exc))
    log.info("task_finished", outcome=outcome, seconds=round(seconds, 3), error=error)
    structlog.contextvars.unbind_contextvars("job", "task_id", "schedule")


_connected = False


def connect_bookkeeping() -> None:
    """Attach the handlers once per process, however many apps are made."""
    global _connected
    if _connected:
        return
    signals.task_prerun.connect(_on_prerun, weak=False)
    signals.task_postrun.connect(_on_postrun, weak=False)
    signals.task_failure.connect(_on_failure, weak=False)
    signals.task_retry.connect(_on_retry, weak=False)
    _connected = True
