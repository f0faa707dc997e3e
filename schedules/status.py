"""What ``fleet status`` reports: schedules, queues and recent runs, read from the stores."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from schedules.table import Schedule
from workers.db.models import TaskRun
from workers.runtime import Runtime


def _run_row(run: TaskRun) -> dict[str, Any]:
    seconds = None
    if run.finished_at is not None:
        seconds = round((run.finished_at - run.started_at).total_seconds(), 3)
    return {
        "job": run.job,
        "task_id": run.task_id,
        "schedule": run.schedule,
        "outcome": run.outcome,
        "started_at": run.started_at.isoformat(),
        "seconds": seconds,
        "error": run.error,
    }


def _last_runs(rt: Runtime, names: Sequence[str]) -> dict[str, TaskRun]:
    if not names:
        return {}
    latest = (
        select(TaskRun.schedule, func.max(TaskRun.id).label("id"))
        .where(TaskRun.schedule.in_(names))
        .group_by(TaskRun.schedule)
        .subquery()
    )
    with rt.sessions() as session:
        rows = session.scalars(select(TaskRun).join(latest, TaskRun.id == latest.c.id)).all()
    return {row.schedule: row for row in rows if row.schedule}


def collect_status(
    rt: Runtime, schedules: Sequence[Schedule], now: datetime, *, runs: int = 10
) -> dict[str, Any]:
    from workers.celery_app import queue_depths

    last = _last_runs(rt, [s.name for s in schedules])
    schedule_rows = []
    for schedule in schedules:
        upcoming = schedule.next_fires(now) if schedule.enabled else []
        previous = last.get(schedule.name)
        schedule_rows.append(
            {
                "name": schedule.name,
                "job": schedule.job,
                "cron": schedule.cron,
                "queue": schedule.queue,
                "enabled": schedule.enabled,
                "next_fire": upcoming[0].isoformat() if upcoming else None,
                "last_outcome": previous.outcome if previous else None,
                "last_started_at": previous.started_at.isoformat() if previous else None,
            }
        )
    try:
        queues: dict[str, int] | None = queue_depths(rt)
        broker_error = None
    except Exception as exc:  # shown, not raised: status is what you run when things break
        queues, broker_error = None, f"{type(exc).__name__}: {exc}"
    with rt.sessions() as session:
        recent = session.scalars(select(TaskRun).order_by(TaskRun.id.desc()).limit(runs)).all()
    return {
        "now": now.isoformat(),
        "settings": rt.settings.describe(),
        "schedules": schedule_rows,
        "queues": queues,
        "broker_error": broker_error,
        "recent_runs": [_run_row(run) for run in recent],
    }


def render_status(report: dict[str, Any], console: Console | None = None) -> None:
    if console is None:
        from workers.cli.common import console as make_console

        console = make_console()
    table = Table(title="Schedules", title_justify="left")
    for column in ("name", "job", "cron", "queue", "next fire", "last outcome"):
        table.add_column(column)
    for row in report["schedules"]:
        table.add_row(
            row["name"],
            row["job"],
            row["cron"],
            row["queue"],
            row["next_fire"] or ("disabled" if not row["enabled"] else "-"),
            row["last_outcome"] or "-",
        )
    console.print(table)
    if report["queues"] is None:
        console.print(f"[bold red]broker unreachable[/]: {report['broker_error']}")
    else:
        queues = Table(title="Queues", title_justify="left")
        queues.add_column("queue")
        queues.add_column("waiting", justify="right")
        for name, depth in report["queues"].items():
            queues.add_row(name, str(depth))
        console.print(queues)
    recent = Table(title="Recent runs", title_justify="left")
    for column in ("started", "job", "schedule", "outcome", "seconds", "error"):
        recent.add_column(column)
    for run in report["recent_runs"]:
        recent.add_row(
            run["started_at"],
            run["job"],
            run["schedule"] or "-",
            run["outcome"],
            "-" if run["seconds"] is None else f"{run['seconds']:.3f}",
            (run["error"] or "")[:80],
        )
    console.print(recent)
