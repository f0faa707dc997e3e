"""What a canary deployment writes to live configuration, and the checks before it does.

``canary start`` writes the candidate at the canary subset's narrower scope (a service, or
each tenant), where the platform's layering (tenant, then service, environment, global)
gives it precedence for the canary's readers. Promotion writes it at the deployment's own
scope, then takes the overrides away; rollback takes them away. Taking an override away
puts back what was there before the canary (a tenant's own value), or deletes it.

Every write goes through :mod:`workers.configstore` (history, version and checksum, audit
row, then after the commit cache invalidation and the change event). Before promoting or
rolling back, every row the deployment relies on is read locked and compared with the
version it wrote (overrides) or replaced (the promoted scope): another hand's change in
between is a conflict, and nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from workers.configstore import (
    active_clauses,
    delete_configuration,
    set_configuration,
    version_of,
)
from workers.db.models import CanaryDeployment, Configuration

ACTOR = "config-fleet-canary"


@dataclass(frozen=True)
class Target:
    scope: str
    tenant_id: str | None


def targets(subset: dict[str, Any] | None) -> list[Target]:
    """The platform's service scope has no name column: a service override is the key's
    service-scope row (tenant empty), read by whatever reads that key at service scope."""
    if not subset:
        return []
    if subset.get("service"):
        return [Target("service", None)]
    return [Target("tenant", str(t)) for t in subset.get("tenants") or []]


def _meta(row: Configuration) -> dict[str, Any]:
    try:
        meta = json.loads(row.meta or "null")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _locked_active(
    session: Session, key: str, environment: str, scope: str, tenant_id: str | None
) -> Configuration | None:
    query = select(Configuration).where(*active_clauses(key, environment, scope, tenant_id))
    return session.scalars(query.with_for_update()).first()


def write_overrides(
    session: Session,
    deployment: CanaryDeployment,
    value: Any,
    now: datetime,
    notify: redis.Redis | None,
) -> list[dict[str, Any]]:
    """The candidate at each target scope; returns what was written and replaced."""
    written = []
    for target in targets(deployment.subset):
        before = _locked_active(
            session, deployment.key, deployment.environment, target.scope, target.tenant_id
        )
        row = set_configuration(
            session,
            key=deployment.key,
            value=value,
            environment=deployment.environment,
            scope=target.scope,
            tenant_id=target.tenant_id,
            user_id=ACTOR,
            now=now,
            action="CANARY_START",
            description=f"canary {deployment.name}: candidate for its subset",
            audit_metadata={"canary": deployment.name},
            notify=notify,
        )
        written.append(
            {
                "scope": target.scope,
                "tenant_id": target.tenant_id,
                "version": version_of(row),
                "previous_value": before.value if before is not None else None,
                "previous_version": version_of(before),
            }
        )
    return written


def conflicts(
    session: Session, deployment: CanaryDeployment, *, promoting: bool
) -> list[dict[str, Any]]:
    """The rows that are not what the deployment left there, each with who changed it."""
    expected = [
        (o["scope"], o.get("tenant_id"), o.get("version")) for o in deployment.overrides or []
    ]
    if promoting:
        expected.append((deployment.scope, deployment.tenant_id, deployment.replaces_version))
    found = []
    for scope, tenant_id, version in expected:
        row = _locked_active(session, deployment.key, deployment.environment, scope, tenant_id)
        actual = version_of(row)
        if actual != version:
            meta = _meta(row) if row is not None else {}
            found.append(
                {
                    "scope": scope,
                    "tenant_id": tenant_id,
                    "expected_version": version,
                    "found_version": actual,
                    "changed_by": meta.get("updated_by"),
                    "changed_at": meta.get("updated_at"),
                }
            )
    return found


def remove_overrides(
    session: Session,
    deployment: CanaryDeployment,
    now: datetime,
    action: str,
    reason: str,
    notify: redis.Redis | None,
) -> None:
    """Put back what each override replaced, or delete it."""
    for override in deployment.overrides or []:
        common: dict[str, Any] = {
            "key": deployment.key,
            "environment": deployment.environment,
            "scope": override["scope"],
            "tenant_id": override.get("tenant_id"),
            "user_id": ACTOR,
            "now": now,
            "action": action,
            "audit_metadata": {"canary": deployment.name, "reason": reason},
            "notify": notify,
        }
        previous = override.get("previous_value")
        if previous is None:
            delete_configuration(session, **common)
        else:
            set_configuration(
                session,
                value=json.loads(previous),
                description=f"canary {deployment.name}: restored",
                **common,
            )


def promote(
    session: Session,
    deployment: CanaryDeployment,
    now: datetime,
    reason: str,
    notify: redis.Redis | None,
) -> None:
    set_configuration(
        session,
        key=deployment.key,
        value=json.loads(deployment.new_value),
        environment=deployment.environment,
        scope=deployment.scope,
        tenant_id=deployment.tenant_id,
        user_id=ACTOR,
        now=now,
        action="CANARY_PROMOTE",
        description=f"canary {deployment.name} promoted: {reason}",
        audit_metadata={"canary": deployment.name},
        notify=notify,
    )
    remove_overrides(session, deployment, now, "CANARY_PROMOTE", reason, notify)
