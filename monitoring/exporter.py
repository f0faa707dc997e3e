"""The ``/metrics`` endpoint of every fleet process (see :mod:`monitoring.multiprocess`).

Workers and schedulers serve what they count themselves. ``fleet exporter`` serves, once
for the whole fleet, what Redis and the database hold (:func:`build_fleet_registry`).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from monitoring.metrics import BUILD_INFO, BacklogCollector, FleetStateCollector
from monitoring.multiprocess import MULTIPROC_ENV
from workers import __version__

if TYPE_CHECKING:
    from workers.runtime import Runtime


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_LIVE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")


def mark_dead_processes(directory: str) -> list[int]:
    """Forget the live-gauge files of processes that are gone; return their pids."""
    dead = set()
    for name in os.listdir(directory):
        match = _LIVE_FILE.search(name)
        if match and not _pid_alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    return sorted(dead)


class LiveMultiProcessCollector(MultiProcessCollector):
    """Sums the children's files, after forgetting the live gauges of dead children."""

    def __init__(self, registry: Any, path: str) -> None:
        self._directory = path
        super().__init__(registry, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Any]:
        mark_dead_processes(self._directory)
        return super().collect()  # type: ignore[no-untyped-call,no-any-return]


def build_registry() -> Any:
    """The registry a worker or scheduler serves: what it counts, multiprocess-aware when
    the directory is set."""
    registry = CollectorRegistry()
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        LiveMultiProcessCollector(registry, directory)
    else:
        registry.register(REGISTRY)
    return registry


def build_fleet_registry(rt: Runtime) -> Any:
    """The registry ``fleet exporter`` serves: the fleet-wide state and its build, and none
    of the per-process counters (it counts nothing; zeros of its own would only add noise
    to every sum)."""
    registry = CollectorRegistry()
    registry.register(BUILD_INFO)
    for collector in fleet_collectors(rt):
        registry.register(collector)
    return registry


def fleet_collectors(rt: Runtime) -> list[Collector]:
    """The fleet-wide state, read at scrape time from Redis and from the database."""
    from workers.backlog import read_backlog
    from workers.fleetstate import read_fleet_state

    def read_state() -> Any:
        with rt.sessions() as session:
            return read_fleet_state(session, datetime.now(UTC))

    takeover = rt.settings.impressions_inflight_timeout.total_seconds()

    def read_waiting() -> Any:
        return read_backlog(rt.redis, orphaned_after=takeover)

    return [BacklogCollector(read_waiting), FleetStateCollector(read_state)]


def serve_metrics(port: int, registry: Any, addr: str = "0.0.0.0") -> int:  # noqa: S104
    """Serve ``/metrics`` on a daemon thread; returns the bound port (useful with 0)."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_port)


def record_build_info(process: str) -> None:
    BUILD_INFO.labels(__version__, platform.python_version(), process).set(1)
