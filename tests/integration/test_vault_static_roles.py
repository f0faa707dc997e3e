"""Vault's own database rotations, watched by secrets.check_rotation, end to end: OpenBao's
built-in PostgreSQL plugin rotates a static role of a PostgreSQL cluster of the test's own
(scram-sha-256, so a password that does not work is refused); the fleet reads the role under
the shipped least-privilege policy and sees it ``ok``; the cluster's admin password is
changed behind Vault's back, Vault's rotations fail (silently, but for its log), and the
role is ``overdue`` once its period and grace have passed (injected clock); fixed, Vault
rotates again and the role is ``ok``. Through the fleet's job: stored, audited, exported,
never sent to secrets.rotate, and a mount that is missing or refused is one ``error`` while
the run goes on."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions
import psycopg
import pytest
from celery import Celery
from sqlalchemy import select

from tasks.secrets import _enqueue_rotations
from tasks.secrets.vault_database import (
    GRACE_FLOOR,
    LATE_AFTER,
    static_role_status,
    static_role_statuses,
)
from tests.helpers import fleet_gauge, wait_for
from tests.openbao_server import POLICY, OpenBao
from tests.password_cluster import SUPERUSER_PASSWORD, Cluster, password_cluster
from workers.celery_app import create_app
from workers.db.models import FleetAuditLog, SecretRotationStatus
from workers.runtime import Runtime, install
from workers.settings import FleetSettings

# The shipped policy's blocks for the database engine's default mount, ``database``.
DATABASE_BLOCKS = re.compile(r'path "database/static-roles[^"]*" \{[^}]*\}\n')
PERIOD = 5  # seconds: the shortest OpenBao accepts (checked below)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A cluster of each test's own: one of them changes its admin password."""
    with password_cluster() as running:
        yield running


def new_mount(openbao: OpenBao, kind: str = "database") -> str:
    mount = f"db-{uuid.uuid4().hex[:8]}"
    openbao.api("POST", f"sys/mounts/{mount}", json={"type": kind})
    return mount


@pytest.fixture
def mount(openbao: OpenBao, cluster: Cluster) -> Iterator[str]:
    """A database secrets engine of the test's own, connected to ``cluster`` as its
    superuser (the password Vault keeps; the URL only templates it)."""
    name = new_mount(openbao)
    openbao.api(
        "POST",
        f"{name}/config/pg",
        json={
            "plugin_name": "postgresql-database-plugin",
            "connection_url": (
                f"postgresql://{{{{username}}}}:{{{{password}}}}@{cluster.host}:{cluster.port}"
                "/postgres"
            ),
            "username": "postgres",
            "password": SUPERUSER_PASSWORD,
            "verify_connection": True,
            "allowed_roles": ["*"],
        },
    )
    yield name
    openbao.api("DELETE", f"sys/mounts/{name}")  # stops its rotations before the cluster goes


def static_role(openbao: OpenBao, cluster: Cluster, mount: str, period: int) -> dict[str, str]:
    """A login role in the cluster, handed to Vault as a static role (Vault rotates its
    password at once, then every ``period`` seconds)."""
    name = f"app_{uuid.uuid4().hex[:8]}"
    initial = f"initial-{uuid.uuid4().hex}"
    with cluster.admin() as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{initial}'")
    openbao.api(
        "POST",
        f"{mount}/static-roles/{name}",
        json={"db_name": "pg", "username": name, "rotation_period": period},
    )
    return {"name": name, "initial": initial}


def fleet_token(openbao: OpenBao, prefix: str, mounts: list[str]) -> str:
    """A token holding only the shipped policy: its KV paths moved to ``prefix``, its
    database blocks repeated for each of ``mounts``."""
    text = POLICY.read_text()
    blocks = "".join(DATABASE_BLOCKS.findall(text))
    assert blocks.count("path ") == 2, "the shipped policy lost its static-roles blocks"
    moved = "".join(blocks.replace('"database/', f'"{m}/') for m in mounts)
    return openbao.policy_for(prefix, DATABASE_BLOCKS.sub("", text) + moved)


def vault_client(openbao: OpenBao, token: str) -> Any:
    return hvac.Client(url=openbao.url, token=token, timeout=10)


def last_rotation(openbao: OpenBao, mount: str, name: str) -> str:
    return str(openbao.api("GET", f"{mount}/static-roles/{name}")["data"]["last_vault_rotation"])


