"""Real `fleet worker` subprocesses on real Redis and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, select

from tests.helpers import FleetProcess, run_fleet, wait_for
from workers.db import make_engine
from workers.db.models import TaskRun
from workers.liveness import HEARTBEATS

Spawn = Callable[..., FleetProcess]


@pytest.fixture
def env(fleet_env: dict[str, str]) -> dict[str, str]:
    # Short limits so that a dead worker's message comes back within seconds.
    fleet_env.update(
        FLEET_VISIBILITY_TIMEOUT="4",
        FLEET_TIME_LIMITS=json.dumps({"*": [2.5, 3]}),
    )
    return fleet_env


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


def runs(engine: Engine, task_id: str | None = None) -> list[TaskRun]:
    query = select(TaskRun).order_by(TaskRun.id)
    if task_id is not None:
        query = query.where(TaskRun.task_id == task_id)
    with engine.connect() as connection:
        return list(connection.execute(query))  # type: ignore[arg-type]


def outcomes(engine: Engine, task_id: str) -> list[str]:
    return [row.outcome for row in runs(engine, task_id)]


def enqueue(env: dict[str, str], *args: str) -> str:
    done = run_fleet("enqueue", "fleet.heartbeat", *args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_an_enqueued_job_runs_in_a_worker_and_leaves_its_row(
    env: dict[str, str], spawn: Spawn, engine: Engine
) -> None:
    worker = spawn("worker", "-c", "1", "--metrics-port", "0", env=env)
    done = run_fleet("enqueue", "fleet.heartbeat", "--wait", "--timeout", "60", env=env)
    assert done.returncode == 0, done.stderr + worker.output()
    printed = json.loads(done.stdout)
    assert printed["job"] == "fleet.heartbeat"
    assert set(printed["result"]) >= {"redis_ms", "database_ms"}
    (row,) = runs(engine, printed["task_id"])
    assert (row.job, row.outcome, row.schedule) == ("fleet.heartbeat", "success", None)
    assert row.worker is not None and row.worker.startswith("worker-")


def test_a_worker_killed_mid_task_has_the_task_run_again_by_another(
    env: dict[str, str], spawn: Spawn, engine: Engine
) -> None:
    first = spawn("worker", "-c", "1", "--metrics-port", "0", env=env, name="first")
    task_id = enqueue(env, "--arg", "hold_seconds=2")
    wait_for(lambda: outcomes(engine, task_id) == ["running"], timeout=60, what="the run to start")
    first.kill_group(signal.SIGKILL)
    first.popen.wait(10)
    assert outcomes(engine, task_id) == ["running"]  # nobody finished it

    second = spawn("worker", "-c", "1", "--metrics-port", "0", env=env, name="second")
    wait_for(
        lambda: outcomes(engine, task_id) == ["lost", "success"],
        timeout=60,
        what=f"the task to run again on the second worker: {outcomes(engine, task_id)}",
    )
    lost, rerun = runs(engine, task_id)
    assert lost.worker != rerun.worker
    assert second.popen.poll() is None


def test_a_killed_workers_run_is_marked_lost_by_a_live_worker_before_any_redelivery(
    env: dict[str, str], spawn: Spawn, engine: Engine, redis_client: redis.Redis
) -> None:
    """The message of a SIGKILLed worker comes back only after the visibility timeout
    (600 s here); the live worker's heartbeat check finds the run within seconds."""
    env.update(
        FLEET_VISIBILITY_TIMEOUT="600",
        FLEET_TIME_LIMITS='{"*": [20, 25]}',
        FLEET_WORKER_HEARTBEAT_INTERVAL="0.5",
        FLEET_WORKER_LOST_AFTER="3",
    )
    live = spawn("worker", "-c", "1", "-Q", "canary", "--metrics-port", "0", env=env, name="live")
    doomed = spawn("worker", "-c", "1", "--metrics-port", "0", env=env, name="doomed")
    task_id = enqueue(env, "--arg", "hold_seconds=20")
    wait_for(lambda: outcomes(engine, task_id) == ["running"], timeout=60, what="the run")
    (row,) = runs(engine, task_id)

    def beating() -> set[str]:
        return {k.decode() for k in redis_client.zrange(HEARTBEATS, 0, -1)}

    wait_for(lambda: len(beating()) == 2, timeout=30, what=f"two heartbeats: {beating()}")
    assert row.worker in beating()
    companion = [
        int(p.name)
        for p in Path("/proc").glob("[0-9]*")
        if _parent_of(p / "stat") == doomed.pid and _is_heartbeat(p)
    ]
    assert len(companion) == 1
    os.kill(doomed.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
    doomed.popen.wait(10)
    killed_at = time.monotonic()
    wait_for(
        lambda: (
            not Path(f"/proc/{companion[0]}/cmdline").exists()
            or not _is_heartbeat(Path(f"/proc/{companion[0]}"))
        ),
        timeout=10,
        what="the orphaned heartbeat to stop by itself",
    )
    wait_for(
        lambda: outcomes(engine, task_id) == ["lost"],
        timeout=30,
        what=f"the live worker to mark the run lost: {outcomes(engine, task_id)}",
    )
    assert time.monotonic() - killed_at < 15
    (row,) = runs(engine, task_id)
    assert row.error == "worker stopped its heartbeat for over 3s before the run finished"
    wait_for(lambda: "task_runs_lost" in live.output(), timeout=10, what="the log line")
    assert outcomes(engine, task_id) == ["lost"]  # the orphaned pool child is still on it
    doomed.kill_group(signal.SIGKILL)
    assert live.stop() == 0  # a warm shutdown leaves the set: gone, not lost
    remaining = {k.decode() for k in redis_client.zrange(HEARTBEATS, 0, -1)}
    assert remaining == {row.worker}  # only the killed one, which never said goodbye


def test_a_killed_pool_child_gives_its_task_back(
    env: dict[str, str], spawn: Spawn, engine: Engine
) -> None:
    """task_reject_on_worker_lost: the child dies, the parent requeues the message.

    The limits are generous here: billiard can take seconds to notice a dead child, and a
    time limit that expires first turns the loss into a timeout failure instead.
    """
    env.update(FLEET_VISIBILITY_TIMEOUT="60", FLEET_TIME_LIMITS='{"*": [20, 25]}')
    worker = spawn("worker", "-c", "1", "--metrics-port", "0", env=env)
    task_id = enqueue(env, "--arg", "hold_seconds=2")
    wait_for(lambda: outcomes(engine, task_id) == ["running"], timeout=60, what="the run")
    os.kill(_pool_child(worker.pid), signal.SIGKILL)
    wait_for(
        lambda: outcomes(engine, task_id) == ["lost", "success"],
        timeout=60,
        what=f"the requeued task to succeed: {outcomes(engine, task_id)}",
    )


def test_a_run_past_its_hard_time_limit_is_killed_and_recorded(
    env: dict[str, str], spawn: Spawn, engine: Engine
) -> None:
    """A child that ignores its soft limit (stopped here) is killed at the hard limit."""
    worker = spawn("worker", "-c", "1", "--metrics-port", "0", env=env)
    task_id = enqueue(env, "--arg", "hold_seconds=2")
    wait_for(lambda: outcomes(engine, task_id) == ["running"], timeout=60, what="the run")
    os.kill(_pool_child(worker.pid), signal.SIGSTOP)
    wait_for(lambda: outcomes(engine, task_id) == ["failure"], timeout=30, what="the hard limit")
    (row,) = runs(engine, task_id)
    assert row.error == "TimeLimitExceeded: TimeLimitExceeded(3.0,)"


def _pool_child(parent: int) -> int:
    """The worker's one pool process (``-c 1``): its only child but the heartbeat's."""
    children = [
        int(status.parent.name)
        for status in Path("/proc").glob("[0-9]*/stat")
        if _parent_of(status) == parent and not _is_heartbeat(status.parent)
    ]
    assert len(children) == 1, f"expected one pool child of {parent}, found {children}"
    return children[0]


def _is_heartbeat(process: Path) -> bool:
    try:
        return b"workers.liveness" in (process / "cmdline").read_bytes()
    except OSError:
        return False


def _parent_of(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_sigterm_is_a_warm_shutdown(env: dict[str, str], spawn: Spawn, engine: Engine) -> None:
    worker = spawn("worker", "-c", "1", "--metrics-port", "0", env=env)
    task_id = enqueue(env, "--arg", "hold_seconds=2")
    wait_for(lambda: outcomes(engine, task_id) == ["running"], timeout=60, what="the run")
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(30) == 0, worker.output()
    assert outcomes(engine, task_id) == ["success"]


def test_enqueue_refuses_unknown_jobs_and_bad_arguments(env: dict[str, str]) -> None:
    unknown = run_fleet("enqueue", "drift.nope", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().startswith("fleet: error: unknown job 'drift.nope'")
    bad = run_fleet("enqueue", "fleet.heartbeat", "--arg", "hold_seconds=soon", env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "fleet: error: fleet.heartbeat: argument hold_seconds='soon': "
        "Input should be a valid number, unable to parse string as a number"
    )


def test_a_worker_refuses_an_unmigrated_database(
    env: dict[str, str], empty_postgres_url: str
) -> None:
    env["FLEET_DATABASE_URL"] = empty_postgres_url
    done = run_fleet("worker", "--metrics-port", "0", env=env, timeout=60)
    assert done.returncode == 2
    assert "database schema is at nothing" in done.stderr and "fleet migrate" in done.stderr


def test_unknown_queue_is_refused(env: dict[str, str]) -> None:
    done = run_fleet("worker", "-Q", "default,bulk", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("fleet: error: unknown queue 'bulk'")
