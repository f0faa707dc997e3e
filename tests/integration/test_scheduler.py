"""Several `fleet scheduler` replicas: every fire enqueued exactly once, even when one dies."""

from __future__ import annotations

import base64
import json
import signal
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import orjson
import redis

from tests.helpers import FleetProcess, free_port, wait_for

Spawn = Callable[..., FleetProcess]

EVERY_SECOND = """
schedules:
  - name: every-second
    job: fleet.heartbeat
    cron: "* * * * * *"
    misfire_grace_seconds: 5
"""


def fires_in_queue(client: redis.Redis) -> list[str]:
    """The fire time of every message waiting in the default queue."""
    return [stamp for stamp, _ in messages_in_queue(client)]


def messages_in_queue(client: redis.Redis) -> list[tuple[str, str]]:
    """(fire time, task id) of every message waiting in the default queue."""
    stamps = []
    for raw in client.lrange("default", 0, -1):
        message = orjson.loads(raw)
        headers = message["headers"]
        assert headers["task"] == "fleet.heartbeat"
        assert headers["fleet_schedule"] == "every-second"
        kwargs = json.loads(base64.b64decode(message["body"]))[1]
        assert kwargs == {}
        stamps.append((headers["fleet_fire"], headers["id"]))
    return stamps


def results_logged(process: FleetProcess) -> Counter[str]:
    counted: Counter[str] = Counter()
    for line in process.output().splitlines():
        if line.startswith("{") and '"schedule_fired"' in line:
            counted[orjson.loads(line)["result"]] += 1
    return counted


def test_three_replicas_enqueue_each_fire_once_and_survive_a_kill(
    fleet_env: dict[str, str], spawn: Spawn, redis_client: redis.Redis, tmp_path: Path
) -> None:
    table = tmp_path / "every-second.yaml"
    table.write_text(EVERY_SECOND)
    fleet_env["FLEET_FIRE_LEASE_SECONDS"] = "2"
    replicas = [
        spawn(
            "scheduler",
            "--schedule-file",
            str(table),
            "--metrics-port",
            str(free_port()),
            env=fleet_env,
            name=f"scheduler{i}",
        )
        for i in range(3)
    ]
    for replica in replicas:
        wait_for(
            lambda r=replica: '"schedule_loaded"' in r.output(),
            timeout=60,
            what=f"{replica.log.name} to start",
        )
    started = len(fires_in_queue(redis_client))
    wait_for(
        lambda: len(fires_in_queue(redis_client)) >= started + 6,
        timeout=30,
        what="six fires with three replicas",
    )

    victim = replicas[0]
    victim.kill_group(signal.SIGKILL)
    victim.popen.wait(10)
    after_kill = len(fires_in_queue(redis_client))
    wait_for(
        lambda: len(fires_in_queue(redis_client)) >= after_kill + 4,
        timeout=30,
        what="four more fires with two replicas",
    )
    for replica in replicas[1:]:
        assert replica.stop() == 0, replica.output()[-2000:]

    messages = messages_in_queue(redis_client)
    stamps = [stamp for stamp, _ in messages]
    # A fire the victim sent and was killed before confirming is sent again by the replica
    # that takes its claim over: the same fire, the same task id, so the worker runs it once
    # (test_fires_queued_while_no_worker_runs_expire_and_a_second_message_is_dropped). Any
    # other second message is a fire sent twice.
    recovered = {
        orjson.loads(line)["fire"]
        for replica in replicas[1:]
        for line in replica.output().splitlines()
        if line.startswith("{") and '"schedule_fire_recovered"' in line
    }
    twice = {stamp for stamp, n in Counter(stamps).items() if n > 1}
    assert all(Counter(stamps)[stamp] == 2 for stamp in twice), messages
    assert twice <= recovered, f"sent twice without a take-over: {twice - recovered}"
    assert len(twice) <= 1, twice  # only what the victim had in flight when it died
    for stamp in twice:
        ids = {task_id for s, task_id in messages if s == stamp}
        assert len(ids) == 1, f"{stamp} sent under two task ids: {ids}"
    stamps = sorted(set(stamps))
    seconds = sorted(
        int(datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()) for s in stamps
    )
    assert seconds == list(range(seconds[0], seconds[0] + len(seconds))), "a fire was missed"

    logged = [results_logged(r) for r in replicas]
    assert sum(c["enqueued"] + c["recovered"] for c in logged) >= len(stamps)
    assert sum(c["already_claimed"] for c in logged) >= 10  # the others saw each fire too
    assert all(c["misfired"] == 0 for c in logged)


