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
    stamps = []
    for raw in client.lrange("default", 0, -1):
        message = orjson.loads(raw)
        headers = message["headers"]
        assert headers["task"] == "fleet.heartbeat"
        assert headers["fleet_schedule"] == "every-second"
        kwargs = json.loads(base64.b64decode(message["body"]))[1]
        assert kwargs == {}
        stamps.append(headers["fleet_fire"])
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

    stamps = fires_in_queue(redis_client)
    duplicates = [stamp for stamp, n in Counter(stamps).items() if n > 1]
    assert duplicates == []
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
