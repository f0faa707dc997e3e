"""Tables: the platform's own (names and meaning from the reference document) and the fleet's.

The platform's tables keep the reference's column names. Values the platform stores as JSON
text (``value``, ``metadata``, ``variants``) are TEXT here, as the platform writes them:
the fleet must be able to read, and report, a row whose text is not valid JSON.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on PostgreSQL and SQLite alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")
BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Configuration(Base):
    """A configuration entry; the reference archives it with ``INSERT INTO
    configuration_history SELECT * FROM configurations``, so both tables have the same
    columns in the same order."""

    __tablename__ = "configurations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(512))
    value: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[str | None] = mapped_column("metadata", Text)
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    schema_version: Mapped[str] = mapped_column(String(32), default="1.0")
    environment: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        # One active row per (key, environment, scope, tenant); NULL tenant counts as one.
        Index(
            "uq_configurations_active",
            "key",
            "environment",
            "scope",
            func.coalesce(text("tenant_id"), ""),
            unique=True,
            postgresql_where=text("active"),
            sqlite_where=text("active"),
        ),
        Index("ix_configurations_environment_active", "environment", "active"),
    )


class ConfigurationHistory(Base):
    __tablename__ = "configuration_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(String(512))
    value: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[str | None] = mapped_column("metadata", Text)
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    schema_version: Mapped[str] = mapped_column(String(32), default="1.0")
    environment: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_configuration_history_lookup", "key", "environment", "scope"),)


class ConfigurationAuditLog(Base):
    __tablename__ = "configuration_audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    action: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(512))
    environment: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(128))
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    checksum: Mapped[str | None] = mapped_column(String(128))
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    meta: Mapped[str | None] = mapped_column("metadata", Text)


class FeatureFlag(Base):
    __tablename__ = "feature_flags"

    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    description: Mapped[str | None] = mapped_column(Text)
    flag_type: Mapped[str] = mapped_column(String(16))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    default_variant: Mapped[str] = mapped_column(String(128))
    variants: Mapped[str] = mapped_column(Text)
    targeting_rules: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_by: Mapped[str] = mapped_column(String(128))
    rollout_percentage: Mapped[float] = mapped_column(Float, default=0.0)
    rollout_start_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rollout_end_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    impression_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_evaluated: Mapped[datetime | None] = mapped_column(UTCDateTime)


class FeatureFlagAuditLog(Base):
    __tablename__ = "feature_flag_audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    flag_key: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str | None] = mapped_column(String(128))
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    meta: Mapped[str | None] = mapped_column("metadata", Text)


class TaskRun(Base):
    """One row per execution of a job: written by the run bookkeeping, never by a task."""

    __tablename__ = "task_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(128))
    task_id: Mapped[str] = mapped_column(String(64))
    schedule: Mapped[str | None] = mapped_column(String(128))
    args: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)

    __table_args__ = (
        Index("ix_task_runs_job_started", "job", "started_at"),
        Index("ix_task_runs_task_id", "task_id"),
        Index("ix_task_runs_started", "started_at"),
    )


class DriftFindingRow(Base):
    """A drift finding with its lifecycle: open while seen, resolved when gone, reopened
    when it comes back. ``fingerprint`` is stable across runs (what and where, never the
    values); ``scope`` says which runs own it (``env:<name>``, ``cross``, ``rules``)."""

    __tablename__ = "drift_findings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    environment: Mapped[str] = mapped_column(String(64))
    environments: Mapped[list[str]] = mapped_column(JSONDocument)
    key: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))
    severity: Mapped[str] = mapped_column(String(16))
    expected: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    before: Mapped[str | None] = mapped_column(Text)
    after: Mapped[str | None] = mapped_column(Text)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    times_opened: Mapped[int] = mapped_column(Integer, default=1)
    # The commit of the desired files compared with (desired configuration from Git).
    desired_commit: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_drift_findings_open", "resolved_at", "scope"),
        Index("ix_drift_findings_environment", "environment", "resolved_at"),
    )


def _impression_key(table: str) -> Index:
    """One row per flag, environment, variant, tenant and bucket; a NULL tenant (a
    platform-level evaluation) is one tenant of its own."""
    return Index(
        f"uq_{table}_key",
        "flag_key",
        "environment",
        "variant",
        func.coalesce(text("tenant_id"), ""),
        "bucket_start",
        unique=True,
    )


class FlagImpressionCount(Base):
    """Impressions per minute of the impression's own timestamp.

    Lean on purpose, it takes an upsert per key for every batch: no surrogate id (the
    unique key is the row's identity) and a BRIN index on time for retention and range
    reads (B-tree on SQLite). On PostgreSQL the table keeps half of each page free
    (fillfactor 50, migration 0008) so that adding to a count is a heap-only update.
    """

    __tablename__ = "flag_impression_counts"

    flag_key: Mapped[str] = mapped_column(String(256))
    environment: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(128))
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        _impression_key("flag_impression_counts"),
        Index("ix_flag_impression_counts_bucket", "bucket_start", postgresql_using="brin"),
    )
    __mapper_args__ = {  # noqa: RUF012 - SQLAlchemy's declarative attribute
        "primary_key": [flag_key, environment, variant, tenant_id, bucket_start]
    }


class FlagImpressionHourly(Base):
    """Minute rows older than the retention, folded into their hour."""

    __tablename__ = "flag_impression_counts_hourly"

    flag_key: Mapped[str] = mapped_column(String(256))
    environment: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(128))
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (_impression_key("flag_impression_counts_hourly"),)
    __mapper_args__ = {  # noqa: RUF012 - SQLAlchemy's declarative attribute
        "primary_key": [flag_key, environment, variant, tenant_id, bucket_start]
    }


class FlagImpressionUsers(Base):
    """Distinct users per flag, environment, variant and day (HyperLogLog estimate); the
    sketch itself is kept so that Redis can be refilled after losing it."""

    __tablename__ = "flag_impression_users"

    flag_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    variant: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    users: Mapped[int] = mapped_column(BigInteger)
    sketch: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ImpressionBatch(Base):
    """Batches applied to the counts: a batch id is written in the same transaction as
    its counts, so a batch applied twice (a worker presumed dead) counts once."""

    __tablename__ = "impression_batches"

    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(UTCDateTime)
    impressions: Mapped[int] = mapped_column(Integer)
    dead_letters: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_impression_batches_applied", "applied_at"),)


class FleetAuditLog(Base):
    """The fleet's own audit trail: status changes, rotations and their steps, drift and
    canary events. Never holds a secret value."""

    __tablename__ = "fleet_audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONDocument)


class FleetSecret(Base):
    """The embedded secret store: one row per path, as KV v2 keeps a secret's metadata."""

    __tablename__ = "fleet_secrets"

    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    current_version: Mapped[int] = mapped_column(Integer)
    custom_metadata: Mapped[dict[str, str]] = mapped_column(JSONDocument)
    created_time: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_time: Mapped[datetime] = mapped_column(UTCDateTime)


class FleetSecretVersion(Base):
    """One version of an embedded secret; the value is Fernet-encrypted JSON."""

    __tablename__ = "fleet_secret_versions"

    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)
    created_time: Mapped[datetime] = mapped_column(UTCDateTime)
    deletion_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    destroyed: Mapped[bool] = mapped_column(Boolean, default=False)


