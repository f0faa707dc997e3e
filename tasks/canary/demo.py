"""The canary act of ``fleet demo``: two canary deployments judged by a real Prometheus.

Canaries are judged only with a Prometheus to ask. Where none is configured but Debian's
``prometheus`` is installed, the demo starts one of its own (in the demo's home, on a free
loopback port, scraping every second) and three small apps for it to scrape: a baseline,
a healthy canary and one whose latency is three times the baseline's. Two deployments
change two production keys, each giving the candidate to its canary subset (a tenant);
``canary.analyze`` promotes the first and rolls back the second, as it would in
production, and the demo counts the change events published on
``config_changes:production`` as the platform's watchers would receive them. With no
Prometheus at all the demo says so plainly.
"""

from __future__ import annotations

import random
import shutil
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from sqlalchemy import func, select

from monitoring.prometheus_process import PrometheusProcess
from tasks.canary import create_deployment
from tasks.canary.spec import CanarySpec, Subset
from workers.db.models import CanaryDeployment, TaskRun
from workers.runtime import Runtime

# (deployment, scrape job of its canary, production key it changes, new value, latency)
DEPLOYMENTS = (
    ("pool-size-30", "canary_healthy", "database.postgresql.pool_size", 30, 0.10),
    ("openai-timeout-10", "canary_slow", "external_apis.openai.timeout", 10, 0.35),
)
BASELINE_LATENCY = 0.10
VERDICTS = {"pool-size-30": "promoted", "openai-timeout-10": "rolled_back"}
# Other acts' apps for the demo's Prometheus to scrape ({scrape job: exposition}), added
# when their modules are imported (before any act prepares): the fleet has one
# FLEET_PROMETHEUS_URL, so there is one Prometheus for every act.
SCRAPED: dict[str, Callable[[], str]] = {}
_STARTED: list[str] = []  # the URL of the demo's own Prometheus, once it answers


def judging_prometheus() -> str | None:
    """The demo's own Prometheus (scraping :data:`SCRAPED` too), when it started."""
    return _STARTED[-1] if _STARTED else None


