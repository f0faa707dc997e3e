"""Writing configuration the way the platform's configuration manager does.

The fleet changes live configuration in two places: canary start, promotion and rollback,
and the demo and tests that seed it. Each must leave exactly what the platform itself
would (reference ``set_configuration``/``delete_configuration``): the previous active row
archived to ``configuration_history`` and marked inactive, a new active row with its
metadata (version, checksum, who and when), and an audit event, in the caller's
transaction; then, only once that transaction has committed, the cache entry invalidated
(``config:{environment}:{scope}:{key}[:{tenant}]``, the reference's own spelling of it and
the pattern it also clears) and the change event ``{key, environment, scope, tenant_id,
timestamp}`` published on ``config_changes:{environment}``, which the platform's watchers
subscribe to. A rolled-back transaction notifies nobody.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import structlog
from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session

from workers.db.models import Configuration, ConfigurationAuditLog, ConfigurationHistory

log = structlog.get_logger(__name__)

CACHE_PREFIX = "config:"
_GLOB = re.compile(r"[*?\[\]\\]")
_PENDING = "fleet_config_changes"  # session.info: changes to announce after the commit


@dataclass(frozen=True)
class ConfigChange:
    """The platform's change event; ``timestamp`` naive UTC ISO, as its ``utcnow()``."""

    key: str
    environment: str
    scope: str
    tenant_id: str | None
    timestamp: str

    @property
    def channel(self) -> str:
        return f"config_changes:{self.environment}"

    def event(self) -> str:
        return json.dumps(asdict(self))

    def cache_keys(self) -> list[str]:
        """The entry as the platform describes it, and as its ``_build_cache_key`` spells
        it (``":".join(["config:", ...])`` doubles the colon)."""
        parts = [self.environment, self.scope, self.key]
        if self.tenant_id:
            parts.append(self.tenant_id)
        return [CACHE_PREFIX + ":".join(parts), ":".join([CACHE_PREFIX, *parts])]

    def cache_pattern(self) -> str:
        """The reference's pattern (its key with ``config:`` made ``config:*``), glob
        characters of the key escaped."""
        parts = [self.environment, self.scope, self.key]
        if self.tenant_id:
            parts.append(self.tenant_id)
        return CACHE_PREFIX + "*" + ":".join(_GLOB.sub(r"\\\g<0>", p) for p in parts)


def announce(client: redis.Redis, changes: list[ConfigChange]) -> int:
    """Invalidate each change's cache entries, then publish its event. Returns how many
    could not be announced (logged and counted; the cache's TTL bounds the staleness)."""
    from monitoring import metrics

    failed = 0
    for change in changes:
        try:
            stale = [*change.cache_keys(), *client.scan_iter(match=change.cache_pattern())]
            client.delete(*stale)
            client.publish(change.channel, change.event())
        except redis.RedisError as exc:
            failed += 1
            metrics.CONFIG_ANNOUNCE_FAILURES.inc()
            log.error(
                "config_change_not_announced",
                key=change.key,
                environment=change.environment,
                scope=change.scope,
                tenant_id=change.tenant_id,
                error=f"{type(exc).__name__}: {exc}",
            )
    return failed


def _queue(session: Session, client: redis.Redis | None, change: ConfigChange) -> None:
    if client is None:
        return
    session.info.setdefault(_PENDING, []).append((client, change))


@event.listens_for(Session, "after_commit")
def _announce_committed(session: Session) -> None:
    pending = session.info.pop(_PENDING, [])
    by_client: dict[int, tuple[redis.Redis, list[ConfigChange]]] = {}
    for client, change in pending:
        by_client.setdefault(id(client), (client, []))[1].append(change)
    for client, changes in by_client.values():
        announce(client, changes)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


def change_event(
    key: str, environment: str, scope: str, tenant_id: str | None, now: datetime
) -> ConfigChange:
    naive = now.astimezone(UTC).replace(tzinfo=None)
    return ConfigChange(key, environment, scope, tenant_id, naive.isoformat())


