"""secrets.check_rotation and secrets.rotate against real services: statuses and their
audit trail, a store that is down, rotations of a real PostgreSQL role (a throwaway cluster
that checks passwords) with a failure injected at every step, crashes resumed or undone,
and no secret value anywhere it should not be."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from celery import Celery
from prometheus_client import REGISTRY, generate_latest
from sqlalchemy import select, text

from tasks.secrets.rotate import STAGING, PostgresRotator, RotationFailed
from tasks.secrets.stores import SecretStore, StoreUnavailable, VaultStore
from tests.helpers import fleet_gauge
from tests.openbao_server import POLICY, OpenBao
from tests.password_cluster import Cluster
from tests.secrets_app import put, run, runtime_of, secrets_app, store_of, stored_password
from workers.celery_app import create_app
from workers.db.models import FleetAuditLog, SecretRotationStatus, TaskRun
from workers.logs import configure_logging
from workers.runtime import Runtime, install
from workers.settings import FleetSettings


@pytest.fixture
def app(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Celery]:
    with secrets_app(postgres_url, redis_url, tmp_path) as application:
        yield application


def test_check_rotation_sees_every_status_and_records_changes(
    app: Celery, role: dict[str, str]
) -> None:
    put(app, "db/app", role, days=40, rotation_interval_days="30", rotator="postgres")
    put(app, "apis/openai", {"api_key": "sk-1234567890"})
    put(app, "svc/ftp", {"password": "ftp-pass-1"}, rotator="ftp")
    put(app, "svc/reports", {"password": "rep-pass-1"}, days=25)
    put(app, "svc/broken", {"password": "brk-pass-1"}, rotation_interval_days="soon")
    first = run(app, "secrets.check_rotation").result
    statuses = {s["path"]: s["status"] for s in first["secrets"]}
    assert statuses == {
        "db/app": "overdue",
        "apis/openai": "unmanaged",
        "svc/ftp": "error",
        "svc/reports": "due_soon",
        "svc/broken": "error",
    }
    reasons = {s["path"]: s["reason"] for s in first["secrets"]}
    assert reasons["svc/ftp"] == "unknown rotator 'ftp' (known: postgres, postgres-alternating)"
    assert "rotation_interval_days='soon'" in reasons["svc/broken"]
    assert first["rotations_enqueued"] == ["db/app"]
    assert first["counts"] == {"due_soon": 1, "error": 2, "overdue": 1, "unmanaged": 1}
    rt = runtime_of(app)
    queued = [json.loads(m) for m in rt.redis.lrange("secrets", 0, -1)]
    assert [m["headers"]["task"] for m in queued] == ["secrets.rotate"]

    second = run(app, "secrets.check_rotation").result
    assert (second["status_changes"], second["rotations_enqueued"]) == (0, [])
    with rt.sessions() as session:
        changes = session.scalars(
            select(FleetAuditLog).where(FleetAuditLog.action == "secret_status_changed")
        ).all()
        snapshot = {r.path: r for r in session.scalars(select(SecretRotationStatus))}
    assert len(changes) == 5
    assert snapshot["db/app"].due_at is not None and snapshot["db/app"].rotator == "postgres"
    assert fleet_gauge(rt.sessions, "fleet_secrets", {"status": "error"}) == 2
    assert fleet_gauge(rt.sessions, "fleet_secret_store_up") == 1
    age = fleet_gauge(rt.sessions, "fleet_secret_age_seconds", {"path": "db/app"})
    assert age is not None and 40 * 86400 - 60 < age < 40 * 86400 + 60


def test_a_secret_deleted_or_no_longer_managed_stops_alerting(app: Celery) -> None:
    """Both were overdue; then one is deleted and the other loses its rotation settings.
    Their due dates must not stay behind in the metrics (the overdue alert would never
    resolve): the exporter stops serving a deleted secret and an unmanaged one's due date."""
    due, age = "fleet_secret_rotation_due_timestamp_seconds", "fleet_secret_age_seconds"
    sessions = runtime_of(app).sessions
    put(app, "svc/retired", {"password": "ret-pass-1"}, days=40)
    put(app, "db/old", {"password": "old-pass-1"}, days=40, rotation_interval_days="30")
    first = run(app, "secrets.check_rotation").result
    assert {s["path"]: s["status"] for s in first["secrets"]} == {
        "svc/retired": "overdue",
        "db/old": "overdue",
    }
    for path in ("svc/retired", "db/old"):
        overdue = fleet_gauge(sessions, due, {"path": path})
        assert overdue is not None and overdue < datetime.now(UTC).timestamp()
    store = store_of(app)
    store.delete("svc/retired")
    store.set_custom_metadata("db/old", {})
    second = run(app, "secrets.check_rotation").result
    assert {s["path"]: s["status"] for s in second["secrets"]} == {"db/old": "unmanaged"}
    assert fleet_gauge(sessions, due, {"path": "svc/retired"}) is None
    assert fleet_gauge(sessions, age, {"path": "svc/retired"}) is None
    assert fleet_gauge(sessions, due, {"path": "db/old"}) is None
    still = fleet_gauge(sessions, age, {"path": "db/old"})
    assert still is not None and 40 * 86400 - 60 < still < 40 * 86400 + 60