def current_password(openbao: OpenBao, mount: str, name: str) -> tuple[str, str]:
    """What Vault hands out, and when it was rotated (root: the fleet's token may not read
    static-creds)."""
    data = openbao.api("GET", f"{mount}/static-creds/{name}")["data"]
    return str(data["password"]), str(data["last_vault_rotation"])


def vaults_password_works(openbao: OpenBao, cluster: Cluster, mount: str, name: str) -> str:
    """Log in with the password Vault hands out; returns it. Vault rotates every few
    seconds here: a password refused because Vault rotated meanwhile is read again."""
    for _ in range(3):
        password, rotated = current_password(openbao, mount, name)
        if cluster.logs_in(name, password):
            return password
        if last_rotation(openbao, mount, name) == rotated:
            break
    pytest.fail(f"the password Vault hands out for {name} does not log in", pytrace=False)


def failed_rotations(openbao: OpenBao, name: str) -> int:
    """Vault's only sign of a failed rotation: an ERROR line in its log."""
    log = openbao.log.read_text(errors="replace")
    return len(re.findall(rf"unable to rotate credentials.*role={name}\b", log))


def test_openbao_rotates_the_role_and_a_stall_becomes_overdue(
    openbao: OpenBao, cluster: Cluster, mount: str
) -> None:
    with pytest.raises(httpx.HTTPStatusError) as refused:  # OpenBao's shortest period
        openbao.api(
            "POST",
            f"{mount}/static-roles/too-fast",
            json={"db_name": "pg", "username": "postgres", "rotation_period": PERIOD - 1},
        )
    assert refused.value.response.status_code == 400
    assert "rotation_period must be 5 seconds or more" in refused.value.response.text
    role = static_role(openbao, cluster, mount, PERIOD)
    name, path = role["name"], f"{mount}/static-roles/{role['name']}"
    client = vault_client(openbao, fleet_token(openbao, openbao.prefix(), [mount]))

    [found] = static_role_statuses(client, [mount], datetime.now(UTC))
    assert (found.path, found.status, found.rotator) == (path, "ok", None), found.reason
    # Vault really rotated it: on creation, then every period.
    first = vaults_password_works(openbao, cluster, mount, name)
    assert first != role["initial"] and not cluster.logs_in(name, role["initial"])
    rotated_at = last_rotation(openbao, mount, name)
    wait_for(
        lambda: last_rotation(openbao, mount, name) != rotated_at,
        timeout=30,
        interval=0.2,
        what="OpenBao's periodic rotation",
    )
    assert vaults_password_works(openbao, cluster, mount, name) != first
    with pytest.raises(hvac.exceptions.Forbidden):  # the fleet cannot read the password
        client.secrets.database.get_static_credentials(name, mount_point=mount)

    # Break it: the admin password changes behind Vault's back, its connections are cut.
    failures = failed_rotations(openbao, name)
    with cluster.admin() as admin:
        admin.execute("ALTER ROLE postgres PASSWORD 'changed-behind-vaults-back-1'")
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
    wait_for(
        lambda: failed_rotations(openbao, name) > failures,
        timeout=30,
        interval=0.2,
        what=f"OpenBao to log a failed rotation of {name}",
    )
    stalled_at = last_rotation(openbao, mount, name)  # and it no longer moves
    vaults_password_works(openbao, cluster, mount, name)  # a failed rotation changed nothing
    [now] = static_role_statuses(client, [mount], datetime.now(UTC))
    assert now.version_created is not None
    assert now.status == "ok"  # late by less than a minute: Vault may still be ticking
    assert now.notify_at == now.version_created + timedelta(seconds=PERIOD) + LATE_AFTER
    assert now.due_at == now.version_created + timedelta(seconds=PERIOD) + GRACE_FLOOR
    [late] = static_role_statuses(client, [mount], now.notify_at)
    assert late.status == "due_soon"
    [stalled] = static_role_statuses(client, [mount], now.due_at)
    assert (stalled.path, stalled.status) == (path, "overdue")
    assert stalled.reason is not None and "Vault has not rotated it since" in stalled.reason
    assert stalled.version_created == now.version_created  # read again: still no rotation

    # Fixed: Vault retries (every 10 s after a failure) and the role is ok again.
    with psycopg.connect(
        host=cluster.host,
        port=cluster.port,
        dbname="postgres",
        user="postgres",
        password="changed-behind-vaults-back-1",
        autocommit=True,
    ) as admin:
        admin.execute(f"ALTER ROLE postgres PASSWORD '{SUPERUSER_PASSWORD}'")
    wait_for(
        lambda: last_rotation(openbao, mount, name) != stalled_at,
        timeout=40,
        interval=0.2,
        what="OpenBao to rotate again once its connection works",
    )
    [again] = static_role_statuses(client, [mount], datetime.now(UTC))
    assert again.status == "ok"
    vaults_password_works(openbao, cluster, mount, name)


