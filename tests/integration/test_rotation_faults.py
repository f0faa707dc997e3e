"""secrets.rotate when a step takes effect and its answer never comes back, when the worker
is killed right after a step, when no password logs in any more, and rotation on time.

Faults after the effect are real: a TCP proxy (tests/cutting_proxy.py) between the fleet
and the server forwards the request, waits for the server to act, and cuts the connection
before the answer. After every fault, and after the next run, the stored current password
logs in and nothing is left pending."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.engine import make_url

from tasks.secrets.rotate import STAGING, STUCK, PostgresRotator, RotationFailed, RotationStuck
from tasks.secrets.stores import SecretStore, SqlStore, VaultStore, load_or_create_key
from tests.cutting_proxy import CuttingProxy, cutting_proxy
from tests.helpers import ROOT, run_fleet
from tests.openbao_server import OpenBao
from tests.password_cluster import Cluster
from tests.secrets_app import backdate, new_role, put, run, runtime_of, secrets_app, store_of
from workers.db import make_engine
from workers.db.models import FleetAuditLog, SecretRotationStatus
from workers.settings import FleetSettings

PATH = "db/app"


@pytest.fixture
def app(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Celery]:
    with secrets_app(postgres_url, redis_url, tmp_path) as application:
        yield application


def settled(store: SecretStore, cluster: Cluster, role: dict[str, str]) -> str:
    """The invariant: the stored current password logs in (and, alternating, the other
    role's recorded one too), and nothing is pending. Returns the stored password."""
    stored = store.read(PATH)
    assert cluster.logs_in(stored["username"], stored["password"])
    if "alternate_username" in stored:
        assert cluster.logs_in(stored["alternate_username"], stored["alternate_password"])
    assert STAGING + PATH not in store.list_paths()
    return stored["password"]


class Steps:
    """An audit callback that records events and arms a proxy once a step succeeded."""

    def __init__(
        self, proxy: CuttingProxy | None = None, arm_after: str = "", trigger: bytes = b""
    ):
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.proxy, self.arm_after, self.trigger = proxy, arm_after, trigger

    def __call__(self, action: str, _subject: str, **details: Any) -> None:
        self.events.append((action, details))
        if (
            self.proxy
            and action == "secret_rotation_step"
            and details
            == {
                "step": self.arm_after,
                "ok": True,
                "base_version": details.get("base_version"),
            }
        ):
            self.proxy.arm(self.trigger)

    def failed(self) -> list[str]:
        return [d["step"] for a, d in self.events if a == "secret_rotation_step" and not d["ok"]]


# ALTER ROLE ran, the answer was lost ---------------------------------------------------------


@pytest.mark.parametrize("rotator", ["postgres", "postgres-alternating"])
def test_a_password_change_whose_answer_is_lost_is_finished_forward(
    app: Celery, role: dict[str, str], cluster: Cluster, rotator: str
) -> None:
    with cutting_proxy((cluster.host, cluster.port), b"ALTER ROLE") as proxy:
        proxied = {**role, "host": "127.0.0.1", "port": str(proxy.port)}
        changed = role
        if rotator == "postgres-alternating":
            changed = new_role(cluster)
            proxied |= {
                "alternate_username": changed["username"],
                "alternate_password": changed["password"],
            }
        put(app, PATH, proxied, rotation_interval_days="30", rotator=rotator)
        steps = Steps()
        alternating = rotator == "postgres-alternating"
        rotated = PostgresRotator(store_of(app), steps, alternating=alternating).rotate(PATH)
        assert proxy.cuts == 1
        assert steps.failed() == ["set"]  # it looked like a failure...
        assert rotated.outcome == "rotated" and rotated.version == 2  # ...and was not one
        new = settled(store_of(app), cluster, role)
        assert new != changed["password"]
        assert not cluster.logs_in(changed["username"], changed["password"])
        assert ("secret_rotation_resumed", {"password_of": "pending"}) in steps.events
        again = run(app, "secrets.rotate", path=PATH)  # the next run rotates cleanly
        assert again.successful() and again.result["version"] == 3
        settled(store_of(app), cluster, role)


# The store applied the write, the answer was lost ---------------------------------------------


def proxied_sql_store(app: Celery, proxy_port: int) -> SqlStore:
    """The app's embedded store, its database reached through the proxy."""
    settings = runtime_of(app).settings
    url = make_url(settings.database_url or "").set(host="127.0.0.1", port=proxy_port)
    engine = make_engine(url.render_as_string(hide_password=False))
    return SqlStore(engine, load_or_create_key(settings), settings.vault_path_prefix)


def database_address(app: Celery) -> tuple[str, int]:
    url = make_url(runtime_of(app).settings.database_url or "")
    return (url.host or "127.0.0.1", url.port or 5432)


@pytest.mark.parametrize("step", ["create", "finish"])
def test_an_embedded_store_write_whose_answer_is_lost(
    app: Celery, role: dict[str, str], cluster: Cluster, step: str
) -> None:
    """The store's COMMIT reaches PostgreSQL and commits; the answer never comes back."""
    put(app, PATH, role, rotation_interval_days="30", rotator="postgres")
    with cutting_proxy(database_address(app), b"COMMIT", times=0) as proxy:
        store = proxied_sql_store(app, proxy.port)
        if step == "create":
            proxy.arm(b"COMMIT")
            steps = Steps()
        else:
            steps = Steps(proxy, arm_after="test", trigger=b"COMMIT")
        rotator = PostgresRotator(store, steps)
        if step == "create":
            with pytest.raises(RotationFailed, match="step create"):
                rotator.rotate(PATH)
        else:
            assert rotator.rotate(PATH).version == 2  # read back: it was applied
        assert proxy.cuts == 1 and steps.failed() == [step]
    stored = settled(store_of(app), cluster, role)
    assert (stored == role["password"]) == (step == "create")
    assert run(app, "secrets.rotate", path=PATH).successful()
    settled(store_of(app), cluster, role)


def test_a_vault_write_whose_answer_is_lost_is_read_back(
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
    role: dict[str, str],
    cluster: Cluster,
    openbao: OpenBao,
) -> None:
    prefix = openbao.prefix()
    openbao.api("POST", f"secret/data/{prefix}/{PATH}", json={"data": role})
    custom = {"rotation_interval_days": "30", "rotator": "postgres"}
    openbao.api("POST", f"secret/metadata/{prefix}/{PATH}", json={"custom_metadata": custom})
    address = openbao.url.removeprefix("http://").split(":")
    with cutting_proxy((address[0], int(address[1])), b"", times=0) as proxy:
        settings = FleetSettings(
            home=tmp_path,
            vault_addr=f"http://127.0.0.1:{proxy.port}",
            vault_token=openbao.policy_for(prefix),
            vault_path_prefix=prefix,
        )
        store = VaultStore(settings)
        trigger = f"POST /v1/secret/data/{prefix}/{PATH} ".encode()
        steps = Steps(proxy, arm_after="test", trigger=trigger)
        rotated = PostgresRotator(store, steps).rotate(PATH)
        assert proxy.cuts == 1 and steps.failed() == ["finish"]
        assert rotated.version == 2
        assert settled(store, cluster, role) != role["password"]
        assert PostgresRotator(store, Steps()).rotate(PATH).version == 3
        settled(store, cluster, role)


# SIGKILL right after each step ----------------------------------------------------------------

KILLER = """
import os, signal, sys
from tasks.secrets.rotate import PostgresRotator
from tasks.secrets.stores import open_store
from workers.runtime import Runtime
from workers.settings import load_settings

step = sys.argv[1]
rt = Runtime(load_settings())

def audit(action, subject, **details):
    if action == "secret_rotation_step" and details["step"] == step and details["ok"]:
        os.kill(os.getpid(), signal.SIGKILL)

PostgresRotator(open_store(rt.settings, rt.engine), audit).rotate("db/app")
"""


@pytest.mark.parametrize("step", ["create", "set", "test", "finish"])
def test_a_worker_killed_right_after_a_step(
    app: Celery, role: dict[str, str], cluster: Cluster, step: str
) -> None:
    put(app, PATH, role, rotation_interval_days="30", rotator="postgres")
    settings = runtime_of(app).settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_HOME=str(settings.home),
        FLEET_DATABASE_URL=settings.database_url or "",
        FLEET_REDIS_URL=settings.redis_url or "",
        PYTHONPATH=str(ROOT),
    )
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, step], env=env, capture_output=True, timeout=60
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    result = run(app, "secrets.rotate", path=PATH)
    assert result.successful(), result.result
    stored = settled(store_of(app), cluster, role)
    assert stored != role["password"]
    # Killed before the role changed: undone, then rotated anew. After: finished (resumed).
    expected = "undone_then_rotated" if step == "create" else "resumed"
    assert result.result["outcome"] == expected