def test_a_store_that_is_down_is_reported_without_a_traceback(
    postgres_url: str, redis_url: str, tmp_path: Path, openbao: OpenBao
) -> None:
    with openbao_app(postgres_url, redis_url, tmp_path, openbao) as (application, _prefix):
        rt = runtime_of(application)
        openbao.seal()
        try:
            result = application.tasks["secrets.check_rotation"].apply()
        finally:
            openbao.unseal()
        assert result.successful()
        assert result.result["store_up"] is False and result.result["secrets"] == []
        assert "Vault is sealed" in result.result["error"]
        assert fleet_gauge(rt.sessions, "fleet_secret_store_up") == 0
        assert application.tasks["secrets.check_rotation"].apply().result["store_up"] is True
        assert fleet_gauge(rt.sessions, "fleet_secret_store_up") == 1


def test_a_rotation_changes_the_role_and_the_store_together(
    app: Celery, role: dict[str, str], cluster: Cluster
) -> None:
    put(app, "db/app", role, rotation_interval_days="30", rotator="postgres")
    result = run(app, "secrets.rotate", path="db/app")
    assert result.successful(), result.result
    assert result.result == {"path": "db/app", "version": 2, "outcome": "rotated"}
    new = stored_password(app)
    assert new != role["password"] and len(new) >= 32
    assert cluster.logs_in(role["username"], new)
    assert not cluster.logs_in(role["username"], role["password"])
    assert STAGING + "db/app" not in store_of(app).list_paths()
    with runtime_of(app).sessions() as session:
        steps = session.scalars(
            select(FleetAuditLog.metadata_)
            .where(FleetAuditLog.action == "secret_rotation_step")
            .order_by(FleetAuditLog.id)
        ).all()
    assert [(s["step"], s["ok"]) for s in steps] == [
        ("create", True),
        ("set", True),
        ("test", True),
        ("finish", True),
    ]


class FailingStore:
    """The real store, failing writes to the chosen path (a store write that fails)."""

    def __init__(self, inner: SecretStore, fail_path: str) -> None:
        self.inner = inner
        self.fail_path = fail_path
        self.name = inner.name

    def write(self, path: str, data: Any, cas: int | None = None) -> int:
        if path == self.fail_path:
            raise StoreUnavailable("injected: store write failed")
        return self.inner.write(path, data, cas)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def refusing(new_password_of: dict[str, str], alter: bool = False, login: bool = False) -> Any:
    """psycopg.connect, except that ALTER ROLE fails or the new password cannot log in."""

    def connect(**kwargs: Any) -> Any:
        if (
            login
            and not kwargs.get("autocommit")
            and kwargs["password"] == new_password_of.get("p")
        ):
            raise psycopg.OperationalError("injected: password authentication failed")
        connection = psycopg.connect(**kwargs)
        if alter and kwargs.get("autocommit"):
            connection.close()
            raise psycopg.errors.InsufficientPrivilege("injected: permission denied")
        return connection

    return connect


