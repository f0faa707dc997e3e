"""``fleet demo``: the whole fleet on the embedded default, watched live, then stopped.

The demo always runs in its own home (``.fleet/demo``, wiped at start) on SQLite and an
embedded Redis, whatever ``FLEET_*`` service settings are set: it seeds sample data and
must never write into a real database. It starts a scheduler and a worker as separate
processes (as production does), shows runs as they happen, checks that every job it
expects has succeeded, and exits 0 only then.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Protocol

import click
import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import select

from monitoring.prometheus_process import PrometheusProcess
from workers.cli.common import FleetCliError, start_runtime
from workers.cli.common import console as wide_console
from workers.db.models import TaskRun
from workers.ports import free_port
from workers.runtime import Runtime
from workers.settings import load_settings

# Service settings the demo never inherits: it runs on the embedded default only.
_SERVICE_VARIABLES = (
    "FLEET_DATABASE_URL",
    "FLEET_REDIS_URL",
    "FLEET_VAULT_ADDR",
    "FLEET_VAULT_TOKEN",
    "FLEET_VAULT_TOKEN_FILE",
    "FLEET_VAULT_DATABASE_MOUNTS",
    "FLEET_SCHEDULE_FILE",
    "FLEET_CONFIG_DIR",
    "FLEET_DRIFT_GIT_URL",
    "FLEET_DRIFT_CACHE_REDIS_URL",
)
# Each job family's part of the demo, found by module name (each has ``act()``).
ACT_MODULES: tuple[str, ...] = (
    "tasks.drift.demo",
    "tasks.impressions.demo",
    "tasks.secrets.demo",
    "tasks.audit.demo",
    "tasks.canary.demo",
    "tasks.rollouts.demo",
)
# Jobs the demo must see succeed, and how many times, besides what the acts expect.
EXPECTED_SUCCESSES = {"fleet.heartbeat": 2}


class DemoAct(Protocol):
    """One job family's part: seed data, act mid-way, say how it goes and what is missing.
    An act may also have ``env`` (settings for the fleet's processes, read after
    ``prepare``) and ``close()`` (called when the demo ends)."""

    name: str
    expected_successes: ClassVar[dict[str, int]]
    metrics: ClassVar[tuple[str, ...]]  # prefixes of the metrics to show at the end

    def prepare(self, rt: Runtime, now: datetime) -> str: ...
    def tick(self, rt: Runtime, now: datetime, remaining: float) -> str | None: ...
    def status(self, rt: Runtime) -> str: ...
    def problems(self, rt: Runtime) -> list[str]: ...


def load_acts() -> list[DemoAct]:
    return [importlib.import_module(name).act() for name in ACT_MODULES]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class DemoFleet:
    home: Path
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    def spawn(self, name: str, *args: str) -> Process:
        log = self.home / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "workers", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def died(self) -> Process | None:
        return next((p for p in self.processes if p.popen.poll() is not None), None)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown for all: SIGTERM, wait, and only then SIGKILL."""
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()