@pytest.fixture
def app_on_openbao(
    postgres_url: str, redis_url: str, tmp_path: Path, openbao: OpenBao, mount: str
) -> Iterator[tuple[Celery, dict[str, str]]]:
    """The fleet on OpenBao with four database mounts configured: ``mount`` (a role in it),
    an empty database engine, a mount that does not exist and one the policy does not
    cover; the token holds the shipped policy for the first three."""
    empty, missing = new_mount(openbao), f"db-missing-{uuid.uuid4().hex[:6]}"
    forbidden = f"db-forbidden-{uuid.uuid4().hex[:6]}"
    prefix = openbao.prefix()
    settings = FleetSettings(
        home=tmp_path,
        database_url=postgres_url,
        redis_url=redis_url,
        vault_addr=openbao.url,
        vault_token=fleet_token(openbao, prefix, [mount, empty, missing]),
        vault_path_prefix=prefix,
        vault_database_mounts=[mount, empty, missing, forbidden],
    )
    rt = install(Runtime(settings))
    application = create_app(rt)
    try:
        yield application, {"empty": empty, "missing": missing, "forbidden": forbidden}
    finally:
        application.close()
        rt.close()
        openbao.api("DELETE", f"sys/mounts/{empty}")


def test_check_rotation_stores_exports_and_never_rotates_static_roles(
    app_on_openbao: tuple[Celery, dict[str, str]],
    openbao: OpenBao,
    cluster: Cluster,
    mount: str,
) -> None:
    app, other = app_on_openbao
    role = static_role(openbao, cluster, mount, 3600)
    path = f"{mount}/static-roles/{role['name']}"
    password, _ = current_password(openbao, mount, role["name"])

    result = app.tasks["secrets.check_rotation"].apply()
    assert result.successful(), result.result
    report = result.result
    assert {s["path"]: s["status"] for s in report["secrets"]} == {
        path: "ok",
        f"{other['missing']}/static-roles": "error",
        f"{other['forbidden']}/static-roles": "error",
    }  # and nothing for the empty engine
    reasons = {s["path"]: s["reason"] for s in report["secrets"]}
    assert reasons[f"{other['missing']}/static-roles"] == (
        f"vault: list {other['missing']}/static-roles: "
        f"no database secrets engine at {other['missing']}/ (404)"
    )
    assert reasons[f"{other['forbidden']}/static-roles"].endswith("permission denied (403)")
    assert report["store_up"] is True and report["rotations_enqueued"] == []
    assert password not in str(report)

    rt: Runtime = app.fleet_runtime
    with rt.sessions() as session:
        row = session.get(SecretRotationStatus, path)
        changes = session.scalars(
            select(FleetAuditLog.subject).where(FleetAuditLog.action == "secret_status_changed")
        ).all()
    assert row is not None and row.version is None and row.rotator is None
    assert row.version_created is not None and row.due_at is not None
    assert row.due_at == row.version_created + timedelta(hours=1) + GRACE_FLOOR
    assert sorted(changes) == sorted(s["path"] for s in report["secrets"])
    age = fleet_gauge(rt.sessions, "fleet_secret_age_seconds", {"path": path})
    assert age is not None and 0 <= age < 120
    due = fleet_gauge(rt.sessions, "fleet_secret_rotation_due_timestamp_seconds", {"path": path})
    assert due == row.due_at.timestamp()
    assert fleet_gauge(rt.sessions, "fleet_secrets", {"status": "error"}) == 2
    assert fleet_gauge(rt.sessions, "fleet_secrets", {"status": "ok"}) == 1

    # Late or overdue, it is still Vault's to rotate: nothing is sent to secrets.rotate.
    data = openbao.api("GET", f"{mount}/static-roles/{role['name']}")["data"]
    late = static_role_status(mount, role["name"], data, row.notify_at)  # type: ignore[arg-type]
    stalled = static_role_status(mount, role["name"], data, row.due_at)
    assert (late.status, stalled.status) == ("due_soon", "overdue")
    assert _enqueue_rotations(rt, [late, stalled]) == []
    assert rt.redis.llen("secrets") == 0