@pytest.mark.parametrize("step", ["create", "set", "test", "finish"])
def test_a_failure_at_any_step_leaves_one_working_password(
    app: Celery, role: dict[str, str], cluster: Cluster, step: str
) -> None:
    put(app, "db/app", role, rotation_interval_days="30", rotator="postgres")
    events: list[tuple[str, dict[str, Any]]] = []
    seen: dict[str, str] = {}

    def audit(action: str, _subject: str, **details: Any) -> None:
        events.append((action, details))

    real = store_of(app)
    store: Any = real
    connect: Any = psycopg.connect
    if step == "create":
        store = FailingStore(real, STAGING + "db/app")
    elif step == "finish":
        store = FailingStore(real, "db/app")
    elif step == "set":
        connect = refusing(seen, alter=True)
    else:
        connect = refusing(seen, login=True)
    import tasks.secrets.rotate as rotate_module

    original = rotate_module.new_password

    def remembered() -> str:
        seen["p"] = original()
        return seen["p"]

    rotate_module.new_password = remembered
    try:
        with pytest.raises(RotationFailed, match=f"step {step}"):
            PostgresRotator(store, audit, connect).rotate("db/app")
    finally:
        rotate_module.new_password = original
    # The invariant: the store's password is the role's. The pending entry goes once that
    # is known; a store that cannot be written at finish cannot show what it did, so the
    # entry stays for the next run to settle.
    assert stored_password(app) == role["password"]
    assert cluster.logs_in(role["username"], role["password"])
    assert not cluster.logs_in(role["username"], seen["p"])
    assert (STAGING + "db/app" in real.list_paths()) == (step == "finish")
    failed = [d for a, d in events if a == "secret_rotation_step" and not d["ok"]]
    assert [d["step"] for d in failed] == [step]
    rolled_back = [a for a, _ in events if a == "secret_rotation_rolled_back"]
    assert rolled_back == (["secret_rotation_rolled_back"] if step in ("test", "finish") else [])
    # A retry works, with a fresh password.
    result = run(app, "secrets.rotate", path="db/app")
    assert result.successful(), result.result
    assert stored_password(app) not in (role["password"], seen["p"])
    assert cluster.logs_in(role["username"], stored_password(app))


def test_a_crash_after_the_role_changed_is_resumed(
    app: Celery, role: dict[str, str], cluster: Cluster
) -> None:
    put(app, "db/app", role, rotation_interval_days="30", rotator="postgres")
    store = store_of(app)
    pending = "pending-password-from-a-dead-worker-0001"
    store.write(STAGING + "db/app", {**role, "password": pending, "base_version": "1"}, cas=0)
    with cluster.admin() as admin:
        admin.execute(f"ALTER ROLE {role['username']} PASSWORD '{pending}'")
    result = run(app, "secrets.rotate", path="db/app")
    assert result.result == {"path": "db/app", "version": 2, "outcome": "resumed"}
    assert stored_password(app) == pending
    assert cluster.logs_in(role["username"], pending)
    assert STAGING + "db/app" not in store.list_paths()


def test_a_crash_before_the_role_changed_is_undone_then_rotated(
    app: Celery, role: dict[str, str], cluster: Cluster
) -> None:
    put(app, "db/app", role, rotation_interval_days="30", rotator="postgres")
    store = store_of(app)
    store.write(
        STAGING + "db/app", {**role, "password": "never-applied-0002", "base_version": "1"}, cas=0
    )
    result = run(app, "secrets.rotate", path="db/app")
    assert result.result["outcome"] == "undone_then_rotated"
    assert cluster.logs_in(role["username"], stored_password(app))
    assert not cluster.logs_in(role["username"], "never-applied-0002")


def test_a_second_rotation_of_the_same_path_waits_its_turn(
    app: Celery, role: dict[str, str]
) -> None:
    from workers.locks import job_locks

    put(app, "db/app", role, rotation_interval_days="30", rotator="postgres")
    with job_locks(runtime_of(app).redis, ["secrets:rotate:db/app"], ttl=60):
        result = run(app, "secrets.rotate", path="db/app")
    assert result.result["skipped"] is True
    assert stored_password(app) == role["password"]


