"""Findings in the database, with their lifecycle.

A run reconciles what it found with what is stored, within the scopes it covers:
a finding seen again is updated (last seen, current values); a new one is opened; one that
was resolved and is back is reopened; an open one not seen any more is resolved. A finding
that was expected (an ``expected`` rule covered it) and no longer is, because the rule
expired or was removed, is opened again too: for the alerts it is new drift.
Everything happens in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from tasks.drift.model import Finding
from workers.db.models import DriftFindingRow

_CHUNK = 500
T = TypeVar("T")


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Reconciled:
    # new, back after resolution, or no longer expected
    opened: list[Finding] = field(default_factory=list)
    resolved: list[DriftFindingRow] = field(default_factory=list)
    still_open: int = 0


def _values(finding: Finding) -> dict[str, Any]:
    return {
        "severity": finding.severity,
        "expected": finding.expected,
        "reason": finding.reason,
        "message": finding.message,
        "before": finding.before,
        "after": finding.after,
        "environment": finding.environment,
        "desired_commit": finding.commit,
    }


# The stored fields a run compares with its findings: :func:`_values`'s, in its order.
_COMPARED = tuple(
    getattr(DriftFindingRow, name)
    for name in (
        "severity",
        "expected",
        "reason",
        "message",
        "before",
        "after",
        "environment",
        "desired_commit",
    )
)


def _differs(row: Any, finding: Finding) -> bool:
    """Whether an open finding, read as (fingerprint, expected, *:data:`_COMPARED`),
    changes with this run's ``finding``: a field differs, or its ``expected`` rule expired."""
    return bool(row[1] and not finding.expected) or tuple(row[2:]) != tuple(
        _values(finding).values()
    )


def _open_rows(session: Session, fingerprints: list[str]) -> dict[str, DriftFindingRow]:
    """The open findings of ``fingerprints``, as rows to change."""
    rows: dict[str, DriftFindingRow] = {}
    for chunk in _chunks(fingerprints):
        query = select(DriftFindingRow).where(
            DriftFindingRow.fingerprint.in_(chunk), DriftFindingRow.resolved_at.is_(None)
        )
        rows.update({row.fingerprint: row for row in session.scalars(query)})
    return rows


def reconcile(
    session: Session, findings: Iterable[Finding], scopes: set[str] | None, now: datetime
) -> Reconciled:
    """Store this run's ``findings``. ``scopes``: what the run covered (None: everything),
    so that a run for one environment never resolves another's findings."""
    found = {f.fingerprint: f for f in findings}
    # The open findings as tuples of what a run compares (no JSON, no ORM objects): in a
    # steady state nothing differs, and only findings that change or resolve are loaded.
    open_query = select(DriftFindingRow.fingerprint, DriftFindingRow.expected, *_COMPARED)
    open_query = open_query.where(DriftFindingRow.resolved_at.is_(None))
    if scopes is not None:
        open_query = open_query.where(DriftFindingRow.scope.in_(sorted(scopes)))
    open_now = {row[0]: row for row in session.execute(open_query)}
    result = Reconciled()

    seen_open = [fp for fp in found if fp in open_now]
    changing = [fp for fp in seen_open if _differs(open_now[fp], found[fp])]
    gone = [fp for fp in open_now if fp not in found]
    rows = _open_rows(session, changing + gone)
    for fingerprint in changing:
        row, finding = rows.get(fingerprint), found[fingerprint]
        if row is None:
            continue  # resolved by another run between the two reads
        if row.expected and not finding.expected:  # its rule expired: drift from now on
            row.opened_at = now
            row.times_opened += 1
            result.opened.append(finding)
        changes = {k: v for k, v in _values(finding).items() if getattr(row, k) != v}
        for name, value in changes.items():
            setattr(row, name, value)
    result.still_open = len(seen_open)

    unseen = [fp for fp in found if fp not in open_now]
    _open_or_reopen(session, [found[fp] for fp in unseen], now, result)

    for fingerprint in gone:
        row = rows.get(fingerprint)
        if row is None:
            continue  # resolved by another run between the two reads
        row.resolved_at = now
        result.resolved.append(row)
    session.flush()
    # Seen now: every finding of the run's scopes still open after the flush, which is
    # those it saw again and those it opened (already stamped), in one statement.
    stamp = update(DriftFindingRow).where(DriftFindingRow.resolved_at.is_(None))
    if scopes is not None:
        stamp = stamp.where(DriftFindingRow.scope.in_(sorted(scopes)))
    if seen_open:
        session.execute(stamp.values(last_seen=now).execution_options(synchronize_session=False))
    return result


def _open_or_reopen(
    session: Session, findings: list[Finding], now: datetime, result: Reconciled
) -> None:
    if not findings:
        return
    by_fingerprint = {f.fingerprint: f for f in findings}
    resolved: dict[str, DriftFindingRow] = {}
    for chunk in _chunks(list(by_fingerprint)):
        query = select(DriftFindingRow).where(DriftFindingRow.fingerprint.in_(chunk))
        resolved.update({row.fingerprint: row for row in session.scalars(query)})
    new_rows = []
    for fingerprint, finding in by_fingerprint.items():
        row = resolved.get(fingerprint)
        if row is not None:
            for name, value in _values(finding).items():
                setattr(row, name, value)
            row.resolved_at = None
            row.opened_at = row.last_seen = now
            row.times_opened += 1
        else:
            new_rows.append(
                {
                    **_values(finding),
                    "fingerprint": fingerprint,
                    "scope": finding.scope,
                    "kind": finding.kind,
                    "environments": list(finding.environments),
                    "key": finding.key,
                    "source": finding.source,
                    "first_seen": now,
                    "last_seen": now,
                    "opened_at": now,
                    "times_opened": 1,
                }
            )
        result.opened.append(finding)
    for batch in _chunks(new_rows):
        session.execute(insert(DriftFindingRow), list(batch))


def findings(
    session: Session, *, environment: str | None = None, include_resolved: bool = False
) -> list[DriftFindingRow]:
    query = select(DriftFindingRow)
    if not include_resolved:
        query = query.where(DriftFindingRow.resolved_at.is_(None))
    if environment is not None:
        query = query.where(DriftFindingRow.environment == environment)
    order = {"critical": 0, "warning": 1, "info": 2}
    rows = list(session.scalars(query))
    rows.sort(
        key=lambda r: (
            r.resolved_at is not None,
            order.get(r.severity, 3),
            r.environment,
            r.kind,
            r.key,
        )
    )
    return rows


def row_dict(row: DriftFindingRow) -> dict[str, Any]:
    return {
        "fingerprint": row.fingerprint,
        "kind": row.kind,
        "environment": row.environment,
        "environments": row.environments,
        "key": row.key,
        "severity": row.severity,
        "expected": row.expected,
        "reason": row.reason,
        "source": row.source,
        "before": row.before,
        "after": row.after,
        "message": row.message,
        "first_seen": row.first_seen.isoformat(),
        "last_seen": row.last_seen.isoformat(),
        "resolved_at": row.resolved_at.isoformat() if row.resolved_at else None,
        "times_opened": row.times_opened,
        "commit": row.desired_commit,
    }