# Stuck: no password logs in -------------------------------------------------------------------


def test_a_rotation_where_no_password_logs_in_is_stuck_until_a_person_looks(
    app: Celery, role: dict[str, str], cluster: Cluster
) -> None:
    put(app, PATH, role, days=26, rotation_interval_days="30", rotator="postgres")
    with cluster.admin() as admin:  # someone changes the password outside the fleet
        admin.execute(f"ALTER ROLE {role['username']} PASSWORD 'changed-by-hand-0001'")
    before = (
        REGISTRY.get_sample_value(
            "fleet_secret_rotations_total", {"outcome": "stuck", "step": "settle"}
        )
        or 0
    )
    first = run(app, "secrets.rotate", path=PATH)  # set fails; settling finds nothing works
    assert isinstance(first.result, RotationStuck) and "stuck" in str(first.result)
    steps_before = audit_actions(app).count("secret_rotation_step")
    again = run(app, "secrets.rotate", path=PATH)  # marked: no step, no login is tried
    assert isinstance(again.result, RotationStuck)
    assert audit_actions(app).count("secret_rotation_step") == steps_before
    stuck_count = REGISTRY.get_sample_value(
        "fleet_secret_rotations_total", {"outcome": "stuck", "step": "settle"}
    )
    assert stuck_count == before + 2
    assert store_of(app).read(STAGING + PATH)[STUCK].startswith("stuck")
    check = run(app, "secrets.check_rotation").result
    status = {s["path"]: s for s in check["secrets"]}[PATH]
    assert status["status"] == "error" and status["reason"].startswith("stuck")
    assert check["rotations_enqueued"] == []  # never looping
    with runtime_of(app).sessions() as session:
        row = session.get(SecretRotationStatus, PATH)
        assert row is not None and row.status == "error"
    assert "secret_rotation_stuck" in audit_actions(app)
    # A person: unstick refuses while the stored password does not log in...
    env = fleet_env_of(app)
    refused = run_fleet("secrets", "unstick", PATH, env=env)
    assert refused.returncode == 1 and "does not log in" in refused.stderr
    # ...and clears the rotation once it does; rotations resume.
    with cluster.admin() as admin:
        admin.execute(f"ALTER ROLE {role['username']} PASSWORD '{role['password']}'")
    cleared = run_fleet("secrets", "unstick", PATH, env=env)
    assert cleared.returncode == 0, cleared.stderr
    assert run(app, "secrets.rotate", path=PATH).successful()
    settled(store_of(app), cluster, role)


