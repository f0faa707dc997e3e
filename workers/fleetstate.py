"""The fleet's state as the database holds it, read at scrape time by ``fleet exporter``.

Why: a gauge a job sets lives in the process that ran the job. With two workers, each
exports the value it last saw, so sums count twice, and a worker that has not re-run the
job keeps an old value (a drift fixed elsewhere keeps alerting). State that lives in the
database is therefore read from the database, by one collector, at every scrape: it is
the same whichever process serves it, and resolved state is gone at the next scrape.

Most of it has a table of its own (drift findings, secret statuses, audit cursors, canary
deployments). ``fleet_health`` holds the rest, written by the jobs with
:func:`record_health`: each job's last success, whether the secret store answered,
whether each audit sink took its batch, when drift detection last covered an environment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from workers.db.models import (
    AUDIT_SOURCE_TABLES,
    AuditCursor,
    CanaryAnalysis,
    CanaryDeployment,
    DriftFindingRow,
    FeatureFlag,
    FlagRollout,
    FleetHealth,
    SecretRotationStatus,
)

# fleet_health kinds.
LAST_SUCCESS = "last_success"  # name: job; value: unix time of its last success (or skip)
SECRET_STORE = "secret_store"  # noqa: S105 - a kind, not a password; name: ""; value: 1 up, 0 down
AUDIT_SINK = "audit_sink"  # name: sink; value: 1 up, 0 down or stopped
DRIFT_RUN = "drift_run"  # name: environment; value: unix time of the last completed run

# Canary deployments still being judged, or decided within this long: their last score
# is exported (a bounded set).
CANARY_ACTIVE = ("pending", "analyzing")
CANARY_SCORE_KEPT = timedelta(days=1)


def record_health(
    session: Session,
    kind: str,
    values: Mapping[str, float],
    now: datetime,
    *,
    details: Mapping[str, str | None] | None = None,
) -> None:
    """Upsert ``values`` ({name: value}) of ``kind``, with an optional detail per name."""
    rows = [
        {
            "kind": kind,
            "name": name,
            "value": float(value),
            "detail": (details or {}).get(name),
            "updated_at": now,
        }
        for name, value in values.items()
    ]
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(FleetHealth).values(rows)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["kind", "name"],
            set_={
                "value": statement.excluded.value,
                "detail": statement.excluded.detail,
                "updated_at": statement.excluded.updated_at,
            },
        )
    )


def prune_health(session: Session, kind: str, keep: Iterable[str]) -> None:
    """Forget the names of ``kind`` not in ``keep`` (a sink no longer configured stops
    being exported, and its alerts resolve)."""
    session.execute(
        delete(FleetHealth).where(FleetHealth.kind == kind, FleetHealth.name.not_in(list(keep)))
    )


@dataclass
class FleetState:
    """Every fleet-wide value, keyed by its label values."""

    last_success: dict[str, float] = field(default_factory=dict)  # task
    drift_findings: dict[tuple[str, str, str], int] = field(default_factory=dict)
    drift_last_run: dict[str, float] = field(default_factory=dict)  # environment
    secrets: dict[str, int] = field(default_factory=dict)  # status
    secret_age: dict[str, float] = field(default_factory=dict)  # path
    secret_due: dict[str, float] = field(default_factory=dict)  # path
    secret_store_up: float | None = None
    secret_rotations_stuck: int = 0
    audit_sink_up: dict[str, float] = field(default_factory=dict)  # sink
    audit_backlog: dict[tuple[str, str], int] = field(default_factory=dict)  # source, sink
    audit_lag: dict[tuple[str, str], float] = field(default_factory=dict)
    canary_deployments: dict[str, int] = field(default_factory=dict)  # state
    canary_score: dict[str, float] = field(default_factory=dict)  # deployment
    rollouts: dict[str, int] = field(default_factory=dict)  # state
    rollout_percentage: dict[tuple[str, str], float] = field(default_factory=dict)
    rollout_step_started: dict[tuple[str, str], float] = field(default_factory=dict)


def read_fleet_state(session: Session, now: datetime) -> FleetState:
    """One read of everything, in one transaction (raises database errors: the caller
    reports the database as down)."""
    state = FleetState()
    health: dict[str, dict[str, float]] = {}
    for row in session.scalars(select(FleetHealth)):
        health.setdefault(row.kind, {})[row.name] = row.value
    state.last_success = health.get(LAST_SUCCESS, {})
    state.drift_last_run = health.get(DRIFT_RUN, {})
    state.audit_sink_up = health.get(AUDIT_SINK, {})
    state.secret_store_up = health.get(SECRET_STORE, {}).get("")
    _drift(session, state)
    _secrets(session, state, now)
    _audit(session, state, now)
    _canary(session, state, now)
    _rollouts(session, state, now)
    return state


def _drift(session: Session, state: FleetState) -> None:
    query = (
        select(
            DriftFindingRow.environment,
            DriftFindingRow.kind,
            DriftFindingRow.severity,
            func.count(),
        )
        .where(DriftFindingRow.resolved_at.is_(None))
        .group_by(DriftFindingRow.environment, DriftFindingRow.kind, DriftFindingRow.severity)
    )
    for environment, kind, severity, count in session.execute(query):
        state.drift_findings[(environment, kind, severity)] = int(count)


def _secrets(session: Session, state: FleetState, now: datetime) -> None:
    for row in session.scalars(select(SecretRotationStatus)):
        state.secrets[row.status] = state.secrets.get(row.status, 0) + 1
        if row.status == "error" and (row.reason or "").startswith("stuck"):
            state.secret_rotations_stuck += 1
        if row.version_created is not None:
            state.secret_age[row.path] = (now - row.version_created).total_seconds()
        if row.due_at is not None:
            state.secret_due[row.path] = row.due_at.timestamp()


def audit_backlog(
    session: Session, sinks: Iterable[str], now: datetime
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], float]]:
    """Per (source, sink): the events above the sink's cursor, and the age in seconds of
    the oldest of them (0 when caught up)."""
    wanted = set(sinks)
    cursors = {
        (row.source, row.sink): row.last_id
        for row in session.scalars(select(AuditCursor))
        if row.sink in wanted
    }
    backlog: dict[tuple[str, str], int] = {}
    lag: dict[tuple[str, str], float] = {}
    for source, table in AUDIT_SOURCE_TABLES.items():
        for sink in sorted(wanted):
            last = cursors.get((source, sink), 0)
            waiting, oldest = session.execute(
                select(func.count(), func.min(table.c.timestamp)).where(table.c.id > last)
            ).one()
            backlog[(source, sink)] = int(waiting or 0)
            age = (now - oldest).total_seconds() if oldest is not None else 0.0
            lag[(source, sink)] = max(0.0, age)
    return backlog, lag


def _audit(session: Session, state: FleetState, now: datetime) -> None:
    """Backlog and lag of each configured sink: those with a fleet_health row."""
    state.audit_backlog, state.audit_lag = audit_backlog(session, state.audit_sink_up, now)


def _canary(session: Session, state: FleetState, now: datetime) -> None:
    counts = session.execute(
        select(CanaryDeployment.state, func.count()).group_by(CanaryDeployment.state)
    )
    state.canary_deployments = {name: int(count) for name, count in counts}
    latest = (
        select(CanaryAnalysis.deployment_id, func.max(CanaryAnalysis.id).label("id"))
        .group_by(CanaryAnalysis.deployment_id)
        .subquery()
    )
    scores = session.execute(
        select(CanaryDeployment.name, CanaryAnalysis.score)
        .join(latest, latest.c.deployment_id == CanaryDeployment.id)
        .join(CanaryAnalysis, CanaryAnalysis.id == latest.c.id)
        .where(
            CanaryDeployment.state.in_(CANARY_ACTIVE)
            | (CanaryDeployment.decided_at > now - CANARY_SCORE_KEPT),
            CanaryAnalysis.score.is_not(None),
        )
    )
    state.canary_score = {name: score for name, score in scores if score is not None}


def _rollouts(session: Session, state: FleetState, now: datetime) -> None:
    counts = session.execute(select(FlagRollout.state, func.count()).group_by(FlagRollout.state))
    state.rollouts = {name: int(count) for name, count in counts}
    rows = session.execute(
        select(
            FlagRollout.flag_key,
            FlagRollout.environment,
            FlagRollout.state,
            FlagRollout.step_started_at,
            FeatureFlag.rollout_percentage,
        )
        .join(
            FeatureFlag,
            (FeatureFlag.key == FlagRollout.flag_key)
            & (FeatureFlag.environment == FlagRollout.environment),
        )
        .where(
            FlagRollout.state.in_(("active", "paused", "conflict"))
            | (FlagRollout.decided_at > now - CANARY_SCORE_KEPT)
        )
    )
    for key, environment, rollout_state, started, value in rows:
        state.rollout_percentage[(key, environment)] = float(value)
        if rollout_state == "active":
            state.rollout_step_started[(key, environment)] = started.timestamp()