class ExpositionServer:
    """A loopback HTTP server: ``GET /<route>`` answers ``routes[route]()``, Prometheus
    text. The demo's apps, and the tests' ones."""

    def __init__(self, routes: Mapping[str, Callable[[], str]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                return

            def do_GET(self) -> None:
                render = routes.get(self.path.strip("/"))
                if render is None:
                    self.send_error(404)
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def latency_exposition(center: Callable[[], float], seed: int) -> Callable[[], str]:
    """An app's ``app_latency_seconds`` gauge: ``center()`` give or take 5%."""
    rng = random.Random(seed)

    def render() -> str:
        value = center() * (1 + rng.uniform(-0.05, 0.05))
        return f"# TYPE app_latency_seconds gauge\napp_latency_seconds {value}\n"

    return render


def latency_canary(
    name: str, job: str, key: str, value: Any, *, critical: bool = False, **analysis: Any
) -> CanarySpec:
    """A production change judged on ``app_latency_seconds`` of scrape job ``job`` against
    the ``baseline`` job. By default at the demo's pace: judged every run, over the last
    20 s of 1 s samples; ``analysis`` overrides."""
    return CanarySpec.model_validate(
        {
            "name": name,
            "change": {"key": key, "environment": "production", "value": value},
            "canary": f'job="{job}"',
            "baseline": 'job="baseline"',
            "metrics": [
                {
                    "name": "latency",
                    "query": "app_latency_seconds{$selector}",
                    "direction": "increase",
                    # Critical, a metric without data fails the analysis: the demo judges
                    # from its first second, before 8 samples are in.
                    "critical": critical,
                }
            ],
            "analysis": {
                "interval": 0,
                "window": 20,
                "step": 1,
                "passes": 2,
                "failure_limit": 2,
                "inconclusive_limit": 10,
                "min_samples": 8,
                "prometheus_deadline": 60,
                **analysis,
            },
        }
    )


class CanaryAct:
    name = "canary"
    expected_successes: ClassVar[dict[str, int]] = {}
    metrics: ClassVar[tuple[str, ...]] = ("fleet_canary_deployments", "fleet_canary_decisions")

    def __init__(self, which: Callable[[str], str | None] = shutil.which) -> None:
        self.binary = which("prometheus")
        self.env: dict[str, str] = {}
        self.own: PrometheusProcess | None = None
        self.apps: ExpositionServer | None = None
        self.judged_by: str | None = None
        self.events: list[bytes] = []
        self.watching: Any = None

    def prepare(self, rt: Runtime, now: datetime) -> str:
        if rt.settings.prometheus_url is not None:
            self.judged_by = rt.settings.prometheus_url
            return f"canary: judging deployments against {self.judged_by}"
        if self.binary is None:
            return (
                "canary: analysis skipped, no FLEET_PROMETHEUS_URL and no prometheus installed "
                "(apt-get install prometheus, or set FLEET_PROMETHEUS_URL)"
            )
        from workers.ports import free_port

        latencies = {"baseline": BASELINE_LATENCY, **{job: ms for _, job, _, _, ms in DEPLOYMENTS}}
        routes = {
            job: latency_exposition(partial(float, seconds), seed)
            for seed, (job, seconds) in enumerate(latencies.items())
        }
        self.apps = ExpositionServer({**routes, **SCRAPED})
        scrape = [
            {
                "job_name": job,
                "metrics_path": f"/{job}",
                "static_configs": [{"targets": [self.apps.address]}],
            }
            for job in [*latencies, *SCRAPED]
        ]
        self.own = PrometheusProcess(
            self.binary, rt.settings.home / "prometheus", scrape, free_port()
        )
        if not self.own.wait_ready():
            tail = self.own.tail()
            self.close()
            return f"canary: analysis skipped, the demo's prometheus did not start: {tail}"
        self.judged_by = self.own.url
        _STARTED.append(self.own.url)
        self.env = {"FLEET_PROMETHEUS_URL": self.own.url}
        pubsub = rt.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
        pubsub.psubscribe(**{"config_changes:*": lambda m: self.events.append(m["data"])})
        self.watching = pubsub.run_in_thread(sleep_time=0.1, daemon=True)
        with rt.sessions.begin() as session:
            for name, job, key, value, _ in DEPLOYMENTS:
                spec = latency_canary(name, job, key, value)
                spec = spec.model_copy(update={"subset": Subset(tenants=["acme"])})
                create_deployment(session, spec, now, "fleet-demo", notify=rt.redis)
        return (
            f"canary: prometheus at {self.own.url} scrapes a baseline and two canaries; "
            f"{DEPLOYMENTS[0][0]} should be promoted, {DEPLOYMENTS[1][0]} (3x latency) rolled back"
        )

    def tick(self, rt: Runtime, now: datetime, remaining: float) -> str | None:
        return None

    def _states(self, rt: Runtime) -> dict[str, str]:
        query = select(CanaryDeployment.name, CanaryDeployment.state)
        with rt.sessions() as session:
            return dict(session.execute(query).all())

    def status(self, rt: Runtime) -> str:
        with rt.sessions() as session:
            runs = (
                session.scalar(
                    select(func.count()).select_from(TaskRun).where(TaskRun.job == "canary.analyze")
                )
                or 0
            )
        if self.judged_by is None:
            return f"canary: {runs} runs, each skipped (no Prometheus), as expected"
        states = ", ".join(f"{name}={state}" for name, state in sorted(self._states(rt).items()))
        return (
            f"canary: {runs} runs against {self.judged_by}; {states or 'no deployments'}; "
            f"{len(self.events)} change events on config_changes:*"
        )

    def problems(self, rt: Runtime) -> list[str]:
        with rt.sessions() as session:
            outcomes = dict(
                session.execute(
                    select(TaskRun.outcome, func.count())
                    .where(TaskRun.job == "canary.analyze")
                    .group_by(TaskRun.outcome)
                ).all()
            )
        if outcomes.get("failure"):
            return [f"canary: {outcomes['failure']} failed runs"]
        if not outcomes.get("success") and not outcomes.get("skipped"):
            return ["canary: canary.analyze has not run yet"]
        if self.own is not None:
            states = self._states(rt)
            wrong = [
                f"{name} is {states.get(name, 'missing')}, not yet {wanted}"
                for name, wanted in VERDICTS.items()
                if states.get(name) != wanted
            ]
            if wrong:
                return [f"canary: {'; '.join(wrong)}"]
            # start: 2 overrides; promotion: environment + override; rollback: override
            if len(self.events) < 5:
                return [f"canary: {len(self.events)} change events seen, 5 expected"]
        return []

    def close(self) -> None:
        if self.watching is not None:
            self.watching.stop()
            self.watching.join(timeout=5)
            self.watching = None
        if self.own is not None:
            self.own.close()
            _STARTED.clear()
        if self.apps is not None:
            self.apps.close()


def act() -> Any:
    return CanaryAct()
