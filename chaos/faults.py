"""The faults of a chaos run: a plan drawn from the seed, then each injected and logged.

Every kind is a fault production sees: a worker's main process or one of its pool
children SIGKILLed (OOM killer, node loss), a scheduler SIGKILLed, both schedulers at once
(a bad deploy), a worker SIGSTOPped for longer than the lock leases it holds (a GC pause, a
VM stall) and then continued, Redis shut down and started again or every client connection
of it killed, the fleet's PostgreSQL backends terminated (a failover, a pooler restart),
the audit sink's directory made immutable for a while (a full or read-only disk), and an
answer lost on its way back: the fleet's connections to Redis and PostgreSQL go through
answer-losing proxies (:mod:`chaos.proxy`), armed to cut the answer to the next script or
COMMIT after the server has acted.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from chaos.proxy import CuttingProxy
from chaos.servers import FleetProcess, OwnRedis, Supervisor

KINDS = {
    "kill_worker": 3,
    "kill_pool_child": 3,
    "kill_scheduler": 2,
    "kill_both_schedulers": 1,
    "stop_worker": 1,
    "redis_restart": 1,
    "redis_client_kill": 1,
    "pg_terminate": 2,
    "sink_read_only": 1,
    "redis_answer_lost": 2,
    "pg_commit_lost": 2,
}


@dataclass(frozen=True)
class Planned:
    at: float  # seconds from the start of the load
    kind: str


def plan(
    seed: int, seconds: float, first: float = 6.0, gap: tuple[float, float] = (3, 7)
) -> list[Planned]:
    """The faults of a run, from its seed alone: the same seed, the same plan."""
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items(), strict=True)
    planned, at = [], first
    while at < seconds - 5:
        planned.append(Planned(round(at, 1), rng.choices(kinds, weights)[0]))
        at += rng.uniform(*gap)
    return planned


@dataclass
class Injected:
    at: float
    kind: str
    target: str
    detail: str = ""


@dataclass
class Injector:
    supervisor: Supervisor
    redis_server: OwnRedis | None
    database_url: str  # psycopg
    database: str
    sink_dir: Path
    gates: list[threading.Lock]
    lease_seconds: float
    rng: random.Random
    log: Callable[[str], None]
    redis_proxy: CuttingProxy | None = None
    postgres_proxy: CuttingProxy | None = None
    done: list[Injected] = field(default_factory=list)
    _timers: list[threading.Timer] = field(default_factory=list)

    def inject(self, planned: Planned) -> None:
        handler = getattr(self, f"_{planned.kind}")
        target, detail = handler()
        made = Injected(round(self.supervisor.now(), 1), planned.kind, target, detail)
        self.done.append(made)
        self.log(f"{made.at:7.1f}s  {made.kind:<22} {made.target} {made.detail}".rstrip())

    def _pick(self, kind: str) -> FleetProcess | None:
        candidates = [p for p in self.supervisor.alive(kind) if not p.stopped]
        if not candidates:
            return None
        return self.rng.choice(candidates)

    def _kill_worker(self) -> tuple[str, str]:
        process = self._pick("worker")
        if process is None:
            return "-", "no worker alive"
        self.supervisor.kill(process)
        return process.name, f"pid {process.pid}"

    def _kill_pool_child(self) -> tuple[str, str]:
        process = self._pick("worker")
        children = process.pool_children() if process is not None else []
        if process is None or not children:
            return "-", "no pool child found"
        child = self.rng.choice(children)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        return process.name, f"child pid {child}"

    def _kill_scheduler(self) -> tuple[str, str]:
        process = self._pick("scheduler")
        if process is None:
            return "-", "no scheduler alive"
        self.supervisor.kill(process)
        return process.name, f"pid {process.pid}"

    def _kill_both_schedulers(self) -> tuple[str, str]:
        """Every replica down for 4 s: the fires in between are the catch-up's to settle."""
        schedulers = self.supervisor.alive("scheduler")
        for process in schedulers:
            process.held = True
            self.supervisor.kill(process)

        def release() -> None:
            for process in schedulers:
                process.held = False

        self._later(4.0, release)
        return ",".join(p.name for p in schedulers) or "-", "held down 4s"

    def _stop_worker(self) -> tuple[str, str]:
        process = self._pick("worker")
        if process is None:
            return "-", "no worker alive"
        pause = self.lease_seconds + 2
        process.stopped = True
        os.killpg(process.pid, signal.SIGSTOP)

        def wake() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)
            process.stopped = False

        self._later(pause, wake)
        return process.name, f"SIGSTOP for {pause:g}s (leases {self.lease_seconds:g}s)"

    def _redis_restart(self) -> tuple[str, str]:
        if self.redis_server is None:
            return "-", "skipped: the fleet's Redis is not the run's own"
        started = time.monotonic()
        with _holding(self.gates):
            self.redis_server.shutdown()
            self.redis_server.start()
        return "redis", f"SHUTDOWN NOSAVE, back in {time.monotonic() - started:.1f}s"

    def _redis_client_kill(self) -> tuple[str, str]:
        assert self.redis_server is not None
        client = redis.Redis.from_url(self.redis_server.url)
        try:
            with _holding(self.gates):
                killed = client.execute_command(  # type: ignore[no-untyped-call]
                    "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
                )
        finally:
            client.close()
        return "redis", f"CLIENT KILL TYPE normal: {killed} connections"

    def _pg_terminate(self) -> tuple[str, str]:
        with psycopg.connect(self.database_url, autocommit=True, application_name="chaos") as c:
            rows = c.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()"
                " AND application_name NOT LIKE 'chaos%%'",
                (self.database,),
            ).fetchone()
        return "postgresql", f"{rows[0] if rows else 0} backends terminated"

    def _sink_read_only(self) -> tuple[str, str]:
        paths = [self.sink_dir, *self.sink_dir.glob("*")]
        made = subprocess.run(
            ["chattr", "+i", *map(str, paths)], capture_output=True, text=True, check=False
        )
        if made.returncode != 0:
            return "audit sink", f"skipped: chattr refused ({made.stderr.strip()[:80]})"

        def writable() -> None:
            subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True, check=False)

        self._later(5.0, writable)
        return "audit sink", f"{len(paths)} paths immutable for 5s"

    def _redis_answer_lost(self) -> tuple[str, str]:
        """The next script the fleet sends (a take, a finish, a claim, a lock) runs, and
        its answer is lost on the way back."""
        if self.redis_proxy is None:
            return "-", "skipped: no proxy"
        self.redis_proxy.arm(b"EVAL", times=1)
        return "redis", "the next script's answer will be cut"

    def _pg_commit_lost(self) -> tuple[str, str]:
        """The fleet's next COMMIT is made, and its answer is lost on the way back."""
        if self.postgres_proxy is None:
            return "-", "skipped: no proxy"
        self.postgres_proxy.arm(b"COMMIT", times=1)
        return "postgresql", "the next COMMIT's answer will be cut"

    def _later(self, seconds: float, action: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def settle(self) -> None:
        """Every timed undo done now (continue, writable, released)."""
        for timer in self._timers:
            if timer.is_alive():
                timer.cancel()
                timer.function(*timer.args, **timer.kwargs)
        self._timers.clear()


@contextlib.contextmanager
def _holding(gates: list[threading.Lock]) -> Iterator[None]:
    for gate in gates:
        gate.acquire()
    try:
        yield
    finally:
        for gate in gates:
            gate.release()
