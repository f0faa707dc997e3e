"""``fleet scheduler`` and ``fleet status``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from workers.cli.common import emit_json, json_option, settings_or_exit, start_runtime


@click.command()
@click.option(
    "--schedule-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Schedule table (default: FLEET_SCHEDULE_FILE, else the packaged schedules/fleet.yaml).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Port for /metrics (default: FLEET_METRICS_PORT + 1).",
)
def scheduler(schedule_file: Path | None, metrics_port: int | None) -> None:
    """Fire the schedule table's jobs on time. Run as many replicas as you like: each
    fire is enqueued once, by whichever replica claims it first."""
    settings = settings_or_exit()
    rt = start_runtime(settings)

    from monitoring import metrics
    from monitoring.exporter import build_registry, record_build_info, serve_metrics
    from schedules.claims import FireClaims
    from schedules.daemon import Dispatcher, build_scheduler, replica_id, run_until_signalled
    from schedules.table import load_schedules
    from workers.celery_app import create_app
    from workers.logs import get_logger

    app = create_app(rt)
    schedules = load_schedules(schedule_file or settings.schedule_file, _jobs())
    replica = replica_id()
    claims = FireClaims(
        rt.redis,
        replica,
        ttl_seconds=settings.fire_claim_ttl,
        lease_seconds=settings.fire_lease_seconds,
        clock=lambda: datetime.now(UTC),
    )

    dispatcher = Dispatcher(
        schedules,
        claims,
        fire_sender(app),
        count=lambda name, result: metrics.SCHEDULE_FIRES.labels(name, result).inc(),
    )
    now = datetime.now(UTC)
    for schedule in schedules:
        upcoming = schedule.next_fires(now)
        if schedule.enabled and upcoming:
            metrics.SCHEDULE_NEXT_FIRE.labels(schedule.name).set(upcoming[0].timestamp())
    port = settings.metrics_port + 1 if metrics_port is None else metrics_port
    bound = serve_metrics(port, build_registry())
    record_build_info("scheduler")
    get_logger("fleet.scheduler").info(
        "scheduler_starting",
        replica=replica,
        schedules=[s.name for s in schedules if s.enabled],
        metrics=f"http://127.0.0.1:{bound}/metrics",
    )
    try:
        dispatcher.catch_up()
    except Exception as exc:  # a Redis outage at start must not stop the scheduler
        get_logger("fleet.scheduler").error("schedule_catch_up_failed", error=str(exc))
    built = build_scheduler(
        dispatcher,
        recover_every=max(1.0, settings.fire_lease_seconds / 2),
        on_next_fire=lambda name, at: metrics.SCHEDULE_NEXT_FIRE.labels(name).set(at.timestamp()),
    )
    run_until_signalled(built)


def fire_sender(app: Any) -> Any:
    """How the scheduler sends a fire: its deterministic task id, its schedule and time in
    the headers, and its ``expires``."""
    from workers.bookkeeping import FIRE_HEADER, SCHEDULE_HEADER

    def send(schedule: Any, fire: Any) -> None:
        app.send_task(
            schedule.job,
            kwargs=dict(schedule.kwargs),
            queue=schedule.queue,
            task_id=fire.task_id,
            expires=fire.expires,
            headers={SCHEDULE_HEADER: schedule.name, FIRE_HEADER: fire.stamp},
        )

    return send


def _jobs() -> dict[str, Any]:
    from workers.jobs import JOBS

    return JOBS


@click.command()
@json_option
@click.option(
    "--runs",
    type=click.IntRange(0, 1000),
    default=10,
    show_default=True,
    help="Recent runs to show.",
)
def status(as_json: bool, runs: int) -> None:
    """Schedules with their next fire and last outcome, queue depths, recent runs."""
    from schedules.status import collect_status, render_status
    from schedules.table import load_schedules
    from workers.celery_app import job_modules, load_jobs

    rt = start_runtime(start_embedded=False)
    jobs = load_jobs(job_modules(rt))
    schedules = load_schedules(rt.settings.schedule_file, jobs)
    report = collect_status(rt, schedules, datetime.now(UTC), runs=runs)
    if as_json:
        emit_json(report)
    else:
        render_status(report)


def register(group: click.Group) -> None:
    group.add_command(scheduler)
    group.add_command(status)
