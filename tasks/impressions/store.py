"""Applying a batch to the database: once, in one transaction, in a fixed order.

The batch id goes into ``impression_batches`` first; if it is already there the batch was
applied before (by a worker that died before cleaning up, or one presumed dead) and nothing
else is written. Counts are added with an upsert per (flag, environment, variant, tenant,
minute), and ``feature_flags`` gets one update per flag and environment. Rows are written
in sorted order so that concurrent drainers never deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, case, func, literal_column, or_, update
from sqlalchemy.dialects import postgresql, sqlite

from tasks.impressions.records import Aggregate
from workers.db.models import FeatureFlag, FlagImpressionCount, ImpressionBatch, UTCDateTime

_COUNT_COLUMNS = ("flag_key", "environment", "variant", "tenant_id", "bucket_start", "count")
_CREATE_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS impression_stage (flag_key text, environment text, "
    "variant text, tenant_id text, bucket_start timestamptz, count bigint) "
    "ON COMMIT DELETE ROWS"
)
_COPY_STAGE = (
    "COPY impression_stage (flag_key, environment, variant, tenant_id, bucket_start, count) "
    "FROM STDIN"
)
_MERGE_STAGE = (
    "INSERT INTO flag_impression_counts "
    "(flag_key, environment, variant, tenant_id, bucket_start, count) "
    "SELECT flag_key, environment, variant, tenant_id, bucket_start, count "
    "FROM impression_stage "
    "ORDER BY flag_key, environment, variant, coalesce(tenant_id, ''), bucket_start "
    "ON CONFLICT (flag_key, environment, variant, (coalesce(tenant_id, '')), bucket_start) "
    "DO UPDATE SET count = flag_impression_counts.count + EXCLUDED.count"
)


def _dialect_insert(connection: Connection) -> Any:
    return postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert


def claim_batch(connection: Connection, batch_id: str, agg: Aggregate, now: datetime) -> bool:
    """Record the batch as applied; False when it already was (then write nothing)."""
    insert = _dialect_insert(connection)
    statement = (
        insert(ImpressionBatch)
        .values(
            batch_id=batch_id,
            applied_at=now,
            impressions=agg.impressions,
            dead_letters=len(agg.dead),
        )
        .on_conflict_do_nothing(index_elements=["batch_id"])
        .returning(ImpressionBatch.batch_id)
    )
    return connection.execute(statement).first() is not None


class AlreadyApplied(Exception):
    """One of a group's batches was applied before: roll back, apply them one by one."""


@dataclass(frozen=True)
class Prepared:
    """What a commit writes, worked out beforehand (and in another thread than the one
    waiting on the database): the counts sorted by key, and for PostgreSQL as COPY text."""

    agg: Aggregate
    rows: list[Any]
    copy: bytes | None

    @classmethod
    def of(cls, agg: Aggregate, dialect: str) -> Prepared:
        rows = sorted(
            agg.counts.items(), key=lambda item: (*item[0][:3], item[0][3] or "", item[0][4])
        )
        return cls(agg, rows, _copy_text(rows) if dialect == "postgresql" and rows else None)


def apply_batches(
    connection: Connection, batches: list[tuple[str, Aggregate]], prepared: Prepared, now: datetime
) -> None:
    """Several batches at once, in the caller's transaction: each recorded in the ledger
    with its own figures, ``prepared`` (their sum) written once. Raises
    :class:`AlreadyApplied` when any of them was applied before (the caller rolls back)."""
    for batch_id, counts in batches:
        if not claim_batch(connection, batch_id, counts, now):
            raise AlreadyApplied(batch_id)
    _write(connection, prepared)


def apply_batch(connection: Connection, batch_id: str, agg: Aggregate, now: datetime) -> bool:
    """Everything a batch adds, in the caller's transaction. False: applied before."""
    if not claim_batch(connection, batch_id, agg, now):
        return False
    _write(connection, Prepared.of(agg, connection.dialect.name))
    return True


def _write(connection: Connection, prepared: Prepared) -> None:
    if prepared.rows:
        if prepared.copy is not None and connection.dialect.name == "postgresql":
            _copy_counts(connection, prepared.copy)
        else:
            _upsert_counts(connection, prepared.rows)
    _update_flags(connection, prepared.agg)


def _copy_counts(connection: Connection, text: bytes) -> None:
    """PostgreSQL: COPY into a session-local stage, then one additive upsert."""
    raw = connection.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor:
        cursor.execute(_CREATE_STAGE)
        with cursor.copy(_COPY_STAGE) as copy:
            copy.write(text)
        cursor.execute(_MERGE_STAGE)
        cursor.execute("TRUNCATE impression_stage")


# COPY's text format: these four characters must be escaped inside a value.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(rows: list[Any]) -> bytes:
    """The rows in COPY text format, built in one pass (much cheaper than a call per row)."""
    escape = _COPY_ESCAPES
    stamps: dict[datetime, str] = {}
    lines = []
    for (flag, environment, variant, tenant, bucket), count in rows:
        stamp = stamps.get(bucket)
        if stamp is None:
            stamp = stamps[bucket] = bucket.isoformat()
        tenant_text = "\\N" if tenant is None else tenant.translate(escape)
        lines.append(
            f"{flag.translate(escape)}\t{environment.translate(escape)}\t"
            f"{variant.translate(escape)}\t{tenant_text}\t{stamp}\t{count}\n"
        )
    return "".join(lines).encode()


def _upsert_counts(connection: Connection, rows: list[Any]) -> None:
    """SQLite (and any other backend): an additive upsert per row."""
    counts = FlagImpressionCount
    statement = sqlite.insert(counts)
    statement = statement.on_conflict_do_update(
        index_elements=[
            counts.flag_key,
            counts.environment,
            counts.variant,
            func.coalesce(counts.tenant_id, literal_column("''")),
            counts.bucket_start,
        ],
        set_={"count": counts.count + statement.excluded.count},
    )
    connection.execute(
        statement,
        [dict(zip(_COUNT_COLUMNS, (*key, count), strict=True)) for key, count in rows],
    )


def _update_flags(connection: Connection, agg: Aggregate) -> None:
    if not agg.flags:
        return
    seen = bindparam("seen", type_=UTCDateTime)
    statement = (
        update(FeatureFlag)
        .where(FeatureFlag.key == bindparam("flag"), FeatureFlag.environment == bindparam("env"))
        .values(
            impression_count=FeatureFlag.impression_count + bindparam("added"),
            last_evaluated=case(
                (
                    or_(FeatureFlag.last_evaluated.is_(None), FeatureFlag.last_evaluated < seen),
                    seen,
                ),
                else_=FeatureFlag.last_evaluated,
            ),
        )
        .execution_options(synchronize_session=False)
    )
    connection.execute(
        statement,
        [
            {"flag": flag, "env": env, "added": count, "seen": last}
            for (flag, env), (count, last) in sorted(agg.flags.items())
        ],
    )
