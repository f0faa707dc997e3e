"""What a chaos run stands on: its own Redis server, its own database, and the fleet's
processes kept running as a supervisor would keep them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
from psycopg import sql

from workers.ports import free_port


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(step)
    raise RuntimeError(f"chaos: timed out after {timeout:g}s waiting for {what}")


class OwnRedis:
    """A redis-server of the run's own, so that it can be shut down and started again.
    Append-only with an fsync per write: a restart keeps every write it acknowledged, as a
    production Redis holding a broker and queues must (without persistence a restart loses
    the queues by design, which is not the fault under test)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        client = redis.Redis.from_url(self.url)
        try:
            wait_until(lambda: bool(client.ping()), 20, "the run's Redis")
        finally:
            client.close()

    def shutdown(self) -> None:
        """``SHUTDOWN NOSAVE``: the append-only file keeps what was acknowledged."""
        client = redis.Redis.from_url(self.url)
        with contextlib.suppress(redis.RedisError):
            client.shutdown(nosave=True)
        client.close()
        if self.process is not None:
            self.process.wait(timeout=20)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def recreate_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class FleetProcess:
    name: str
    kind: str  # worker, scheduler, exporter
    args: list[str]
    metrics_port: int
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    stopped: bool = False  # SIGSTOPped: alive, not to be restarted
    held: bool = False  # kept down on purpose
    alive_since: float | None = None
    down: list[tuple[float, float | None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def pool_children(self) -> list[int]:
        """The prefork pool's processes (not the heartbeat companion)."""
        if self.popen is None:
            return []
        return [p for p in _children(self.pid) if "workers.liveness" not in _cmdline(p)]


class Supervisor:
    """Starts the fleet's processes and restarts any that dies, after a short pause, as
    systemd or Kubernetes would. Records when each was down (the scheduler accounting needs
    the windows when no replica ran)."""

    def __init__(self, env: dict[str, str], logs: Path, started: float) -> None:
        self.env = env
        self.logs = logs
        self.t0 = started
        self.processes: dict[str, FleetProcess] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="chaos-supervisor", daemon=True)
        logs.mkdir(parents=True, exist_ok=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, name: str, kind: str, *args: str) -> FleetProcess:
        port = free_port()
        process = FleetProcess(name, kind, [*args, "--metrics-port", str(port)], port)
        self.processes[name] = process
        self._spawn(process)
        return process

    def _spawn(self, process: FleetProcess) -> None:
        out = (self.logs / f"{process.name}.log").open("ab")
        process.popen = subprocess.Popen(
            [sys.executable, "-m", "workers", *process.args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        process.alive_since = self.now()

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                for process in self.processes.values():
                    if process.popen is None or process.held:
                        continue
                    if process.popen.poll() is not None:
                        died = self.now()
                        if not process.down or process.down[-1][1] is not None:
                            process.down.append((died, None))
                        # A supervisor's restart delay; then up again.
                        time.sleep(0.5)
                        self._reap_group(process)
                        self._spawn(process)
                        process.restarts += 1
                    elif self._back_up(process):
                        # Down until it serves again, not until it was started: on a slow
                        # machine a start takes seconds, and no replica fires meanwhile.
                        process.down[-1] = (process.down[-1][0], self.now())

    @staticmethod
    def _back_up(process: FleetProcess) -> bool:
        """A process down, restarted since, whose /metrics port now takes connections."""
        if not process.down or process.down[-1][1] is not None:
            return False
        if process.alive_since is None or process.alive_since <= process.down[-1][0]:
            return False  # the one that went down, maybe still closing its port
        try:
            socket.create_connection(("127.0.0.1", process.metrics_port), timeout=0.2).close()
        except OSError:
            return False
        return True

    @staticmethod
    def _reap_group(process: FleetProcess) -> None:
        """What a killed main process left (pool children, its heartbeat companion) goes
        with it, as a service manager's cgroup would take them."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def kill(self, process: FleetProcess, sig: signal.Signals = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        if sig == signal.SIGKILL:
            process.down.append((self.now(), None))

    def alive(self, kind: str) -> list[FleetProcess]:
        return [
            p
            for p in self.processes.values()
            if p.kind == kind and p.popen is not None and p.popen.poll() is None
        ]

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), then whatever is left is killed."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for process in self.processes.values():
                if process.popen is not None and process.popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGCONT)
                        os.kill(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for process in self.processes.values():
                if process.popen is None:
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                self._reap_group(process)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(timeout=5)
