"""A real Prometheus (Debian's ``prometheus`` package), started by tests on loopback, and
small HTTP apps for it to scrape (the demo's :class:`ExpositionServer`)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tasks.canary.demo import ExpositionServer, latency_exposition
from tests.helpers import free_port, installed


def prometheus_binary() -> str:
    return installed("prometheus", "prometheus")


def latency_app(center: Callable[[], float], seed: int) -> ExpositionServer:
    """An app serving its latency gauge on /metrics."""
    return ExpositionServer({"metrics": latency_exposition(center, seed)})


@contextmanager
def prometheus(
    jobs: dict[str, list[str]], rule_files: list[Path] | None = None, scrape_interval: str = "1s"
) -> Iterator[str]:
    """A Prometheus scraping ``jobs`` ({job: [host:port, ...]}); yields its URL."""
    binary = prometheus_binary()
    directory = Path(tempfile.mkdtemp(prefix="fleet-prom-"))
    config = directory / "prometheus.yml"
    lines = [
        "global:",
        f"  scrape_interval: {scrape_interval}",
        f"  evaluation_interval: {scrape_interval}",
    ]
    if rule_files:
        lines += ["rule_files:"] + [f"  - {path}" for path in rule_files]
    lines.append("scrape_configs:")
    for job, targets in jobs.items():
        lines += [
            f"  - job_name: {job}",
            "    static_configs:",
            f"      - targets: [{', '.join(repr(t) for t in targets)}]",
        ]
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                err = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"prometheus did not start: {err[-1000:]}", pytrace=False)
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(20)
        shutil.rmtree(directory, ignore_errors=True)


def samples_in(url: str, query: str) -> float:
    body = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=5).json()
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0