def audit_actions(app: Celery) -> list[str]:
    with runtime_of(app).sessions() as session:
        return list(session.scalars(select(FleetAuditLog.action).order_by(FleetAuditLog.id)))


def fleet_env_of(app: Celery) -> dict[str, str]:
    settings = runtime_of(app).settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_HOME=str(settings.home),
        FLEET_DATABASE_URL=settings.database_url or "",
        FLEET_REDIS_URL=settings.redis_url or "",
        FLEET_CONFIG_DIR=str(settings.configuration_dir),
        PYTHONPATH=str(ROOT),
    )
    return env


# On time: a healthy rotation never shows overdue ----------------------------------------------


def test_rotation_starts_in_the_notify_window_so_a_healthy_one_is_never_overdue(
    app: Celery, role: dict[str, str], cluster: Cluster
) -> None:
    """The secret's age moves (its version is backdated, the clock as the store sees it):
    ok, then due_soon, which sends it to rotation; rotated, it is ok again."""
    put(app, PATH, role, rotation_interval_days="30", notify_days="7", rotator="postgres")
    seen = []
    for days in (20, 24):
        backdate(app, PATH, days)
        check = run(app, "secrets.check_rotation").result
        seen.append(
            ({s["path"]: s["status"] for s in check["secrets"]}[PATH], check["rotations_enqueued"])
        )
    assert seen == [("ok", []), ("due_soon", [PATH])]
    assert run(app, "secrets.rotate", path=PATH).result["outcome"] == "rotated"
    check = run(app, "secrets.check_rotation").result
    assert {s["path"]: s["status"] for s in check["secrets"]}[PATH] == "ok"
    settled(store_of(app), cluster, role)


