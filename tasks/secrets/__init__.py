"""``secrets.check_rotation`` and ``secrets.rotate``: every managed secret with a known age
and due date, warnings before it is due, and automatic rotation that never leaves a
credential that works nowhere.

Values never leave the store through here: results, logs, audit events and metrics carry
paths, versions, dates and statuses only.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from tasks.secrets.model import (
    PolicyError,
    PolicyRule,
    SecretMetadata,
    Status,
    load_policy_rules,
    rotation_status,
)
from tasks.secrets.rotate import ROTATORS, STAGING, STUCK, PostgresRotator, RotationStuck
from tasks.secrets.stores import (
    SecretNotFound,
    SecretStore,
    SqlStore,
    StoreUnavailable,
    VaultStore,
    open_store,
)
from tasks.secrets.vault_database import static_role_statuses
from workers import audit
from workers.db.models import SecretRotationStatus
from workers.fleetstate import SECRET_STORE, record_health
from workers.jobs import PermanentError, RetryPolicy, TransientError, job, skipped
from workers.locks import job_locks
from workers.logs import get_logger
from workers.runtime import Runtime, runtime

log = get_logger("fleet.secrets")

ENQUEUED_KEY = "fleet:secrets:rotate-enqueued:"
ROTATE_TIME_LIMIT = 120
METADATA_THREADS = 16


def all_metadata(store: SecretStore, staging: bool = False) -> list[SecretMetadata]:
    """Every managed secret's metadata; through Vault, many requests at once. With
    ``staging``, the pending rotation entries (``.rotation/PATH``) too."""
    if isinstance(store, SqlStore):
        metas = store.all_metadata()
    else:
        paths = store.list_paths()
        with ThreadPoolExecutor(METADATA_THREADS, thread_name_prefix="vault") as pool:
            metas = [m for m in pool.map(_metadata_if_there(store), paths) if m is not None]
    return [m for m in metas if staging or not m.path.startswith(STAGING)]


def _managed(metas: list[SecretMetadata]) -> list[SecretMetadata]:
    return [m for m in metas if not m.path.startswith(STAGING)]


def stuck_rotations(store: SecretStore, metas: list[SecretMetadata]) -> dict[str, str]:
    """{path: reason} of the rotations marked stuck on their pending entry: no candidate
    password logged in, and a person must look before anything retries."""
    stuck = {}
    for meta in metas:
        if meta.path.startswith(STAGING):
            with contextlib.suppress(SecretNotFound):
                reason = store.read(meta.path).get(STUCK)
                if reason:
                    stuck[meta.path.removeprefix(STAGING)] = reason
    return stuck


def _mark_stuck(found: list[Status], stuck: dict[str, str]) -> list[Status]:
    return [
        Status(
            s.path,
            "error",
            stuck[s.path],
            s.version,
            s.version_created,
            s.age,
            s.due_at,
            s.notify_at,
            s.rotator,
            s.owner,
        )
        if s.path in stuck
        else s
        for s in found
    ]


def _metadata_if_there(store: SecretStore) -> Callable[[str], SecretMetadata | None]:
    """A secret deleted between the listing and the read is simply gone (not a store
    failure that would hide every other secret's status)."""

    def read(path: str) -> SecretMetadata | None:
        try:
            return store.metadata(path)
        except SecretNotFound:
            return None

    return read


def statuses(
    metas: list[SecretMetadata], rules: list[PolicyRule] | PolicyError, now: datetime
) -> list[Status]:
    found = []
    for meta in metas:
        if isinstance(rules, PolicyError):
            found.append(Status(meta.path, "error", reason=str(rules)))
            continue
        status = rotation_status(meta, rules, now)
        if status.rotator is not None and status.rotator not in ROTATORS:
            status = Status(
                meta.path,
                "error",
                reason=f"unknown rotator {status.rotator!r} (known: {', '.join(ROTATORS)})",
                version=status.version,
                version_created=status.version_created,
                age=status.age,
                due_at=status.due_at,
                rotator=status.rotator,
                owner=status.owner,
            )
        found.append(status)
    return sorted(found, key=lambda s: s.path)


# Taken in the snapshot's transaction on PostgreSQL: overlapping checks (a retry beside a
# slow first attempt, two schedulers' fires on a backlog) take turns, and the second sees
# what the first committed, so no change is audited twice.
SNAPSHOT_LOCK = 0x5EC2E75  # pg_advisory_xact_lock key


def _snapshot(
    rt: Runtime, found: list[Status], now: datetime
) -> tuple[list[tuple[str, str | None, str]], list[str]]:
    """Store this check's view; returns (path, old status, new status) for changes, and
    the paths seen before and no longer."""
    # Safe to repeat: rows are overwritten with this check's view, and a change is audited
    # against what is committed; after a lost COMMIT answer the next check audits and
    # deletes nothing twice.
    with rt.sessions.begin() as session:
        return snapshot_in(session, found, now)


def snapshot_in(
    session: Session, found: list[Status], now: datetime
) -> tuple[list[tuple[str, str | None, str]], list[str]]:
    """:func:`_snapshot` in the caller's transaction (SQLite has one writer at a time;
    PostgreSQL checks take turns on :data:`SNAPSHOT_LOCK`)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SNAPSHOT_LOCK})
    changes = []
    previous = {row.path: row for row in session.scalars(select(SecretRotationStatus))}
    for status in found:
        row = previous.get(status.path)
        if row is None:
            row = SecretRotationStatus(path=status.path)
            session.add(row)
        old = row.status if status.path in previous else None
        row.status, row.reason, row.version = status.status, status.reason, status.version
        row.version_created, row.due_at = status.version_created, status.due_at
        row.notify_at, row.rotator, row.owner = status.notify_at, status.rotator, status.owner
        row.checked_at = now
        if old != status.status:
            changes.append((status.path, old, status.status))
            audit.record(
                session,
                "secret_status_changed",
                status.path,
                now,
                previous=old,
                status=status.status,
                reason=status.reason,
                version=status.version,
            )
    gone = sorted(set(previous) - {s.path for s in found})
    for path in gone:
        session.delete(previous[path])
        audit.record(session, "secret_no_longer_seen", path, now)
    return changes, gone


def _record_store(rt: Runtime, up: bool, now: datetime, reason: str | None = None) -> None:
    """Whether the store answered, for ``fleet exporter`` (the statuses themselves are read
    from secret_rotation_status at scrape time: a deleted secret's row goes, and with it its
    series and any overdue alert)."""
    with rt.sessions.begin() as session:
        record_health(session, SECRET_STORE, {"": 1 if up else 0}, now, details={"": reason})


def _ours(value: object, token: str) -> bool:
    return value is not None and (value.decode() if isinstance(value, bytes) else value) == token


def claim_rotation_request(client: redis.Redis, path: str) -> bool:
    """One rotation request per path per check interval, whatever the number of checks.
    Resolved by reading back: a SET whose answer was lost and that the client sent again
    finds the key taken, with this call's own token in it, and is still this call's."""
    key, token = ENQUEUED_KEY + path, uuid.uuid4().hex
    return bool(client.set(key, token, nx=True, ex=900)) or _ours(client.get(key), token)


def _enqueue_rotations(rt: Runtime, found: list[Status]) -> list[str]:
    from celery import current_app

    enqueued = []
    for status in found:
        # At the start of the notify window, not once overdue: a healthy rotation never
        # shows overdue, which then means that rotation failed or that nothing rotates.
        if status.status not in ("due_soon", "overdue") or status.rotator is None:
            continue
        if claim_rotation_request(rt.redis, status.path):
            current_app.send_task("secrets.rotate", kwargs={"path": status.path}, queue="secrets")
            enqueued.append(status.path)
    return enqueued


@job(
    "secrets.check_rotation",
    queue="secrets",
    soft_time_limit=240,
    time_limit=300,
    retry=RetryPolicy(max_retries=2, backoff_base=10, backoff_cap=60),
)
def check_rotation() -> dict[str, Any]:
    """Every managed secret's age, due date and status; overdue ones sent to rotation."""
    rt = runtime()
    now = datetime.now(UTC)
    store = open_store(rt.settings, rt.engine)
    try:
        store.health()
        metas = all_metadata(store, staging=True)
        stuck = stuck_rotations(store, metas)
    except StoreUnavailable as exc:
        _record_store(rt, False, now, str(exc))
        log.error("secret_store_unavailable", store=store.name, reason=str(exc))
        return {"store": store.name, "store_up": False, "error": str(exc), "secrets": []}
    try:
        rules: list[PolicyRule] | PolicyError = load_policy_rules(rt.settings.configuration_dir)
    except PolicyError as exc:
        log.error("rotation_policies_unusable", reason=str(exc))
        rules = exc
    found = _mark_stuck(statuses(_managed(metas), rules, now), stuck)
    if rt.settings.vault_database_mounts and isinstance(store, VaultStore):
        # Vault's own rotations (tasks/secrets/vault_database.py): checked, stored and
        # exported like the rest; no rotator, so never sent to secrets.rotate.
        mounts = rt.settings.vault_database_mounts
        found += static_role_statuses(store._client(), mounts, now)
    changes, gone = _snapshot(rt, found, now)
    for path, old, new in changes:
        log.info("secret_status_changed", path=path, previous=old, status=new)
    _record_store(rt, True, now)
    enqueued = _enqueue_rotations(rt, found)
    return {
        "store": store.name,
        "store_up": True,
        "counts": dict(sorted(Counter(s.status for s in found).items())),
        "status_changes": len(changes),
        "no_longer_seen": gone,
        "rotations_enqueued": enqueued,
        "secrets": [s.as_dict() for s in found],
    }


@job(
    "secrets.rotate",
    queue="secrets",
    soft_time_limit=ROTATE_TIME_LIMIT - 20,
    time_limit=ROTATE_TIME_LIMIT,
    retry=RetryPolicy(max_retries=3, backoff_base=30, backoff_cap=600),
)
def rotate_secret(*, path: str) -> dict[str, Any]:
    """Rotate one secret with its rotator; a retry starts over with a fresh password."""
    from monitoring import metrics

    rt = runtime()
    store = open_store(rt.settings, rt.engine)
    meta = store.metadata(path)
    rules = load_policy_rules(rt.settings.configuration_dir)
    status = rotation_status(meta, rules, datetime.now(UTC))
    if status.rotator not in ROTATORS:
        raise PermanentError(
            f"{path}: rotator {status.rotator!r} is not one the fleet runs "
            f"(known: {', '.join(ROTATORS)})"
        )

    def audit_event(action: str, subject: str, **details: Any) -> None:
        with rt.sessions.begin() as session:
            audit.record(session, action, subject, datetime.now(UTC), **details)

    with job_locks(rt.redis, [f"secrets:rotate:{path}"], ttl=ROTATE_TIME_LIMIT + 60) as busy:
        if busy is not None:
            return skipped("another rotation of this secret is running", path=path)
        try:
            alternating = status.rotator == "postgres-alternating"
            rotated = PostgresRotator(store, audit_event, alternating=alternating).rotate(path)
        except TransientError as exc:
            step = getattr(exc, "step", "store")
            metrics.SECRET_ROTATIONS.labels("failed", step).inc()
            log.error("secret_rotation_failed", path=path, step=step, reason=str(exc))
            raise
        except RotationStuck as exc:
            # Marked on the pending entry: the check shows the secret as error and nothing
            # retries until a person has looked (fleet secrets unstick PATH).
            metrics.SECRET_ROTATIONS.labels("stuck", "settle").inc()
            log.error("secret_rotation_stuck", path=path, reason=str(exc))
            raise
    rt.redis.delete(ENQUEUED_KEY + path)
    metrics.SECRET_ROTATIONS.labels(rotated.outcome, "finish").inc()
    log.info("secret_rotated", path=path, version=rotated.version, outcome=rotated.outcome)
    return {"path": path, "version": rotated.version, "outcome": rotated.outcome}
