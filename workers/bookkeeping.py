"""Run bookkeeping, once for every job, through Celery's signals.

For each run: a ``task_runs`` row (written ``running`` at start, given its outcome at the
end), log context (job, task id, schedule), and the run metrics. A row left ``running`` by
a worker that died is marked ``lost`` when the same task starts again elsewhere.

Bookkeeping never breaks a run: if the database is away, the run goes on, the metrics are
still counted and the failure to record is logged.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
import structlog
from celery import signals
from sqlalchemy import insert, select, update

from workers.db.models import TaskRun
from workers.fleetstate import LAST_SUCCESS, record_health
from workers.logs import get_logger, redact
from workers.runtime import installed

log = get_logger("fleet.runs")

SCHEDULE_HEADER = "fleet_schedule"
FIRE_HEADER = "fleet_fire"
RAN_PREFIX = "fleet:schedule:ran:"  # task id of a fire -> the run that took it
FINISHED = ("success", "skipped", "failure", "retry")
# Results bigger than this are summarized in task_runs rather than stored whole.
MAX_RESULT_BYTES = 64 * 1024
MAX_ERROR_CHARS = 2000


@dataclass
class _InFlight:
    row_id: int | None
    started: float
    error: str | None = None
    duplicate: bool = False


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
    return _header_of(getattr(task, "request", None), name)


def _metrics() -> Any:
    # Imported here: a worker decides on multiprocess metrics before the first import.
    from monitoring import metrics

    return metrics


def is_duplicate(task_id: str | None) -> bool:
    """Whether the run now starting in this process is a second message of a fire."""
    with _inflight_lock:
        flight = _inflight.get(task_id) if task_id else None
        return flight is not None and flight.duplicate


def _first_of_fire(rt: Any, task: Any, task_id: str) -> bool:
    """False for a second message of a scheduler fire, which must not run."""
    if _request_header(task, FIRE_HEADER) is None:
        return True
    request = task.request
    if (getattr(request, "retries", 0) or 0) > 0:
        return True  # a retry of the run that took the fire
    delivery = getattr(request, "delivery_info", None) or {}
    if delivery.get("redelivered"):
        with rt.sessions() as session:
            done = session.scalar(
                select(TaskRun.id).where(TaskRun.task_id == task_id, TaskRun.outcome.in_(FINISHED))
            )
        return done is None  # given back after its worker died: run, unless it finished
    token = f"{getattr(request, 'hostname', '')}:{os.getpid()}:{uuid.uuid4().hex}"
    key = RAN_PREFIX + task_id
    # Resolved by reading back: a SET NX whose answer was lost finds the key taken, with
    # this run's own token in it.
    try:
        if rt.redis.set(key, token, nx=True, ex=rt.settings.fire_claim_ttl):
            return True
        held = rt.redis.get(key)
    except redis.RedisError as exc:
        log.warning("fire_run_claim_failed", error=describe_error(exc))
        return True  # Redis cannot say: at least once rather than never
    return held is not None and held.decode() == token  # our own SET, its answer lost


def _on_prerun(task_id: str, task: Any, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    schedule = _request_header(task, SCHEDULE_HEADER)
    structlog.contextvars.bind_contextvars(job=task.name, task_id=task_id, schedule=schedule)
    started = time.monotonic()
    row_id = None
    duplicate = False
    rt = installed()
    if rt is not None:
        try:
            duplicate = not _first_of_fire(rt, task, task_id)
        except Exception as exc:
            log.warning("fire_run_claim_failed", error=describe_error(exc))
        try:
            row_id = _record_start(rt, task, task_id, schedule, kwargs or {}, duplicate)
        except Exception as exc:
            log.warning("task_run_record_failed", phase="start", error=describe_error(exc))
            row_id = _read_back_start(rt, task, task_id)
    with _inflight_lock:
        _inflight[task_id] = _InFlight(row_id=row_id, started=started, duplicate=duplicate)
    if duplicate:
        log.warning("task_duplicate_dropped", fire=_request_header(task, FIRE_HEADER))
        return
    log.info("task_started", attempt=getattr(task.request, "retries", 0) or 0)


def _read_back_start(rt: Any, task: Any, task_id: str) -> int | None:
    """Resolved by reading back: a start whose COMMIT answer was lost may have committed.
    Its row is found by the run's task id, attempt and worker, so that the run's end is
    written to it instead of leaving it ``running``; None when it did not commit."""
    request = getattr(task, "request", None)
    try:
        with rt.sessions() as session:
            found = session.scalar(
                select(TaskRun.id)
                .where(
                    TaskRun.task_id == task_id,
                    TaskRun.attempt == (getattr(request, "retries", 0) or 0),
                    TaskRun.worker == getattr(request, "hostname", None),
                    TaskRun.outcome.in_(("running", "duplicate")),
                )
                .order_by(TaskRun.id.desc())
                .limit(1)
            )
    except Exception as exc:
        log.warning("task_run_read_back_failed", error=describe_error(exc))
        return None
    return int(found) if found is not None else None


def _record_start(
    rt: Any,
    task: Any,
    task_id: str,
    schedule: str | None,
    kwargs: dict[str, Any],
    duplicate: bool = False,
) -> int:
    at = now()
    attempt = getattr(task.request, "retries", 0) or 0
    row = {
        "job": task.name,
        "task_id": task_id,
        "schedule": schedule,
        "args": orjson.loads(orjson.dumps(kwargs, default=str)),
        "attempt": attempt,
        "worker": getattr(task.request, "hostname", None),
        "started_at": at,
    }
    if duplicate:  # recorded, finished at once; the run that took the fire is left alone
        finished = {"finished_at": at, "outcome": "duplicate"}
        error = "a second message of a fire that another run took"
        with rt.sessions.begin() as session:
            insert_row = insert(TaskRun).values(**row, **finished, error=error)
            return int(session.execute(insert_row.returning(TaskRun.id)).scalar_one())
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
            insert(TaskRun).values(**row, outcome="running").returning(TaskRun.id)
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
    outcome = "duplicate" if flight is not None and flight.duplicate else outcome_of(state, retval)
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


def _on_revoked(request: Any = None, expired: bool = False, sender: Any = None, **_: Any) -> None:
    """A message Celery dropped unrun because its ``expires`` had passed."""
    if not expired:
        return
    name = getattr(sender, "name", None) or getattr(request, "task", None) or "unknown"
    task_id = getattr(request, "id", None) or ""
    schedule = _header_of(request, SCHEDULE_HEADER)
    _metrics().TASK_RUNS.labels(name, "expired").inc()
    log.warning(
        "task_expired",
        job=name,
        task_id=task_id,
        schedule=schedule,
        fire=_header_of(request, FIRE_HEADER),
    )
    rt = installed()
    if rt is None:
        return
    try:
        at = now()
        with rt.sessions.begin() as session:
            session.execute(
                insert(TaskRun).values(
                    job=name,
                    task_id=task_id,
                    schedule=schedule,
                    attempt=0,
                    worker=getattr(request, "hostname", None),
                    started_at=at,
                    finished_at=at,
                    outcome="expired",
                    error="the message arrived after its expiry (the fire's next run or grace)",
                )
            )
    except Exception as exc:
        log.warning("task_run_record_failed", phase="expired", error=describe_error(exc))


def _header_of(request: Any, name: str) -> str | None:
    """A header of a task's request (or of a message Celery dropped), as text."""
    if request is None:
        return None
    value = getattr(request, name, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(name)
    return str(value) if value is not None else None


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
    signals.task_revoked.connect(_on_revoked, weak=False)
    _connected = True
