"""`/metrics` of a prefork worker, a scheduler and the exporter, after known work: workers
and schedulers serve what they count, the exporter the fleet-wide state, once."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from monitoring.metrics import SCRAPE_TIME_NAMES
from tests.helpers import FleetProcess, free_port, run_fleet, wait_for
from workers.db import make_engine
from workers.db.models import TaskRun

Spawn = Callable[..., FleetProcess]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def answers(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


def finished(engine: Engine) -> int:
    with engine.connect() as connection:
        query = select(func.count()).select_from(TaskRun).where(TaskRun.outcome != "running")
        return int(connection.execute(query).scalar_one())


def test_worker_metrics_after_known_work(
    fleet_env: dict[str, str], spawn: Spawn, engine: Engine
) -> None:
    fleet_env["FLEET_EXTRA_JOB_MODULES"] = '["tests.jobs_for_tests"]'
    port = free_port()
    started = time.time()
    worker = spawn("worker", "-Q", "default", "-c", "2", "--metrics-port", str(port), env=fleet_env)
    for _ in range(3):
        assert run_fleet("enqueue", "fleet.heartbeat", env=fleet_env).returncode == 0
    assert run_fleet("enqueue", "test.refused", "--arg", "key=m1", env=fleet_env).returncode == 0
    assert run_fleet("enqueue", "test.secretive", "--arg", "value=x", env=fleet_env).returncode == 0
    wait_for(lambda: finished(engine) >= 4, timeout=60, what="four finished runs")

    # A pool child killed between tasks: what it counted must survive it.
    children = [
        p
        for p in Path("/proc").glob("[0-9]*/stat")
        if p.read_text().rsplit(")", 1)[1].split()[1] == str(worker.pid)
    ]
    os.kill(int(children[0].parent.name), signal.SIGKILL)

    wait_for(lambda: answers(port), timeout=30, what="the worker's /metrics")
    samples = scrape(port)
    assert value(samples, "fleet_task_runs_total", task="fleet.heartbeat", outcome="success") == 3
    assert value(samples, "fleet_task_runs_total", task="test.refused", outcome="failure") == 1
    assert value(samples, "fleet_task_duration_seconds_count", task="fleet.heartbeat") == 3
    build = [k for k in samples if k[0] == "fleet_build_info"]
    assert len(build) == 1 and ("process", "worker") in build[0][1]
    # Fleet-wide state is the exporter's alone: a worker serving it would double every sum.
    assert {name for name, _ in samples} & set(SCRAPE_TIME_NAMES) == set()
    assert all(label not in ("job", "instance") for _, labels in samples for label, _ in labels)

    exporter_port = free_port()
    spawn("exporter", "--metrics-port", str(exporter_port), env=fleet_env)
    wait_for(lambda: answers(exporter_port), timeout=30, what="the exporter's /metrics")
    fleet = scrape(exporter_port)
    last = value(fleet, "fleet_job_last_success_timestamp_seconds", task="fleet.heartbeat")
    assert last is not None and started <= last <= time.time()
    assert value(fleet, "fleet_job_last_success_timestamp_seconds", task="test.refused") is None
    assert value(fleet, "fleet_queue_depth", queue="secrets") == 1  # nobody consumes it
    assert value(fleet, "fleet_queue_depth", queue="default") == 0
    assert value(fleet, "fleet_broker_up") == 1 and value(fleet, "fleet_database_up") == 1
    assert value(fleet, "fleet_task_runs_total", task="fleet.heartbeat", outcome="success") is None
    assert value(fleet, "fleet_impressions_processed_total") is None  # counted by workers only
    assert next(k for k in fleet if k[0] == "fleet_build_info")[1] >= {("process", "exporter")}


def test_scheduler_metrics_count_its_fires(
    fleet_env: dict[str, str], spawn: Spawn, tmp_path: Path
) -> None:
    import redis

    table = tmp_path / "t.yaml"
    table.write_text(
        "schedules:\n"
        "  - {name: tick, job: fleet.heartbeat, cron: '* * * * * *', queue: canary}\n"
        "  - {name: never, job: fleet.heartbeat, cron: '0 0 1 1 *', enabled: false}\n"
    )
    port = free_port()
    spawn("scheduler", "--schedule-file", str(table), "--metrics-port", str(port), env=fleet_env)
    client = redis.Redis.from_url(fleet_env["FLEET_REDIS_URL"])
    wait_for(lambda: client.llen("canary") >= 3, timeout=30, what="three fires")
    wait_for(lambda: answers(port), timeout=30, what="the scheduler's /metrics")
    samples = scrape(port)
    enqueued = value(samples, "fleet_schedule_fires_total", schedule="tick", result="enqueued")
    depth = client.llen("canary")
    assert enqueued is not None
    assert abs(enqueued - depth) <= 1  # a fire may land between the two reads
    assert depth >= 3
    assert value(samples, "fleet_queue_depth", queue="canary") is None  # the exporter's
    next_fire = value(samples, "fleet_schedule_next_fire_timestamp_seconds", schedule="tick")
    assert next_fire is not None and abs(next_fire - time.time()) < 5
    assert value(samples, "fleet_schedule_next_fire_timestamp_seconds", schedule="never") is None
    build = [k for k in samples if k[0] == "fleet_build_info"]
    assert len(build) == 1 and ("process", "scheduler") in build[0][1]
    client.close()
