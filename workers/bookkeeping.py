"""Run bookkeeping, once for every job, through Celery's signals.

For each run: a ``task_runs`` row (written ``running`` at start, given its outcome at the
end), log context (job, task id, schedule), and the run metrics. A row left ``running`` by
a worker that died is marked ``lost`` when the same task starts again elsewhere.

Bookkeeping never breaks a run: if the database is away, the run goes on, the metrics are
still counted and the failure to record is logged. Each write is tried twice (see
:func:`_twice`); a run whose start could not be written is written whole at its end.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

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
_T = TypeVar("_T")

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
    # The row as the start wrote it (or meant to): written at the end if the start could not be.
    row: dict[str, Any] = field(default_factory=dict)


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
    row = _row_of(task, task_id, schedule, kwargs or {})
    rt = installed()
    if rt is not None:
        try:
            duplicate = not _first_of_fire(rt, task, task_id)
        except Exception as exc:
            log.warning("fire_run_claim_failed", error=describe_error(exc))
        row_id = _start(rt, row, duplicate)
    with _inflight_lock:
        _inflight[task_id] = _InFlight(row_id=row_id, started=started, duplicate=duplicate, row=row)
    if duplicate:
        log.warning("task_duplicate_dropped", fire=_request_header(task, FIRE_HEADER))
        return
    log.info("task_started", attempt=row["attempt"])


def _start(rt: Any, row: dict[str, Any], duplicate: bool) -> int | None:
    """The run's row, written before it runs. A start cut on its way (a backend terminated,
    an answer lost) is read back, and written once more if it did not commit. None when
    the database could not say: the run goes on and its end writes the row."""

    def write(again: bool) -> int:
        found = _read_back_start(rt, row) if again else None
        return found if found is not None else _record_start(rt, row, duplicate)

    return _twice("start", write)


def _twice(phase: str, write: Callable[[bool], _T]) -> _T | None:
    """``write`` tried twice: a cut connection (a terminated backend, a lost answer) is met
    by writing again, ``write(True)`` first looking for what the first try may have
    committed. None when both tries failed."""
    for again in (False, True):
        try:
            return write(again)
        except Exception as exc:
            tries = 2 if again else 1
            log.warning(
                "task_run_record_failed", phase=phase, tries=tries, error=describe_error(exc)
            )
    return None


def _read_back_start(rt: Any, row: dict[str, Any]) -> int | None:
    """Resolved by reading back: a start whose COMMIT answer was lost may have committed.
    Its row is found, so that the run's end is written to it instead of leaving it
    ``running``; None when it did not commit."""
    with rt.sessions() as session:
        found = session.scalar(_started_row(row))
    return int(found) if found is not None else None


def _started_row(row: dict[str, Any]) -> Any:
    """This run's own row: its task id, attempt, worker and start time (to the microsecond)
    are this start's alone."""
    return select(TaskRun.id).where(
        TaskRun.task_id == row["task_id"],
        TaskRun.attempt == row["attempt"],
        TaskRun.worker == row["worker"],
        TaskRun.started_at == row["started_at"],
    )


def _row_of(
    task: Any, task_id: str, schedule: str | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    request = getattr(task, "request", None)
    return {
        "job": task.name,
        "task_id": task_id,
        "schedule": schedule,
        "args": orjson.loads(orjson.dumps(kwargs, default=str)),
        "attempt": getattr(request, "retries", 0) or 0,
        "worker": getattr(request, "hostname", None),
        "started_at": now(),
    }


def _record_start(rt: Any, row: dict[str, Any], duplicate: bool = False) -> int:
    task_id, at, attempt = row["task_id"], row["started_at"], row["attempt"]
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
        # (Never this start's own row, should a first try's COMMIT land late.)
        lost = session.execute(
            update(TaskRun)
            .where(
                TaskRun.task_id == task_id,
                TaskRun.outcome == "running",
                TaskRun.attempt >= attempt,
                TaskRun.started_at != at,
            )
            .values(outcome="lost", finished_at=at, error="worker lost before the run finished")
            .returning(TaskRun.id)
        ).all()
        row_id = session.execute(
            insert(TaskRun).values(**row, outcome="running").returning(TaskRun.id)
        ).scalar_one()
    if lost:
        _metrics().TASK_RUNS.labels(row["job"], "lost").inc(len(lost))
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
    if rt is not None and flight is not None:
        _finish(rt, task.name, flight, outcome, error, retval)
    log.info("task_finished", outcome=outcome, seconds=round(seconds, 3), error=error)
    structlog.contextvars.unbind_contextvars("job", "task_id", "schedule")


def _finish(
    rt: Any, job: str, flight: _InFlight, outcome: str, error: str | None, retval: Any
) -> None:
    """The run's end, on its row; written again after a cut connection, which finds the
    same row (by its id, or as :func:`_row_at_the_end` finds it)."""

    def write(_again: bool) -> None:
        with rt.sessions.begin() as session:
            finished = now()
            row_id = flight.row_id
            if row_id is None:
                row_id = _row_at_the_end(session, flight)
            session.execute(
                update(TaskRun)
                .where(TaskRun.id == row_id)
                .values(
                    outcome=outcome,
                    finished_at=finished,
                    error=error if outcome in ("failure", "retry") else None,
                    result=result_summary(retval) if outcome != "failure" else None,
                )
            )
            if outcome in ("success", "skipped"):
                # The dead man's switch: read by fleet exporter, whichever worker ran it.
                record_health(session, LAST_SUCCESS, {job: finished.timestamp()}, finished)

    _twice("finish", write)


def _row_at_the_end(session: Any, flight: _InFlight) -> int:
    """The row of a run whose start could not be recorded (or read back): found if the
    start did commit after all, else written now, with the time the run started."""
    found = session.scalar(_started_row(flight.row))
    if found is not None:
        return int(found)
    outcome = "duplicate" if flight.duplicate else "running"
    written = session.execute(
        insert(TaskRun).values(**flight.row, outcome=outcome).returning(TaskRun.id)
    ).scalar_one()
    log.warning("task_run_recorded_at_its_end")
    return int(written)


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
    at = now()
    row = {
        "job": name,
        "task_id": task_id,
        "schedule": schedule,
        "attempt": 0,
        "worker": getattr(request, "hostname", None),
        "started_at": at,
        "finished_at": at,
        "outcome": "expired",
        "error": "the message arrived after its expiry (the fire's next run or grace)",
    }

    def write(again: bool) -> None:
        with rt.sessions.begin() as session:
            if again and session.scalar(_started_row(row)) is not None:
                return  # the first try committed
            session.execute(insert(TaskRun).values(**row))

    _twice("expired", write)


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