def test_no_secret_value_reaches_logs_rows_or_metrics(
    app: Celery, role: dict[str, str], cluster: Cluster
) -> None:
    stream = io.StringIO()
    configure_logging(level="DEBUG", log_format="json", stream=stream)
    planted = [role["password"], "sk-planted-api-key-9876", "planted-svc-pass-5555"]
    put(app, "db/app", role, days=40, rotation_interval_days="30", rotator="postgres")
    put(app, "apis/openai", {"api_key": planted[1]})
    put(app, "svc/legacy", {"password": planted[2]}, rotator="ftp")
    run(app, "secrets.check_rotation")
    run(app, "secrets.rotate", path="db/app")  # succeeds
    run(app, "secrets.rotate", path="svc/legacy")  # unknown rotator: fails
    with cluster.admin() as admin:  # a rotation that gets stuck mid-way: the role is gone
        admin.execute(f"DROP ROLE {role['username']}")
    run(app, "secrets.rotate", path="db/app")
    planted.append(stored_password(app))  # the rotated password too
    rt = runtime_of(app)
    with rt.engine.connect() as connection:
        rows = []
        for table in ("task_runs", "fleet_audit_log", "secret_rotation_status", "fleet_secrets"):
            rows += [str(tuple(r)) for r in connection.execute(text(f"SELECT * FROM {table}"))]  # noqa: S608
        runs = connection.execute(select(TaskRun.error, TaskRun.result, TaskRun.args)).all()
    haystacks = {
        "logs": stream.getvalue(),
        "rows": "\n".join(rows),
        "metrics": generate_latest(REGISTRY).decode(),
        "runs": str(runs),
    }
    assert any("secret_rotation_stuck" in line for line in stream.getvalue().splitlines())
    for where, haystack in haystacks.items():
        for value in planted:
            assert value not in haystack, f"a secret value reached the {where}"


@contextmanager
def openbao_app(
    postgres_url: str, redis_url: str, tmp_path: Path, openbao: OpenBao, policy: str | None = None
) -> Iterator[tuple[Celery, str]]:
    """The secrets jobs on OpenBao, on a prefix of the test's own, with a token holding the
    shipped least-privilege policy moved to that prefix (or ``policy``, an HCL text with
    ``/platform/`` in its paths)."""
    prefix = openbao.prefix()
    token = openbao.policy_for(prefix, policy)
    settings = FleetSettings(
        home=tmp_path,
        database_url=postgres_url,
        redis_url=redis_url,
        vault_addr=openbao.url,
        vault_token=token,
        vault_path_prefix=prefix,
    )
    rt = install(Runtime(settings))
    application = create_app(rt)
    try:
        yield application, prefix
    finally:
        application.close()
        rt.close()


def seed(openbao: OpenBao, prefix: str, role: dict[str, str]) -> None:
    """As an operator would (root): the role's credentials with a rotator, an API key the
    fleet must not rotate, and a secret of another team."""
    custom = {"rotation_interval_days": "30", "rotator": "postgres"}
    for path, data, metadata in (
        (f"{prefix}/db/app", role, custom),
        # No rotator (KV v2 refuses an empty custom metadata value, so none is written).
        (f"{prefix}/apis/openai", {"api_key": "sk-0987654321"}, {"rotation_interval_days": "30"}),
        (f"other-{prefix}/db", {"password": "not-ours-0001"}, {}),
    ):
        openbao.api("POST", f"secret/data/{path}", json={"data": data})
        if metadata:
            openbao.api("POST", f"secret/metadata/{path}", json={"custom_metadata": metadata})


def current(openbao: OpenBao, path: str) -> tuple[int, dict[str, str]]:
    found = openbao.api("GET", f"secret/data/{path}")["data"]
    return int(found["metadata"]["version"]), dict(found["data"])