class SecretRotationStatus(Base):
    """The last check's view of each secret: age, due date, status and why."""

    __tablename__ = "secret_rotation_status"

    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int | None] = mapped_column(Integer)
    version_created: Mapped[datetime | None] = mapped_column(UTCDateTime)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    notify_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rotator: Mapped[str | None] = mapped_column(String(64))
    owner: Mapped[str | None] = mapped_column(String(256))
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditCursor(Base):
    """How far a sink has confirmed a source (the last shipped id), and the id gap it may be
    waiting at: ``gap_seen_at`` set while a missing id could still be committed,
    ``gap_upto`` the ids below which gaps are (to be) passed, ``gap_horizon_xid`` the
    transaction id every transaction that could commit them is below (PostgreSQL)."""

    __tablename__ = "audit_cursors"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    sink: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    gap_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    gap_upto: Mapped[int | None] = mapped_column(BigInteger)
    gap_horizon_xid: Mapped[int | None] = mapped_column(BigInteger)


class AuditSinkState(Base):
    """A sink's hash chain head and, for file sinks, the committed file and byte offset:
    written in the same transaction as the cursors, after the sink confirmed the batch."""

    __tablename__ = "audit_sink_state"

    sink: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    head_hash: Mapped[str] = mapped_column(String(64))
    segment: Mapped[str | None] = mapped_column(String(256))
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    last_checkpoint_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stopped_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Incremented by each shipper that takes the sink; its writes check it is still theirs.
    fence: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The id of the key its checkpoints are signed with (tasks.audit.events.key_id).
    key_id: Mapped[str | None] = mapped_column(String(32))