def platform_checksum(value: Any) -> str:
    """SHA-256 of ``json.dumps(value, sort_keys=True, default=str)``, as the platform."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def active_clauses(key: str, environment: str, scope: str, tenant_id: str | None) -> Any:
    tenant = (
        Configuration.tenant_id.is_(None)
        if tenant_id is None
        else (Configuration.tenant_id == tenant_id)
    )
    return (
        Configuration.key == key,
        Configuration.environment == environment,
        Configuration.scope == scope,
        tenant,
        Configuration.active.is_(True),
    )


def active_value(
    session: Session,
    key: str,
    environment: str,
    scope: str = "environment",
    tenant_id: str | None = None,
) -> Configuration | None:
    return session.scalars(
        select(Configuration).where(*active_clauses(key, environment, scope, tenant_id))
    ).first()


def _archive_active(
    session: Session, key: str, environment: str, scope: str, tenant_id: str | None
) -> Configuration | None:
    """Copy the active row to configuration_history and mark it inactive (the reference's
    ``_archive_current_version``); returns it, or None when there is none."""
    current = session.scalars(
        select(Configuration).where(*active_clauses(key, environment, scope, tenant_id))
    ).first()
    if current is None:
        return None
    session.execute(
        insert(ConfigurationHistory).from_select(
            [c.name for c in ConfigurationHistory.__table__.columns],
            select(*Configuration.__table__.columns).where(Configuration.id == current.id),
        )
    )
    current.active = False
    session.flush()
    return current


def version_of(row: Configuration | None) -> str | None:
    """The version in a row's metadata (None for no row, or none readable)."""
    if row is None:
        return None
    try:
        meta = json.loads(row.meta or "null")
    except ValueError:
        return None
    version = meta.get("version") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def set_configuration(
    session: Session,
    *,
    key: str,
    value: Any,
    environment: str,
    user_id: str,
    now: datetime,
    scope: str = "environment",
    tenant_id: str | None = None,
    description: str | None = None,
    sensitive: bool = False,
    action: str = "SET",
    audit_metadata: dict[str, Any] | None = None,
    notify: redis.Redis | None = None,
) -> Configuration:
    """Archive the active row, insert the new one, log the audit event. The caller
    commits: everything happens in its transaction. With ``notify``, the cache entry is
    invalidated and the change event published there once it has committed."""
    current = _archive_active(session, key, environment, scope, tenant_id)
    if current is not None:
        audit_metadata = {"previous_version": version_of(current), **(audit_metadata or {})}
    version = f"v{int(now.timestamp() * 1000)}"
    value_checksum = platform_checksum(value)
    metadata = {
        "version": version,
        "created_at": now.isoformat(),
        "updated_at": now.isoformat(),
        "created_by": user_id,
        "updated_by": user_id,
        "environment": environment,
        "scope": scope,
        "checksum": value_checksum,
        "description": description,
        "tags": None,
    }
    row = Configuration(
        key=key,
        value=json.dumps(value),
        meta=json.dumps(metadata),
        encrypted=False,
        sensitive=sensitive,
        schema_version="1.0",
        environment=environment,
        scope=scope,
        tenant_id=tenant_id,
        active=True,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    audit = {
        "action": action,
        "key": key,
        "environment": environment,
        "scope": scope,
        "tenant_id": tenant_id,
        "version": version,
        "user_id": user_id,
        "timestamp": now.isoformat(),
        "checksum": value_checksum,
        "sensitive": sensitive,
        **(audit_metadata or {}),
    }
    session.add(
        ConfigurationAuditLog(
            action=action,
            key=key,
            environment=environment,
            scope=scope,
            tenant_id=tenant_id,
            version=version,
            user_id=user_id,
            timestamp=now,
            checksum=value_checksum,
            sensitive=sensitive,
            meta=json.dumps(audit, default=str),
        )
    )
    session.flush()
    _queue(session, notify, change_event(key, environment, scope, tenant_id, now))
    return row


def delete_configuration(
    session: Session,
    *,
    key: str,
    environment: str,
    user_id: str,
    now: datetime,
    scope: str = "environment",
    tenant_id: str | None = None,
    action: str = "DELETE",
    audit_metadata: dict[str, Any] | None = None,
    notify: redis.Redis | None = None,
) -> bool:
    """Archive and deactivate the active row, with its DELETE audit event (announced as
    :func:`set_configuration` does)."""
    current = _archive_active(session, key, environment, scope, tenant_id)
    if current is None:
        return False
    audit = {
        "action": action,
        "key": key,
        "environment": environment,
        "scope": scope,
        "tenant_id": tenant_id,
        "previous_version": version_of(current),
        "user_id": user_id,
        "timestamp": now.isoformat(),
        **(audit_metadata or {}),
    }
    session.add(
        ConfigurationAuditLog(
            action=action,
            key=key,
            environment=environment,
            scope=scope,
            tenant_id=tenant_id,
            version=None,
            user_id=user_id,
            timestamp=now,
            checksum=None,
            sensitive=current.sensitive,
            meta=json.dumps(audit, default=str),
        )
    )
    session.flush()
    _queue(session, notify, change_event(key, environment, scope, tenant_id, now))
    return True
