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
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tasks.canary.demo import ExpositionServer, latency_exposition
from tests.helpers import free_port, installed


def prometheus_binary() -> str:
    return installed("prometheus", "prometheus")


def latency_app(center: Callable[[], float], seed: int) -> ExpositionServer:
    """An app serving its latency gauge on /metrics."""
    return ExpositionServer({"metrics": latency_exposition(center, seed)})


@contextmanager
def serving(command: list[str], url: str, log: Path, what: str) -> Iterator[None]:
    """Run ``command`` until ``{url}/-/ready`` answers 200; stop it on exit.

    Its output goes to ``log`` rather than a pipe: a pipe nobody reads while the test runs
    would fill up and block the server once it logs enough (failed scrapes, notifications).
    """
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                output = log.read_text(errors="replace")[-1000:]
                pytest.fail(f"{what} did not start: {output}", pytrace=False)
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def _running_prometheus(config: str) -> Iterator[str]:
    """A Prometheus loaded with the YAML text ``config``; yields its URL."""
    binary = prometheus_binary()
    directory = Path(tempfile.mkdtemp(prefix="fleet-prom-"))
    try:
        config_file = directory / "prometheus.yml"
        config_file.write_text(config)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with serving(command, url, directory / "prometheus.log", "prometheus"):
            yield url
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def prometheus(
    jobs: dict[str, list[str]], rule_files: list[Path] | None = None, scrape_interval: str = "1s"
) -> Iterator[str]:
    """A Prometheus scraping ``jobs`` ({job: [host:port, ...]}); yields its URL."""
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
    with _running_prometheus("\n".join(lines) + "\n") as url:
        yield url


def _retargeted(
    shipped: dict[str, Any], path: Path, targets: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """The shipped scrape_configs with each job's static targets replaced by ``targets``."""
    jobs = [job["job_name"] for job in shipped.get("scrape_configs") or []]
    missing = [job for job in jobs if job not in targets]
    unknown = [job for job in targets if job not in jobs]
    if missing or unknown:
        pytest.fail(
            f"targets do not match the jobs of {path} ({', '.join(jobs)}): "
            f"missing {missing or 'none'}, not in the file {unknown or 'none'}",
            pytrace=False,
        )
    scrape_configs = []
    for job in shipped["scrape_configs"]:
        static = job.get("static_configs")
        # Labels are kept; they must agree, since the job's targets become one group.
        labels = [entry.get("labels") for entry in static or []]
        if not static or any(entry != labels[0] for entry in labels):
            pytest.fail(
                f"job {job['job_name']} of {path} has no static_configs, or static_configs "
                "with different labels: cannot replace its targets",
                pytrace=False,
            )
        group: dict[str, Any] = {"targets": targets[job["job_name"]]}
        if labels[0]:
            group["labels"] = labels[0]
        scrape_configs.append({**job, "static_configs": [group]})
    return scrape_configs


@contextmanager
def prometheus_from_config(
    config_path: Path,
    targets: dict[str, list[str]],
    rule_files: list[Path],
    alertmanager_url: str | None = None,
    interval: str = "1s",
) -> Iterator[str]:
    """A Prometheus loaded with the shipped ``config_path`` (its jobs and their settings),
    with each job scraping ``targets[job]``, evaluating ``rule_files`` every ``interval``
    and, with ``alertmanager_url``, sending alerts there; yields its URL.

    A job of the file missing from ``targets``, or one ``targets`` names that the file
    lacks, fails the test: the shipped jobs are what is under test.
    """
    shipped: dict[str, Any] = yaml.safe_load(config_path.read_text()) or {}
    config = {
        **shipped,
        "global": {
            **(shipped.get("global") or {}),
            "scrape_interval": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": _retargeted(shipped, config_path, targets),
    }
    # The shipped file's Alertmanagers (compose hostnames) would only be unreachable here.
    config.pop("alerting", None)
    if alertmanager_url is not None:
        parts = urlsplit(alertmanager_url)
        manager: dict[str, Any] = {
            "scheme": parts.scheme or "http",
            "static_configs": [{"targets": [parts.netloc]}],
        }
        if parts.path.strip("/"):
            manager["path_prefix"] = parts.path
        config["alerting"] = {"alertmanagers": [manager]}
    with _running_prometheus(yaml.safe_dump(config, sort_keys=False)) as url:
        yield url


def samples_in(url: str, query: str) -> float:
    body = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=5).json()
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0
