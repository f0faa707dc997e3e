"""`fleet run` and `fleet status` against the real services, and their error lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.helpers import run_fleet


def test_run_prints_the_result_as_json_and_status_shows_it(fleet_env: dict[str, str]) -> None:
    done = run_fleet("run", "fleet.heartbeat", env=fleet_env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"host", "redis_ms", "database_ms", "held_seconds"}

    status = run_fleet("status", "--json", env=fleet_env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    (heartbeat,) = [s for s in report["schedules"] if s["name"] == "heartbeat"]
    assert heartbeat["job"] == "fleet.heartbeat" and heartbeat["next_fire"]
    assert report["queues"] == {q: 0 for q in report["queues"]}
    assert set(report["queues"]) == {
        "secrets",
        "impressions",
        "drift",
        "canary",
        "audit",
        "default",
    }
    (run,) = report["recent_runs"]
    assert (run["job"], run["outcome"]) == ("fleet.heartbeat", "success")
    assert "postgres" in report["settings"]["database"]

    table = run_fleet("status", env=fleet_env)
    assert table.returncode == 0, table.stderr
    for heading in ("Schedules", "Queues", "Recent runs", "fleet.heartbeat"):
        assert heading in table.stdout


def test_status_on_the_embedded_default_with_nothing_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_HOME"] = str(tmp_path / "home")
    assert run_fleet("migrate", env=env).returncode == 0
    done = run_fleet("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["queues"] is None
    assert "embedded Redis is not running" in report["broker_error"]


def test_enqueue_with_no_broker_running_refuses_rather_than_lose_the_message(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_HOME"] = str(tmp_path / "home")
    done = run_fleet("enqueue", "fleet.heartbeat", env=env)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "fleet: error: the embedded Redis is not running: start `fleet worker` or "
        "`fleet demo` first, or set FLEET_REDIS_URL"
    )


def test_run_on_an_unmigrated_database_says_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_HOME"] = str(tmp_path / "home")
    done = run_fleet("run", "fleet.heartbeat", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("run `fleet migrate`")


def test_redis_down_is_one_line(fleet_env: dict[str, str]) -> None:
    fleet_env["FLEET_REDIS_URL"] = "redis://127.0.0.1:1/0"
    done = run_fleet("run", "fleet.heartbeat", env=fleet_env)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("fleet:")]
    assert len(lines) == 1 and "fleet.heartbeat failed" in lines[0], done.stderr
    assert "Connection refused" in lines[0] or "Error 111" in lines[0]


def test_every_command_has_help() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    for command in ("demo", "worker", "scheduler", "enqueue", "run", "migrate", "status"):
        done = run_fleet(command, "--help", env=env)
        assert done.returncode == 0 and "Usage: fleet" in done.stdout, command
