"""Writing configuration the way the platform's configuration manager does.

The fleet changes live configuration in two places: canary promotion and rollback, and
the demo and tests that seed it. Both must leave exactly what the platform itself would:
the previous active row archived to ``configuration_history`` and marked inactive, a new
active row with its metadata (version, checksum, who and when), and an audit event.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from workers.db.models import Configuration, ConfigurationAuditLog, ConfigurationHistory


def platform_checksum(value: Any) -> str:
    """SHA-256 of ``json.dumps(value, sort_keys=True, default=str)``, as the platform."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _active(key: str, environment: str, scope: str, tenant_id: str | None) -> Any:
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
        select(Configuration).where(*_active(key, environment, scope, tenant_id))
    ).first()


def _archive_active(
    session: Session, key: str, environment: str, scope: str, tenant_id: str | None
) -> Configuration | None:
    """Copy the active row to configuration_history and mark it inactive (the reference's
    ``_archive_current_version``); returns it, or None when there is none."""
    current = session.scalars(
        select(Configuration).where(*_active(key, environment, scope, tenant_id))
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


def _version_of(row: Configuration) -> str | None:
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
) -> Configuration:
    """Archive the active row, insert the new one, log the audit event. The caller
    commits: everything happens in its transaction."""
    current = _archive_active(session, key, environment, scope, tenant_id)
    if current is not None:
        audit_metadata = {"previous_version": _version_of(current), **(audit_metadata or {})}
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
) -> bool:
    """Archive and deactivate the active row, with its DELETE audit event."""
    current = _archive_active(session, key, environment, scope, tenant_id)
    if current is None:
        return False
    audit = {
        "action": "DELETE",
        "key": key,
        "environment": environment,
        "scope": scope,
        "tenant_id": tenant_id,
        "user_id": user_id,
        "timestamp": now.isoformat(),
    }
    session.add(
        ConfigurationAuditLog(
            action="DELETE",
            key=key,
            environment=environment,
            scope=scope,
            tenant_id=tenant_id,
            version=None,
            user_id=user_id,
            timestamp=now,
            checksum=None,
            sensitive=current.sensitive,
            meta=json.dumps(audit),
        )
    )
    session.flush()
    return True
