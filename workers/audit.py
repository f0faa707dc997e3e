"""Writing to the fleet's own audit trail (``fleet_audit_log``), which audit shipping sends
out with the platform's. Callers pass metadata that names things, never secret values; the
redactor runs over it anyway as a last line of defence."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from workers.db.models import FleetAuditLog
from workers.logs import REDACTOR

ACTOR = "config-fleet"


def record(
    session: Session, action: str, subject: str, now: datetime, **metadata: Any
) -> FleetAuditLog:
    entry = FleetAuditLog(
        timestamp=now,
        actor=ACTOR,
        action=action,
        subject=subject,
        metadata_=REDACTOR.value(metadata),
    )
    session.add(entry)
    return entry


def entry(action: str, subject: str, now: datetime, **metadata: Any) -> dict[str, Any]:
    """One row for :func:`record_many`."""
    return {
        "timestamp": now,
        "actor": ACTOR,
        "action": action,
        "subject": subject,
        "metadata_": REDACTOR.value(metadata),
    }


def record_many(session: Session, entries: list[dict[str, Any]]) -> None:
    """Many rows at once (one executemany), in the session's transaction."""
    if entries:
        session.execute(insert(FleetAuditLog), entries)