def test_the_shipped_vault_policy_is_enough_to_check_and_rotate(
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
    role: dict[str, str],
    cluster: Cluster,
    openbao: OpenBao,
) -> None:
    with openbao_app(postgres_url, redis_url, tmp_path, openbao) as (app, prefix):
        seed(openbao, prefix, role)
        check = run(app, "secrets.check_rotation")
        assert check.successful(), check.result
        assert {s["path"]: s["status"] for s in check.result["secrets"]} == {
            "apis/openai": "ok",
            "db/app": "ok",
        }
        rotated = run(app, "secrets.rotate", path="db/app")
        assert rotated.result == {"path": "db/app", "version": 2, "outcome": "rotated"}
        version, data = current(openbao, f"{prefix}/db/app")
        assert version == 2 and cluster.logs_in(role["username"], data["password"])
        with pytest.raises(httpx.HTTPStatusError):  # the staged copy is gone
            openbao.api("GET", f"secret/metadata/{prefix}/.rotation/db/app")
        # Least privilege: nothing outside the prefix, no new managed secret, no deletion.
        store = VaultStore(runtime_of(app).settings)
        for attempt in (
            lambda: store.write("db/brand-new", {"password": "p"}),
            lambda: store.delete("db/app"),
            lambda: store.set_custom_metadata("db/app", {"rotator": ""}),
            lambda: VaultStore(
                runtime_of(app).settings.model_copy(update={"vault_path_prefix": f"other-{prefix}"})
            ).read("db"),
        ):
            with pytest.raises(StoreUnavailable, match="permission denied"):
                attempt()
        assert current(openbao, f"{prefix}/db/app")[0] == 2


def test_less_than_the_shipped_policy_fails_the_rotation_safely(
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
    role: dict[str, str],
    cluster: Cluster,
    openbao: OpenBao,
) -> None:
    staging = (
        'path "secret/data/platform/.rotation/*" {\n  capabilities = ["create", "read", "update"]'
    )
    shipped = POLICY.read_text()
    assert staging in shipped
    read_only = shipped.replace(staging, staging.replace('"create", "read", "update"', '"read"'))
    with openbao_app(postgres_url, redis_url, tmp_path, openbao, read_only) as (app, prefix):
        seed(openbao, prefix, role)
        rotated = run(app, "secrets.rotate", path="db/app")
        assert not rotated.successful()
        assert "write .rotation/db/app: permission denied (403)" in str(rotated.result)
        assert cluster.logs_in(role["username"], role["password"])  # nothing changed
        assert current(openbao, f"{prefix}/db/app") == (1, role)


def test_a_check_on_a_mount_as_operators_set_it_up(
    postgres_url: str, redis_url: str, tmp_path: Path, openbao: OpenBao
) -> None:
    """KV v2 with cas_required and delete_version_after, a key with metadata and no
    version, AppRole login under the shipped policy: each secret gets its own status and
    the store is up."""
    mount, prefix = f"kv-{openbao.prefix()}", openbao.prefix()
    openbao.api("POST", f"sys/mounts/{mount}", json={"type": "kv", "options": {"version": "2"}})
    openbao.api(
        "POST", f"{mount}/config", json={"cas_required": True, "delete_version_after": "240h"}
    )
    policy = POLICY.read_text().replace("secret/", f"{mount}/").replace("/platform/", f"/{prefix}/")
    openbao.api("PUT", f"sys/policies/acl/fleet-{prefix}", json={"policy": policy})
    role_id, secret_id = openbao.approle(f"fleet-{prefix}", f"fleet-{prefix}")
    managed = {"rotation_interval_days": "30"}
    for path, data, custom in (
        ("db/app", {"password": "app-pass-0001"}, managed),
        ("svc/plain", {"password": "plain-pass-0002"}, {}),
        ("db/planned", None, managed),  # metadata written before any version
    ):
        if data is not None:
            body = {"data": data, "options": {"cas": 0}}
            openbao.api("POST", f"{mount}/data/{prefix}/{path}", json=body)
        if custom:
            openbao.api(
                "POST", f"{mount}/metadata/{prefix}/{path}", json={"custom_metadata": custom}
            )
    settings = FleetSettings(
        home=tmp_path,
        database_url=postgres_url,
        redis_url=redis_url,
        vault_addr=openbao.url,
        vault_mount=mount,
        vault_path_prefix=prefix,
        vault_role_id=role_id,
        vault_secret_id=secret_id,
    )
    rt = install(Runtime(settings))
    application = create_app(rt)
    try:
        result = run(application, "secrets.check_rotation").result
    finally:
        application.close()
        rt.close()
    assert result["store_up"] is True
    found = {s["path"]: (s["status"], s["reason"]) for s in result["secrets"]}
    assert found["db/planned"] == ("error", "no version (metadata only)")
    assert found["svc/plain"] == ("unmanaged", "no rotation policy")
    status, reason = found["db/app"]
    assert status == "ok" and "will be deleted at" in reason  # in 10 days, before it is due
