"""Helpers for tests that talk to real services and fleet subprocesses."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from workers.ports import free_port as free_port  # re-exported: the tests take it from here

CI = os.environ.get("CI", "").lower() == "true"
ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def service_missing(what: str, error: BaseException) -> None:
    reason = f"{what} unreachable ({type(error).__name__}: {error})"
    if CI:
        pytest.fail(f"{reason}: CI=true requires it", pytrace=False)
    pytest.skip(reason)


def installed(binary: str, package: str) -> str:
    """The path of ``binary``; skip the test without it (fail it under CI=true)."""
    found = shutil.which(binary)
    if found is None:
        message = f"{binary} is not installed (apt-get install {package})"
        if CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def wait_for(
    probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` on timeout.

    Used for events in other processes (a row written, a port open), which cannot be
    awaited directly; the timeout is a ceiling, never the expected duration.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(interval)


class FleetProcess:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "workers", *args],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=env.get("FLEET_HOME", str(ROOT)),
            start_new_session=True,  # its own process group: kill it with its children
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_group(self, sig: signal.Signals = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                self.popen.wait()
        self.kill_group()  # children a killed parent left behind
        self._out.close()
        return int(self.popen.returncode)


def run_fleet(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    Path(env.get("FLEET_HOME", ".")).mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=env.get("FLEET_HOME", str(ROOT)),
        check=False,
    )


def fleet_gauge(
    sessions: Callable[[], Any], name: str, labels: dict[str, str] | None = None
) -> float | None:
    """A fleet-wide gauge as ``fleet exporter`` serves it at this moment (read from the
    database through ``sessions``, a session factory), or None when it has no such series."""
    from datetime import UTC, datetime

    from prometheus_client import CollectorRegistry

    from monitoring.metrics import FleetStateCollector
    from workers.fleetstate import read_fleet_state

    def read() -> Any:
        with sessions() as session:
            return read_fleet_state(session, datetime.now(UTC))

    registry = CollectorRegistry()
    registry.register(FleetStateCollector(read))
    value = registry.get_sample_value(name, labels or {})
    return None if value is None else float(value)