# Alternating users: the credential clients hold keeps working -------------------------------


class Client:
    """A client of the secret: it reads the secret, then opens a connection, queries and
    closes it, again and again (a pool that re-reads the secret whenever it reconnects);
    and one long-lived connection opened at the start keeps querying throughout."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store
        self.logins = 0
        self.failures: list[str] = []
        self.done = threading.Event()
        self.progress = threading.Condition()
        first = store.read(PATH)
        self.held = psycopg.connect(**conninfo(first), autocommit=True)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            creds = self.store.read(PATH)
            try:
                with psycopg.connect(**conninfo(creds)) as connection:
                    connection.execute("SELECT 1")
                self.held.execute("SELECT 1")
            except psycopg.Error as exc:
                self.failures.append(f"{creds['username']}: {type(exc).__name__}")
            with self.progress:
                self.logins += 1
                self.progress.notify_all()

    def wait_logins(self, count: int) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: self.logins >= count, timeout=60)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)
        self.held.close()


def conninfo(creds: dict[str, str]) -> dict[str, Any]:
    return {
        "host": creds["host"],
        "port": int(creds["port"]),
        "dbname": creds["database"],
        "user": creds["username"],
        "password": creds["password"],
        "connect_timeout": 5,
    }


def test_alternating_users_rotate_three_times_under_a_querying_client_with_no_failed_login(
    app: Celery, role: dict[str, str], cluster: Cluster
) -> None:
    other = new_role(cluster)
    pair = {
        **role,
        "alternate_username": other["username"],
        "alternate_password": other["password"],
    }
    put(app, PATH, pair, rotation_interval_days="30", rotator="postgres-alternating")
    client = Client(store_of(app))
    users = []
    try:
        for rotation in range(3):
            client.wait_logins(client.logins + 20)  # the client is busy before each rotation
            before = store_of(app).read(PATH)
            result = run(app, "secrets.rotate", path=PATH)
            assert result.successful(), result.result
            after = store_of(app).read(PATH)
            users.append(after["username"])
            # The role in use was not touched: its password still logs in.
            assert cluster.logs_in(before["username"], before["password"]), rotation
            assert after["alternate_password"] == before["password"]
        client.wait_logins(client.logins + 20)
    finally:
        client.stop()
    assert client.failures == []
    assert users == [other["username"], role["username"], other["username"]]
    assert client.logins >= 80
    settled(store_of(app), cluster, role)
