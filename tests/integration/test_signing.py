"""Message signing: with FLEET_SIGNING_* set, only messages signed by a certificate of the
store run. A plain Celery client that knows nothing of the fleet, and one signing with a
key the store does not hold, are refused (counted, logged, never run); ``fleet enqueue``
with the fleet's key runs, and so do the messages a worker sends itself (a job sending
another, a retry)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from celery import Celery
from sqlalchemy import func, select

from tests.helpers import FleetProcess, free_port, run_fleet, wait_for
from tests.signing import make_identity
from workers.db import make_engine
from workers.db.models import TaskRun

Spawn = Callable[..., FleetProcess]


def refused(port: int, reason: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith(f'fleet_messages_refused_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def signed_env(fleet_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    key, cert = make_identity(tmp_path / "fleet", "fleet")
    store = tmp_path / "trusted"
    store.mkdir()
    shutil.copy(cert, store / "fleet.pem")
    fleet_env.update(
        FLEET_SIGNING_KEY=str(key),
        FLEET_SIGNING_CERT=str(cert),
        FLEET_SIGNING_CERT_STORE=str(store),
    )
    return fleet_env


def test_only_messages_signed_by_a_trusted_certificate_run(
    signed_env: dict[str, str], spawn: Spawn, postgres_url: str, tmp_path: Path
) -> None:
    port = free_port()
    worker = spawn("worker", "-c", "1", "--metrics-port", str(port), env=signed_env)
    wait_for(lambda: "ready" in worker.output(), timeout=60, what="the worker")
    broker = signed_env["FLEET_REDIS_URL"]

    plain = Celery(broker=broker)  # knows nothing of the fleet: JSON, unsigned
    plain.send_task("secrets.rotate", kwargs={"path": "svc/db"}, queue="secrets")
    plain.send_task("fleet.heartbeat", kwargs={}, queue="default")
    wait_for(lambda: refused(port, "unsigned") == 2, timeout=30, what="two unsigned refused")

    other_key, other_cert = make_identity(tmp_path / "other", "other")
    other_store = tmp_path / "other-store"
    other_store.mkdir()
    shutil.copy(other_cert, other_store / "other.pem")
    # In a process of its own: setup_security changes kombu's registry process-wide.
    rogue = (
        "import sys\n"
        "from celery import Celery\n"
        "key, cert, store, broker = sys.argv[1:]\n"
        "app = Celery(broker=broker)\n"
        "app.conf.update(task_serializer='auth', accept_content=['auth'], security_key=key,\n"
        "    security_certificate=cert, security_cert_store=store, security_digest='sha256')\n"
        "app.setup_security(allowed_serializers=['json'], serializer='json')\n"
        "app.send_task('fleet.heartbeat', kwargs={}, queue='default')\n"
    )
    sent = subprocess.run(
        [sys.executable, "-c", rogue, str(other_key), str(other_cert), str(other_store), broker],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: refused(port, "bad_signature") == 1, timeout=30, what="a bad signature")
    assert '"message_refused"' in worker.output() and '"task":"secrets.rotate"' in worker.output()

    done = run_fleet("enqueue", "fleet.heartbeat", "--wait", "--timeout", "60", env=signed_env)
    assert done.returncode == 0, done.stderr
    engine = make_engine(postgres_url)
    with engine.connect() as connection:
        rows = connection.execute(select(TaskRun.job, TaskRun.outcome)).all()
        assert rows == [("fleet.heartbeat", "success")]  # nothing refused ever ran
        assert connection.scalar(select(func.count()).select_from(TaskRun)) == 1
    engine.dispose()
    plain.close()


def test_a_workers_own_sends_are_signed_and_run(
    signed_env: dict[str, str], spawn: Spawn, postgres_url: str
) -> None:
    """A job that sends another (as secrets.check_rotation sends secrets.rotate) and a job
    retried (Celery sends the retry) go out signed from the worker: both run, none is
    refused."""
    signed_env["FLEET_EXTRA_JOB_MODULES"] = '["tests.jobs_for_tests"]'
    port = free_port()
    worker = spawn("worker", "-c", "1", "--metrics-port", str(port), env=signed_env)
    wait_for(lambda: "ready" in worker.output(), timeout=60, what="the worker")
    for name, *kwargs in (
        ("test.chained",),
        ("test.flaky", "--arg", "key=k", "--arg", "fail_times=1"),
    ):
        done = run_fleet("enqueue", name, *kwargs, "--wait", "--timeout", "60", env=signed_env)
        assert done.returncode == 0, done.stderr
    engine = make_engine(postgres_url)

    def runs() -> list[tuple[str, str]] | None:
        with engine.connect() as connection:
            rows = connection.execute(
                select(TaskRun.job, TaskRun.outcome).where(TaskRun.outcome == "success")
            ).all()
        found = sorted((job, outcome) for job, outcome in rows)
        return found if len(found) == 3 else None

    try:
        assert wait_for(runs, timeout=60, what="the chained heartbeat") == [
            ("fleet.heartbeat", "success"),
            ("test.chained", "success"),
            ("test.flaky", "success"),
        ]
    finally:
        engine.dispose()
    assert refused(port, "unsigned") == refused(port, "bad_signature") == 0
    assert '"message_refused"' not in worker.output()


def test_signing_needs_all_three_settings(fleet_env: dict[str, str], tmp_path: Path) -> None:
    key, _ = make_identity(tmp_path / "fleet", "fleet")
    fleet_env["FLEET_SIGNING_KEY"] = str(key)
    done = run_fleet("enqueue", "fleet.heartbeat", env=fleet_env)
    assert done.returncode == 2
    assert done.stderr.startswith("fleet: error: message signing needs FLEET_SIGNING_KEY")
    assert "FLEET_SIGNING_CERT, FLEET_SIGNING_CERT_STORE missing" in done.stderr
