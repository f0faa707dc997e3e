"""Redis behind Sentinel: ``FLEET_REDIS_URL=redis+sentinel://host:port/MASTER/DB`` for the
fleet's own keys and for the broker, through a failover. Real servers on loopback: a
master, a replica and a Sentinel (``redis-server --sentinel``), started here."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.helpers import FleetProcess, free_port, run_fleet, wait_for
from workers.runtime import redis_client

Spawn = Callable[..., FleetProcess]
MASTER = "fleetmaster"


@dataclass
class Group:
    master: int
    replica: int
    sentinel: int

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{MASTER}/0"

    def sentinel_client(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel, decode_responses=True)

    def master_port(self) -> int:
        return int(self.sentinel_client().sentinel_get_master_addr_by_name(MASTER)[1])


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    ports = Group(free_port(), free_port(), free_port())
    base = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {ports.sentinel}\nbind 127.0.0.1\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {ports.master} 1\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 10000\n"
    )
    commands = [
        [*base, "--port", str(ports.master), "--dir", str(tmp_path)],
        [
            *base,
            "--port",
            str(ports.replica),
            "--dir",
            str(tmp_path),
            "--replicaof",
            "127.0.0.1",
            str(ports.master),
        ],
        [binary, str(conf), "--sentinel"],
    ]
    processes = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands
    ]
    try:
        client = ports.sentinel_client()
        wait_for(
            lambda: _answers(lambda: client.sentinel_slaves(MASTER)),
            timeout=30,
            what="the Sentinel to know the replica",
            interval=0.2,
        )
        yield ports
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def _answers(probe: Callable[[], object]) -> bool:
    try:
        return bool(probe())
    except redis.RedisError:
        return False


def failover(group: Group) -> None:
    """Ask the Sentinel for a failover (again while it finds no replica fit yet)."""
    before = group.master_port()
    sentinel = group.sentinel_client()
    wait_for(
        lambda: _answers(lambda: sentinel.execute_command("SENTINEL", "FAILOVER", MASTER)),
        timeout=60,
        what="the Sentinel to accept a failover",
        interval=0.5,
    )
    wait_for(
        lambda: _answers(lambda: group.master_port() != before),
        timeout=30,
        what="the failover",
        interval=0.2,
    )


def test_the_fleets_client_follows_the_master_through_a_failover(group: Group) -> None:
    client = redis_client(group.url, socket_timeout=2)
    client.set("fleet:test:before", "1")
    assert client.wait(1, 10_000) == 1  # replication is asynchronous: on the replica first
    first = group.master_port()
    failover(group)
    assert group.master_port() != first
    old = redis.Redis(port=first)
    wait_for(  # until then the old master still takes writes (Sentinel's own window)
        lambda: _answers(lambda: old.role()[0] == b"slave"),
        timeout=30,
        what="the old master to follow the new one",
        interval=0.2,
    )
    wait_for(
        lambda: _answers(lambda: client.set("fleet:test:after", "2")),
        timeout=30,
        what="a write to the new master",
        interval=0.2,
    )
    assert client.get("fleet:test:before") == b"1"  # replicated before the failover
    assert client.get("fleet:test:after") == b"2"
    assert redis.Redis(port=group.master_port()).get("fleet:test:after") == b"2"


def test_jobs_run_through_sentinel_before_and_after_a_failover(
    group: Group, fleet_env: dict[str, str], spawn: Spawn
) -> None:
    fleet_env["FLEET_REDIS_URL"] = group.url
    worker = spawn("worker", "-c", "1", "--metrics-port", "0", env=fleet_env)
    done = run_fleet("enqueue", "fleet.heartbeat", "--wait", "--timeout", "60", env=fleet_env)
    assert done.returncode == 0, done.stderr + worker.output()
    failover(group)
    done = run_fleet("enqueue", "fleet.heartbeat", "--wait", "--timeout", "90", env=fleet_env)
    assert done.returncode == 0, done.stderr + worker.output()[-3000:]
