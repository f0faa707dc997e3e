"""One chaos run: the fleet under load while things fail, then every invariant checked."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from rich.console import Console
from rich.table import Table

from chaos import checks
from chaos.faults import Injector, plan
from chaos.load import AuditProducer, ImpressionProducer
from chaos.proxy import CuttingProxy
from chaos.servers import OwnRedis, Supervisor, recreate_database, wait_until
from schedules.table import load_schedules
from workers.backlog import IMPRESSIONS, IMPRESSIONS_IN_FLIGHT
from workers.celery_app import JOB_MODULES, load_jobs

SCHEDULE = """\
# A chaos run's schedule table: the fleet's jobs at short intervals.
schedules:
  - {name: heartbeat, job: fleet.heartbeat, cron: "*/5 * * * * *", misfire_grace_seconds: 5}
  - name: impressions
    job: impressions.aggregate
    cron: "*/2 * * * * *"
    kwargs: {budget_seconds: 1.5}
    misfire_grace_seconds: 2
  - name: audit-ship
    job: audit.ship
    cron: "*/3 * * * * *"
    kwargs: {budget_seconds: 2.5}
    misfire_grace_seconds: 3
  - {name: drift, job: drift.detect, cron: "*/10 * * * * *", misfire_grace_seconds: 10}
  - {name: secrets, job: secrets.check_rotation, cron: "*/15 * * * * *", misfire_grace_seconds: 15}
