"""Core commands: ``migrate``, ``worker``, ``enqueue``, ``run``."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any

import click

from workers.cli.common import (
    FleetCliError,
    emit_json,
    json_option,
    settings_or_exit,
    start_runtime,
)
from workers.jobs import QUEUES
from workers.settings import FleetSettings

arg_option = click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="KEY=VALUE",
    help="A job argument; repeat for several. Values are JSON where the argument is not text.",
)


@click.command()
@json_option
def migrate(as_json: bool) -> None:
    """Bring the database to the newest schema (safe to run again, and concurrently)."""
    from workers.db import migrate as upgrade
    from workers.settings import mask_url

    rt = start_runtime()
    before, after = upgrade(rt.engine)
    summary = {
        "database": mask_url(rt.settings.sqlalchemy_url),
        "revision_before": before,
        "revision": after,
        "changed": before != after,
    }
    if as_json:
        emit_json(summary)
    else:
        change = f"{before or 'empty'} -> {after}" if before != after else f"already at {after}"
        click.echo(f"migrated {summary['database']}: {change}")


def _queues(value: str | None) -> list[str]:
    if not value:
        return list(QUEUES)
    chosen = [q.strip() for q in value.split(",") if q.strip()]
    unknown = [q for q in chosen if q not in QUEUES]
    if unknown:
        raise FleetCliError(
            f"unknown queue {unknown[0]!r} (known: {', '.join(QUEUES)})", exit_code=2
        )
    return chosen


def _counters_at_zero(settings: FleetSettings) -> None:
    """Every alerted counter series this worker can know of, at 0 before its first event
    (see :func:`monitoring.metrics.start_at_zero`)."""
    from monitoring import metrics
    from tasks.drift.model import KINDS
    from tasks.drift.sources import desired_files
    from tasks.impressions.records import REASONS
    from workers.jobs import JOBS

    environments = desired_files(settings.configuration_dir)
    metrics.start_at_zero(JOBS, environments, REASONS, KINDS)


@click.command()
@click.option(
    "-Q",
    "--queues",
    help=f"Comma-separated queues to consume (default: all of {','.join(QUEUES)}).",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(1, 256),
    help="Worker processes (default: FLEET_WORKER_CONCURRENCY).",
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "threads", "solo"]),
    default="prefork",
    show_default=True,
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Port for /metrics (default: FLEET_METRICS_PORT).",
)
@click.option("-n", "--hostname", help="Node name (default: worker-<pid>@<host>).")
def worker(
    queues: str | None,
    concurrency: int | None,
    pool: str,
    metrics_port: int | None,
    hostname: str | None,
) -> None:
    """Run a worker: consume the queues, run jobs, serve /metrics.

    SIGTERM (or Ctrl-C) is a warm shutdown: running jobs finish, then the worker exits.
    A second signal stops at once; unfinished jobs go back to the queue.
    """
    from monitoring.multiprocess import prepare_multiprocess

    settings = settings_or_exit()
    chosen = _queues(queues)
    port = settings.metrics_port if metrics_port is None else metrics_port
    if pool == "prefork":
        # Before anything imports prometheus_client: the children count, the parent serves.
        prepare_multiprocess(settings.home.resolve() / "metrics" / f"worker-{port}")
    rt = start_runtime(settings)
    rt.require_migrated()

    from monitoring.exporter import build_registry, record_build_info, serve_metrics
    from workers.celery_app import create_app
    from workers.logs import get_logger

    app = create_app(rt)
    _counters_at_zero(settings)
    bound = serve_metrics(port, build_registry())
    record_build_info("worker")
    node = hostname or f"worker-{os.getpid()}@{socket.gethostname()}"
    get_logger("fleet.worker").info(
        "worker_starting",
        node=node,
        queues=chosen,
        pool=pool,
        metrics=f"http://127.0.0.1:{bound}/metrics",
        **rt.settings.describe(),
    )
    process = app.Worker(
        hostname=node,
        queues=chosen,
        concurrency=concurrency or settings.worker_concurrency,
        pool=pool,
        loglevel=settings.log_level,
        without_gossip=True,
        without_mingle=True,
    )
    from workers.liveness import companion, stop_companion

    heartbeat = companion(node)
    try:
        process.start()
    finally:
        stop_companion(heartbeat)
    sys.exit(process.exitcode or 0)


@click.command()
@click.argument("job")
@arg_option
@click.option("--wait", is_flag=True, help="Wait for the run and print its result.")
@click.option(
    "--timeout", type=float, default=600.0, show_default=True, help="Seconds --wait waits."
)
def enqueue(job: str, args: tuple[str, ...], wait: bool, timeout: float) -> None:
    """Send JOB to its queue, for a worker to run. Prints the task id (and, with --wait,
    the result as JSON)."""
    from workers.celery_app import create_app
    from workers.jobs import get_job, parse_cli_arguments

    rt = start_runtime(start_embedded=False)
    app = create_app(rt)
    spec = get_job(job)
    kwargs = parse_cli_arguments(spec, args)
    sent = app.send_task(spec.name, kwargs=kwargs, queue=spec.queue)
    if not wait:
        click.echo(sent.id)
        return
    click.echo(f"enqueued {spec.name} as {sent.id} on {spec.queue}; waiting", err=True)
    try:
        value = sent.get(timeout=timeout, propagate=False)
    except TimeoutError:
        raise FleetCliError(f"{spec.name} ({sent.id}) did not finish within {timeout:g}s") from None
    if sent.failed():
        raise FleetCliError(f"{spec.name} ({sent.id}) failed: {_one_line(value)}")
    emit_json({"task_id": sent.id, "job": spec.name, "result": value})


@click.command(name="run")
@click.argument("job")
@arg_option
def run_job(job: str, args: tuple[str, ...]) -> None:
    """Run JOB here and now, without the broker, and print its result as JSON."""
    from workers.celery_app import create_app
    from workers.jobs import get_job, parse_cli_arguments

    rt = start_runtime()
    rt.require_migrated()
    app = create_app(rt)
    spec = get_job(job)
    kwargs = parse_cli_arguments(spec, args)
    outcome = app.tasks[spec.name].apply(kwargs=kwargs)
    value = outcome.get(propagate=False)
    if outcome.failed():
        raise FleetCliError(f"{spec.name} failed: {_one_line(value)}")
    emit_json(value)


def _one_line(value: Any) -> str:
    from workers.bookkeeping import describe_error

    if isinstance(value, BaseException):
        return describe_error(value) or type(value).__name__
    return str(value)


@click.command()
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Port for /metrics (default: FLEET_METRICS_PORT + 2).",
)
def exporter(metrics_port: int | None) -> None:
    """Serve the fleet-wide metrics: open drift findings, secret statuses, audit backlog,
    canary deployments, each job's last success, queue depths. They are read from the
    database and Redis at every scrape, so run one exporter per fleet (workers and
    schedulers serve only what they count themselves)."""
    settings = settings_or_exit()
    rt = start_runtime(settings)
    rt.require_migrated()

    from monitoring.exporter import build_fleet_registry, record_build_info, serve_metrics
    from workers.logs import get_logger

    port = settings.metrics_port + 2 if metrics_port is None else metrics_port
    bound = serve_metrics(port, build_fleet_registry(rt))
    record_build_info("exporter")
    log = get_logger("fleet.exporter")
    log.info("exporter_started", metrics=f"http://127.0.0.1:{bound}/metrics")
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    log.info("exporter_stopped")
    rt.close()


def register(group: click.Group) -> None:
    for command in (migrate, worker, exporter, enqueue, run_job):
        group.add_command(command)