def _demo_env(home: Path, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({name: "" for name in _SERVICE_VARIABLES})  # empty means unset, even over .env
    env.update(
        FLEET_HOME=str(home),
        FLEET_REDIS_URL=redis_url,
        FLEET_DATABASE_URL=f"sqlite:///{home / 'fleet.db'}",
        FLEET_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    return env


def _runs_table(runs: list[TaskRun], elapsed: float, duration: float, statuses: list[str]) -> Table:
    caption = "\n".join(statuses) or None
    table = Table(
        title=f"fleet demo: {elapsed:4.0f}s of {duration:.0f}s",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    for column in ("started (UTC)", "job", "schedule", "outcome", "seconds", "result"):
        table.add_column(column)
    for run in runs[-15:]:
        seconds = (
            f"{(run.finished_at - run.started_at).total_seconds():.3f}" if run.finished_at else ""
        )
        table.add_row(
            run.started_at.strftime("%H:%M:%S"),
            run.job,
            run.schedule or "-",
            run.outcome,
            seconds,
            _short(run.result or run.error),
        )
    return table


def _short(value: Any, width: int = 60) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _missing_successes(runs: list[TaskRun], acts: list[DemoAct]) -> list[str]:
    expected = dict(EXPECTED_SUCCESSES)
    for act in acts:
        expected.update(act.expected_successes)
    missing = []
    for job, wanted in expected.items():
        seen = sum(1 for run in runs if run.job == job and run.outcome == "success")
        if seen < wanted:
            missing.append(f"{job}: {seen} of {wanted} successful runs")
    return missing


def _scrape(port: int, prefixes: tuple[str, ...]) -> list[str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        return [f"(metrics unavailable: {exc})"]
    return [line for line in text.splitlines() if line.startswith(prefixes)]


@click.command()
@click.option(
    "--duration",
    type=click.FloatRange(5, 3600),
    default=60.0,
    show_default=True,
    help="At most this many seconds: the demo stops as soon as every job has succeeded.",
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the demo keeps its state (default: FLEET_HOME/demo, wiped at start).",
)
def demo(duration: float, home: Path | None) -> None:
    """Run the fleet on the embedded default and show every job working."""
    overrides: dict[str, Any] = {
        name.removeprefix("FLEET_").lower(): None for name in _SERVICE_VARIABLES
    }
    overrides["vault_database_mounts"] = []  # a list: empty, not None
    base = load_settings(**overrides).home if home is None else home
    home = (base / "demo" if home is None else home).resolve()
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    console = wide_console()
    overrides.update(home=home, database_url=f"sqlite:///{home / 'fleet.db'}")
    rt = start_runtime(load_settings(**overrides))
    try:
        _run_demo(rt, home, duration, console)
    finally:
        rt.close()


def _run_demo(rt: Any, home: Path, duration: float, console: Console) -> None:
    from workers.db import migrate

    _before, after = migrate(rt.engine)
    console.print(f"database [bold]{rt.settings.sqlalchemy_url}[/] migrated to {after}")
    console.print(f"embedded Redis at [bold]{rt.redis_url}[/]")
    acts = load_acts()
    try:
        _run_acts(rt, home, duration, console, acts)
    finally:
        for act in acts:
            close = getattr(act, "close", None)
            if close is not None:
                close()


def _run_acts(rt: Any, home: Path, duration: float, console: Console, acts: list[DemoAct]) -> None:
    env = _demo_env(home, rt.redis_url)
    for act in acts:
        console.print(act.prepare(rt, datetime.now(UTC)))
        env.update(getattr(act, "env", {}))  # services an act started for the fleet to use
    fleet = DemoFleet(home, env)
    ports = {kind: free_port() for kind in ("worker", "scheduler", "exporter")}
    demo_schedule = Path(str(resources.files("schedules").joinpath("demo.yaml")))
    fleet.spawn("worker", "worker", "-c", "1", "--metrics-port", str(ports["worker"]))
    fleet.spawn(
        "scheduler",
        "scheduler",
        "--schedule-file",
        str(demo_schedule),
        "--metrics-port",
        str(ports["scheduler"]),
    )
    fleet.spawn("exporter", "exporter", "--metrics-port", str(ports["exporter"]))
    console.print(
        "metrics: "
        + ", ".join(f"{kind} http://127.0.0.1:{port}/metrics" for kind, port in ports.items())
        + f"; logs in {home / 'logs'}"
    )
    alerting = start_alerting(home, ports)
    console.print(alerting.said)
    try:
        runs = _watch(rt, fleet, acts, duration, console)
        shown = ("fleet_task_runs_total", *(m for act in acts for m in act.metrics))
        counts = {kind: _scrape(ports[kind], shown) for kind in ("worker", "exporter")}
        held = alerting.held()
    finally:
        fleet.stop()
        alerting.close()
    for kind, lines in counts.items():
        console.print(f"{kind} metrics at the end:")
        for line in lines:
            console.print(f"  {line}")
    for line in held:
        console.print(line)
    for act in acts:
        console.print(act.status(rt))
    missing = _missing_successes(runs, acts) + [p for act in acts for p in act.problems(rt)]
    if missing:
        raise FleetCliError(f"demo incomplete: {'; '.join(missing)} (logs in {home / 'logs'})")
    console.print(f"[bold green]demo ok[/]: {len(runs)} runs recorded; every job succeeded")


def _watch(
    rt: Any, fleet: DemoFleet, acts: list[DemoAct], duration: float, console: Console
) -> list[TaskRun]:
    started = time.monotonic()
    runs: list[TaskRun] = []
    shown = 0
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    with live if live is not None else contextlib.nullcontext():
        while (elapsed := time.monotonic() - started) < duration:
            dead = fleet.died()
            if dead is not None:
                tail = dead.log.read_text()[-600:]
                raise FleetCliError(f"the demo's {dead.name} exited early: {tail.strip()[-300:]}")
            with rt.sessions() as session:
                runs = list(session.scalars(select(TaskRun).order_by(TaskRun.id)))
            for act in acts:
                said = act.tick(rt, datetime.now(UTC), duration - elapsed)
                if said:
                    console.print(said)
            done = not _missing_successes(runs, acts) and not any(act.problems(rt) for act in acts)
            if live is not None:
                statuses = [act.status(rt) for act in acts]
                live.update(_runs_table(runs, elapsed, duration, statuses), refresh=True)
            else:
                finished = [run for run in runs if run.outcome != "running"]
                for run in finished[shown:]:
                    console.print(
                        f"{run.started_at:%H:%M:%S} {run.job} schedule={run.schedule or '-'} "
                        f"outcome={run.outcome} result={_short(run.result or run.error)}"
                    )
                shown = len(finished)
            if done:
                break
            time.sleep(0.5)
    return runs


@dataclass
class Alerting:
    """The demo's fleet scraped by a Prometheus of its own, loaded with the shipped rules
    and alerts (where Debian's prometheus is installed), to show the alerts it holds."""

    said: str
    prometheus: PrometheusProcess | None = None

    def held(self, settle: float = 15.0) -> list[str]:
        """The alerts Prometheus holds, once it has evaluated the exporter's series."""
        if self.prometheus is None:
            return []
        deadline = time.monotonic() + settle
        try:
            while time.monotonic() < deadline:
                if self.prometheus.query("fleet:job_seconds_since_success"):
                    time.sleep(1.5)  # one more evaluation of every group after that scrape
                    break
                time.sleep(0.5)
            alerts = self.prometheus.alerts()
        except (httpx.HTTPError, ValueError) as exc:
            return [f"alerts: could not read them from {self.prometheus.url}: {exc}"]
        lines = [f"alerts: Prometheus at {self.prometheus.url} holds {len(alerts)}"]
        for alert in sorted(alerts, key=lambda a: (a["labels"]["alertname"], str(a["labels"]))):
            labels = alert["labels"]
            extra = ", ".join(
                f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("alertname", "severity")
            )
            lines.append(
                f"  {labels['alertname']} ({labels.get('severity', '-')}, {alert['state']})"
                f"{': ' + extra if extra else ''}: {alert['annotations'].get('summary', '')}"
            )
        return lines

    def close(self) -> None:
        if self.prometheus is not None:
            self.prometheus.close()


def start_alerting(home: Path, ports: dict[str, int]) -> Alerting:
    binary = shutil.which("prometheus")
    rules = resources.files("monitoring").joinpath("prometheus")
    files = [Path(str(rules.joinpath(name))) for name in ("rules.yml", "alerts.yml")]
    if binary is None or not all(path.is_file() for path in files):
        return Alerting("alerts: skipped, no prometheus installed (apt-get install prometheus)")
    jobs = {
        "fleet-workers": "worker",
        "fleet-schedulers": "scheduler",
        "fleet-exporter": "exporter",
    }
    scrape = [
        {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{ports[kind]}"]}]}
        for job, kind in jobs.items()
    ]
    prometheus = PrometheusProcess(binary, home / "alerting", scrape, free_port(), files)
    if not prometheus.wait_ready():
        tail = prometheus.tail()
        prometheus.close()
        return Alerting(f"alerts: skipped, the demo's prometheus did not start: {tail}")
    return Alerting(
        f"alerts: Prometheus at {prometheus.url} scrapes the fleet with the shipped rules and "
        "alerts (monitoring/prometheus/); the alerts it holds are shown at the end",
        prometheus,
    )


def register(group: click.Group) -> None:
    group.add_command(demo)