"""
LOCK_LEASE = 6  # seconds: the audit sink lock (FLEET_AUDIT_LOCK_TTL) a SIGSTOP outlasts


@dataclass(frozen=True)
class Options:
    seconds: float
    seed: int
    rate: int
    drain_seconds: float
    admin_url: str
    database: str
    home: Path
    broken: str

    @classmethod
    def from_env(cls) -> Options:
        seed = os.environ.get("CHAOS_SEED")
        return cls(
            seconds=float(os.environ.get("CHAOS_SECONDS", "120")),
            seed=int(seed) if seed else random.SystemRandom().randrange(1, 100_000),
            rate=int(os.environ.get("CHAOS_RATE", "2000")),
            drain_seconds=float(os.environ.get("CHAOS_DRAIN_SECONDS", "150")),
            admin_url=os.environ.get(
                "CHAOS_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
            ),
            database=os.environ.get("CHAOS_DATABASE", "fleet_chaos"),
            home=Path(os.environ.get("CHAOS_HOME", ".fleet/chaos")).resolve(),
            broken=os.environ.get("CHAOS_BREAK", ""),
        )


def _database_url(admin_url: str, name: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


class Run:
    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.console = console
        self.home = options.home
        self.pg_url = _database_url(options.admin_url, options.database)
        self.redis = OwnRedis(self.home / "redis")
        self.env: dict[str, str] = {}
        self.redis_proxy: CuttingProxy | None = None
        self.postgres_proxy: CuttingProxy | None = None

    def say(self, text: str) -> None:
        print(f"chaos: {text}", flush=True)

    def prepare(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        recreate_database(self.options.admin_url, self.options.database)
        self.redis.start()
        # The fleet reaches both through proxies that can lose an answer (armed by faults).
        self.redis_proxy = CuttingProxy(("127.0.0.1", self.redis.port), b"EVAL", times=0)
        pg = urlsplit(self.pg_url)
        self.postgres_proxy = CuttingProxy(
            (pg.hostname or "127.0.0.1", pg.port or 5432), b"COMMIT", times=0
        )
        user, at, _ = pg.netloc.rpartition("@")
        fleet_pg = pg._replace(
            scheme="postgresql+psycopg",
            netloc=f"{user}{at}127.0.0.1:{self.postgres_proxy.port}",
        )
        schedule = self.home / "schedule.yaml"
        schedule.write_text(SCHEDULE)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        self.env.update(
            FLEET_HOME=str(self.home),
            FLEET_DATABASE_URL=urlunsplit(fleet_pg),
            FLEET_REDIS_URL=f"redis://127.0.0.1:{self.redis_proxy.port}/0",
            FLEET_SCHEDULE_FILE=str(schedule),
            FLEET_LOG_FORMAT="json",
            FLEET_WORKER_HEARTBEAT_INTERVAL="4",
            FLEET_WORKER_LOST_AFTER="20",
            FLEET_IMPRESSIONS_INFLIGHT_TIMEOUT="PT10S",
            FLEET_AUDIT_LOCK_TTL=str(LOCK_LEASE),
            FLEET_AUDIT_HMAC_KEY=secrets.token_hex(32),
            FLEET_FIRE_LEASE_SECONDS="5",
        )
        if self.options.broken:
            self.env["FLEET_CHAOS_BREAK"] = self.options.broken
        migrated = self.fleet("migrate")
        if migrated.returncode != 0:
            raise RuntimeError(f"chaos: fleet migrate failed: {migrated.stderr[-500:]}")

    def fleet(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def _drained(self, client: redis.Redis, audit: list[AuditProducer]) -> bool:
        if client.llen(IMPRESSIONS) or client.zcard(IMPRESSIONS_IN_FLIGHT):
            return False
        with psycopg.connect(self.pg_url, application_name="chaos-check") as connection:
            stuck = connection.execute(
                "SELECT count(*) FROM task_runs WHERE outcome = 'running'"
                " AND started_at < now() - interval '5 seconds'"
            ).fetchone()
            tables = {
                t: connection.execute(f"SELECT count(*) FROM {t}").fetchone()  # noqa: S608
                for t in (*checks.PLATFORM_TABLES, "fleet_audit_log")
            }
        if stuck and stuck[0]:
            return False
        shipped, _ = checks._shipped(self.home / "audit")
        return all(len(shipped.get(t, [])) >= (n[0] if n else 0) for t, n in tables.items())

    def execute(self) -> int:  # noqa: C901 - one run, read top to bottom
        options = self.options
        self.say(
            f"seed {options.seed}, {options.seconds:g}s of load at {options.rate}/s, "
            f"home {self.home}" + (f", BROKEN: {options.broken}" if options.broken else "")
        )
        self.prepare()
        origin_wall = datetime.now(UTC)
        supervisor = Supervisor(self.env, self.home / "logs", time.monotonic())
        for index in (1, 2):
            supervisor.add(f"worker-{index}", "worker", "worker", "-c", "2")
        for index in (1, 2):
            supervisor.add(f"scheduler-{index}", "scheduler", "scheduler")
        supervisor.add("exporter", "exporter", "exporter")
        supervisor.start()
        injector: Injector | None = None
        try:
            self._await_first_runs()
            load_started = supervisor.now()
            impressions = ImpressionProducer(self.redis.url, options.rate, options.seed)
            audit = [AuditProducer(self.pg_url, options.seed, i) for i in range(3)]
            injector = Injector(
                supervisor,
                self.redis,
                self.pg_url,
                options.database,
                self.home / "audit",
                [impressions.gate],
                LOCK_LEASE,
                random.Random(options.seed),
                lambda line: print(f"  fault {line}", flush=True),
                self.redis_proxy,
                self.postgres_proxy,
            )
            for producer in (impressions, *audit):
                producer.start()
            planned = plan(options.seed, options.seconds)
            self.say(f"load started; {len(planned)} faults planned")
            for fault in planned:
                delay = load_started + fault.at - supervisor.now()
                if delay > 0:
                    time.sleep(delay)
                injector.inject(fault)
            time.sleep(max(0.0, load_started + options.seconds - supervisor.now()))
            impressions.stopping.set()
            for writer in audit:
                writer.stopping.set()
            for thread in (impressions, *audit):
                thread.join(timeout=30)
            load_ended = supervisor.now()
            injector.settle()
            self.say(
                f"load stopped: {impressions.pushed:,} impressions, "
                f"{sum(len(v) for p in audit for v in p.committed.values()):,} audit rows; draining"
            )
            errors = impressions.errors + [e for p in audit for e in p.errors]
            if any(p.errors for p in audit):
                raise RuntimeError(f"chaos: a producer failed: {errors[:3]}")
            client = redis.Redis.from_url(self.redis.url)
            drained_in = time.monotonic()
            try:
                wait_until(
                    lambda: self._drained(client, audit),
                    options.drain_seconds,
                    "the fleet to drain",
                    step=1.0,
                )
            except RuntimeError as exc:
                self.say(str(exc))
            finally:
                client.close()
            self.say(f"drained in {time.monotonic() - drained_in:.1f}s")
            ports = {
                p.name: p.metrics_port
                for p in supervisor.processes.values()
                if p.popen is not None and p.popen.poll() is None
            }
            imp_check, imp = checks.impressions(self.pg_url, self.redis.url, impressions)
            shipped_now = sum(len(v) for v in checks._shipped(self.home / "audit")[0].values())
            metric_check = checks.metrics(ports, imp["counted"], shipped_now)
        finally:
            if injector is not None:
                injector.settle()
            supervisor.stop()
        # After the warm shutdown: what the workers gave back, and what killed ones held.
        held = checks.held_in_broker(self.redis.url)
        verify = self.fleet("audit", "verify", str(self.home / "audit"))
        audit_check, rows = checks.audit(
            self.pg_url,
            self.home / "audit",
            audit,
            (verify.returncode, verify.stdout + verify.stderr),
        )
        schedules = load_schedules(self.home / "schedule.yaml", load_jobs(JOB_MODULES))
        downs = [p.down for p in supervisor.processes.values() if p.kind == "scheduler"]
        windows = checks.all_down_windows(downs, supervisor.now(), slack=4.0)
        window = (
            origin_wall + timedelta(seconds=load_started),
            origin_wall + timedelta(seconds=load_ended),
        )
        fire_check, fires = checks.fires(
            self.pg_url,
            held,
            schedules,
            window,
            checks.to_datetimes(windows, origin_wall),
            self.home / "logs",
        )
        runtime_check, lost_runs = checks.runtime(self.pg_url)
        results = [imp_check, audit_check, fire_check, runtime_check, metric_check]
        self._report(results, injector, supervisor)
        faults = len(injector.done) if injector else 0
        print(
            f"chaos: {faults} faults, impressions {imp['pushed']:,} pushed = {imp['counted']:,} "
            f"counted + {imp['dead']:,} dead-lettered ({imp['lost']} lost, {imp['doubled']} "
            f"doubled), audit {rows:,} rows = {f'{rows:,}' if audit_check.ok else '?'} shipped in "
            "order "
            f"(chain {'verified' if verify.returncode == 0 else 'NOT verified'}), fires "
            f"{fires.get('scheduled', 0)} scheduled, {fires.get('ran', 0)} ran once, "
            f"{fires.get('twice', 0)} twice, lost runs {lost_runs} found",
            flush=True,
        )
        failed = [c for c in results if not c.ok]
        if failed:
            print(
                f"chaos: FAILED ({', '.join(c.name for c in failed)}); "
                f"replay with CHAOS_SEED={options.seed} CHAOS_SECONDS={options.seconds:g}"
                + (f" CHAOS_BREAK={options.broken}" if options.broken else ""),
                flush=True,
            )
            return 1
        self.redis.close()
        return 0

    def _await_first_runs(self) -> None:
        def ran() -> bool:
            with psycopg.connect(self.pg_url, application_name="chaos-check") as connection:
                row = connection.execute(
                    "SELECT count(DISTINCT job) FROM task_runs WHERE outcome = 'success'"
                ).fetchone()
            return bool(row and row[0] >= 2)

        wait_until(ran, 90, "the fleet's first runs", step=0.5)

    def _report(
        self, results: list[checks.Check], injector: Injector | None, sup: Supervisor
    ) -> None:
        self.console.file.flush()
        table = Table(title="chaos: invariants", title_justify="left")
        for column in ("invariant", "holds", "figures", "first evidence"):
            table.add_column(column)
        for check in results:
            table.add_row(
                check.name, "yes" if check.ok else "NO", check.figures, "\n".join(check.evidence)
            )
        self.console.print(table)
        if injector is not None:
            kinds: dict[str, int] = {}
            for made in injector.done:
                kinds[made.kind] = kinds.get(made.kind, 0) + 1
            restarts = ", ".join(f"{p.name} {p.restarts}" for p in sup.processes.values())
            cut = [self.redis_proxy.cuts if self.redis_proxy else 0]
            cut.append(self.postgres_proxy.cuts if self.postgres_proxy else 0)
            self.say(
                "faults by kind: "
                + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
                + f"; answers cut: Redis {cut[0]}, PostgreSQL {cut[1]}; restarts: {restarts}"
            )


def main() -> None:
    console = Console(width=160)
    options = Options.from_env()
    if shutil.which("redis-server") is None:
        console.print("chaos: redis-server is not installed (apt-get install redis-server)")
        sys.exit(2)
    run = Run(options, console)
    try:
        code = run.execute()
    finally:
        run.redis.close()
        for proxy in (run.redis_proxy, run.postgres_proxy):
            if proxy is not None:
                proxy.close()
    sys.exit(code)