class CanaryDeployment(Base):
    """A configuration change tried on a canary before the whole scope, and its judging."""

    __tablename__ = "canary_deployments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # The change: as configurations rows are addressed.
    key: Mapped[str] = mapped_column(String(512))
    environment: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    new_value: Mapped[str] = mapped_column(Text)  # JSON
    previous_value: Mapped[str | None] = mapped_column(Text)  # JSON; None: the key was unset
    replaces_version: Mapped[str | None] = mapped_column(String(64))
    # How to judge it.
    canary_selector: Mapped[str] = mapped_column(Text)
    baseline_selector: Mapped[str] = mapped_column(Text)
    metrics: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument)
    judge: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    interval_seconds: Mapped[int] = mapped_column(Integer)
    window_seconds: Mapped[int] = mapped_column(Integer)
    step_seconds: Mapped[int] = mapped_column(Integer)
    passes_required: Mapped[int] = mapped_column(Integer)
    failure_limit: Mapped[int] = mapped_column(Integer)
    inconclusive_limit: Mapped[int] = mapped_column(Integer)
    min_samples: Mapped[int] = mapped_column(Integer)
    prometheus_deadline_seconds: Mapped[int] = mapped_column(Integer)
    max_duration_seconds: Mapped[int] = mapped_column(Integer, default=7200)
    # The canary subset ({"service": NAME} or {"tenants": [IDS]}) and what start wrote
    # there: [{scope, tenant_id, version, previous_value, previous_version}].
    subset: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    overrides: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONDocument)
    # Where it stands.
    state: Mapped[str] = mapped_column(String(16))
    passes: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    inconclusives: Mapped[int] = mapped_column(Integer, default=0)
    prometheus_down_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_analysis_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decision_reason: Mapped[str | None] = mapped_column(Text)
    # When a promotion or rollback found another hand's change: what it found.
    conflict: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONDocument)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_canary_deployments_state", "state"),)


class CanaryAnalysis(Base):
    """One analysis of a deployment, with each metric's result."""

    __tablename__ = "canary_analyses"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    deployment_id: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    verdict: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float)
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument)
    reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_canary_analyses_deployment", "deployment_id", "at"),)


class FleetHealth(Base):
    """What a job last found about a part of the fleet that no table of its own records:
    whether the secret store answered, whether an audit sink took its batch, when drift
    detection last covered an environment. Read at scrape time by ``fleet exporter``, so
    the value is the same whichever process serves it."""

    __tablename__ = "fleet_health"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    detail: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


# The audit tables the fleet ships, by source name.
AUDIT_SOURCE_TABLES: dict[str, Table] = {
    "configuration_audit_log": ConfigurationAuditLog.__table__,  # type: ignore[dict-item]
    "feature_flag_audit_log": FeatureFlagAuditLog.__table__,  # type: ignore[dict-item]
    "fleet_audit_log": FleetAuditLog.__table__,  # type: ignore[dict-item]
}


class FlagRollout(Base):
    """A feature flag's percentage rollout, advanced step by step by ``rollouts.advance``
    while the canary judge finds the flag's treatment no worse than its control."""

    __tablename__ = "flag_rollouts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    flag_key: Mapped[str] = mapped_column(String(256))
    environment: Mapped[str] = mapped_column(String(64))
    steps: Mapped[list[float]] = mapped_column(JSONDocument)  # percentages, increasing
    step_index: Mapped[int] = mapped_column(Integer, default=0)
    step_started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    min_step_seconds: Mapped[int] = mapped_column(Integer)
    min_impressions: Mapped[int] = mapped_column(Integer)
    # Impressions already counted in the step's first minute when it began: not the step's.
    treatment_before: Mapped[int] = mapped_column(BigInteger, default=0)
    control_before: Mapped[int] = mapped_column(BigInteger, default=0)
    treatment_variant: Mapped[str] = mapped_column(String(128))
    control_variant: Mapped[str] = mapped_column(String(128))
    treatment_selector: Mapped[str] = mapped_column(Text)
    control_selector: Mapped[str] = mapped_column(Text)
    metrics: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument)
    judge: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    window_seconds: Mapped[int] = mapped_column(Integer)
    query_step_seconds: Mapped[int] = mapped_column(Integer)
    min_samples: Mapped[int] = mapped_column(Integer)
    inconclusive_limit: Mapped[int] = mapped_column(Integer)
    prometheus_deadline_seconds: Mapped[int] = mapped_column(Integer)
    on_failure: Mapped[str] = mapped_column(String(16))  # zero | previous_step
    # The flag as it was before the rollout, and as the rollout last left it: a flag that
    # differs from the latter was changed by another hand (conflict).
    original_percentage: Mapped[float] = mapped_column(Float)
    written_percentage: Mapped[float] = mapped_column(Float)
    written_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String(16))
    inconclusives: Mapped[int] = mapped_column(Integer, default=0)
    prometheus_down_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_analysis_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reason: Mapped[str | None] = mapped_column(Text)
    conflict: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_flag_rollouts_state", "state"),)


class FlagRolloutStep(Base):
    """One look at a rollout: its impressions, the judge's verdict, what was decided."""

    __tablename__ = "flag_rollout_steps"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    percentage: Mapped[float] = mapped_column(Float)
    treatment_impressions: Mapped[int] = mapped_column(BigInteger)
    control_impressions: Mapped[int] = mapped_column(BigInteger)
    verdict: Mapped[str | None] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float)
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument)
    decision: Mapped[str] = mapped_column(String(16))  # wait, advance, complete, rollback, ...
    reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_flag_rollout_steps_rollout", "rollout_id", "at"),)