def test_a_malformed_schedule_file_stops_the_scheduler_with_one_line(
    fleet_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.helpers import run_fleet

    table = tmp_path / "bad.yaml"
    table.write_text(EVERY_SECOND.replace('"* * * * * *"', '"*/70 * * * *"'))
    done = run_fleet(
        "scheduler", "--schedule-file", str(table), "--metrics-port", "0", env=fleet_env
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"fleet: error: {table}: schedule 'every-second': bad cron")
    assert len([line for line in lines if line.startswith("fleet:")]) == 1


EVERY_TWO_SECONDS = """
schedules:
  - name: covering
    job: fleet.heartbeat
    cron: "*/2 * * * * *"
    misfire_grace_seconds: 1
    catch_up: once
  - name: plain
    job: fleet.heartbeat
    cron: "*/2 * * * * *"
    misfire_grace_seconds: 1
"""


def counted(port: int, result: str, schedule: str) -> float:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("fleet_schedule_fires_total{") and (
            f'result="{result}"' in line and f'schedule="{schedule}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_fires_missed_while_every_replica_was_down_are_caught_up_once(
    fleet_env: dict[str, str], spawn: Spawn, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Every replica stops across at least three fires; the first to start again sends
    one run for the latest missed fire of the ``catch_up: once`` schedule and counts the
    others; the ``none`` schedule's are only counted; a second replica adds nothing."""
    from datetime import UTC, timedelta

    from schedules.claims import LAST_FIRES

    table = tmp_path / "table.yaml"
    table.write_text(EVERY_TWO_SECONDS)
    first = spawn(
        "scheduler",
        "--schedule-file",
        str(table),
        "--metrics-port",
        str(free_port()),
        env=fleet_env,
        name="before",
    )
    wait_for(
        lambda: (
            redis_client.zscore(LAST_FIRES, "covering") is not None
            and redis_client.zscore(LAST_FIRES, "plain") is not None
        ),
        timeout=30,
        what="a fire of each schedule",
    )
    assert first.stop() == 0
    last = datetime.fromtimestamp(float(redis_client.zscore(LAST_FIRES, "covering") or 0), UTC)
    wait_for(
        lambda: datetime.now(UTC) > last + timedelta(seconds=7),
        timeout=30,
        what="three fires to pass with no replica",
    )
    queued = len(redis_client.lrange("default", 0, -1))
    ports = [free_port(), free_port()]
    back = spawn(
        "scheduler",
        "--schedule-file",
        str(table),
        "--metrics-port",
        str(ports[0]),
        env=fleet_env,
        name="back",
    )
    wait_for(lambda: '"schedule_loaded"' in back.output(), timeout=60, what="the restart")
    assert counted(ports[0], "caught_up", "covering") == 1
    assert counted(ports[0], "missed", "covering") >= 2
    assert counted(ports[0], "caught_up", "plain") == 0
    assert counted(ports[0], "missed", "plain") >= 3
    caught = [line for line in back.output().splitlines() if '"schedule_fires_missed"' in line]
    assert len(caught) == 2
    second = spawn(
        "scheduler",
        "--schedule-file",
        str(table),
        "--metrics-port",
        str(ports[1]),
        env=fleet_env,
        name="second",
    )
    wait_for(lambda: '"schedule_loaded"' in second.output(), timeout=60, what="a second replica")
    assert counted(ports[1], "caught_up", "covering") == 0
    assert counted(ports[1], "missed", "covering") == 0
    assert len(redis_client.lrange("default", 0, -1)) > queued  # the catch-up message is there


def test_fires_queued_while_no_worker_runs_expire_and_a_second_message_is_dropped(
    fleet_env: dict[str, str], spawn: Spawn, postgres_url: str, tmp_path: Path
) -> None:
    """50 fires wait in the queue past their expiry: the worker that comes drops each one,
    recorded ``expired``, and runs none. Then one fire sent twice (a replica that died
    between send and confirm, its successor sending again): one run, one ``duplicate``."""
    from datetime import UTC, timedelta

    from sqlalchemy import select

    from schedules.claims import Fire
    from schedules.cli import fire_sender
    from schedules.table import parse_schedules
    from workers.celery_app import create_app
    from workers.db import make_engine
    from workers.db.models import TaskRun
    from workers.jobs import JOBS
    from workers.runtime import Runtime, install
    from workers.settings import FleetSettings

    rt = install(
        Runtime(
            FleetSettings(
                home=Path(fleet_env["FLEET_HOME"]),
                database_url=fleet_env["FLEET_DATABASE_URL"],
                redis_url=fleet_env["FLEET_REDIS_URL"],
            )
        )
    )
    app = create_app(rt)
    (schedule,) = parse_schedules(EVERY_SECOND, "t.yaml", JOBS)
    send = fire_sender(app)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    soon = datetime.now(UTC) + timedelta(seconds=1)
    for second in range(50):
        send(schedule, Fire(schedule.name, start + timedelta(seconds=second), expires=soon))
    wait_for(lambda: datetime.now(UTC) > soon, timeout=10, what="the fires to expire")
    engine = make_engine(postgres_url)

    def outcomes() -> Counter[str]:
        with engine.connect() as connection:
            return Counter(connection.execute(select(TaskRun.outcome)).scalars())

    worker = spawn("worker", "-c", "1", "--metrics-port", "0", env=fleet_env)
    wait_for(lambda: outcomes()["expired"] == 50, timeout=60, what=f"50 expired: {outcomes()}")
    assert set(outcomes()) == {"expired"}

    twice = Fire(schedule.name, start + timedelta(minutes=1), expires=soon + timedelta(hours=1))
    send(schedule, twice)
    send(schedule, twice)  # the same fire, the same task id, a second message
    wait_for(
        lambda: outcomes()["success"] + outcomes()["duplicate"] == 2,
        timeout=60,
        what=f"both messages handled: {outcomes()}",
    )
    assert (outcomes()["success"], outcomes()["duplicate"]) == (1, 1)
    wait_for(  # the pool child's line reaches the log a moment after its row
        lambda: '"task_duplicate_dropped"' in worker.output(), timeout=15, what="the log line"
    )
    engine.dispose()
    app.close()
    rt.close()
