"""Applying a batch to the database: once, in one transaction, in a fixed order.

The batch id goes into ``impression_batches`` first; if it is already there the batch was
applied before (by a worker that died before cleaning up, or one presumed dead) and nothing
else is written. Counts are added with an upsert per (flag, environment, variant, tenant,
minute), and ``feature_flags`` gets one update per flag and environment. Rows are written
in sorted order so that concurrent drainers never deadlock.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, case, func, literal_column, or_, update
from sqlalchemy.dialects import postgresql, sqlite

from tasks.impressions.records import Aggregate, CountKey, DeadLetter
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
    # Any one order shared by all drainers keeps them from deadlocking; byte order ("C")
    # is that order at the least cost.
    'ORDER BY flag_key COLLATE "C", environment COLLATE "C", variant COLLATE "C", '
    "coalesce(tenant_id, '') COLLATE \"C\", bucket_start "
    "ON CONFLICT (flag_key, environment, variant, (coalesce(tenant_id, '')), bucket_start) "
    "DO UPDATE SET count = flag_impression_counts.count + EXCLUDED.count"
)


def _dialect_insert(connection: Connection) -> Any:
    return postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert


class BatchFigures(Protocol):
    """What the ledger records of a batch (a :class:`Counted`, or one batch's Aggregate)."""

    @property
    def impressions(self) -> int: ...

    @property
    def dead(self) -> list[DeadLetter]: ...


def claim_batch(connection: Connection, batch_id: str, batch: BatchFigures, now: datetime) -> bool:
    """Record the batch as applied; False when it already was (then write nothing)."""
    insert = _dialect_insert(connection)
    statement = (
        insert(ImpressionBatch)
        .values(
            batch_id=batch_id,
            applied_at=now,
            impressions=batch.impressions,
            dead_letters=len(batch.dead),
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
    waiting on the database): for PostgreSQL the counts as COPY text (the upsert sorts
    them), for other backends the counts sorted by key."""

    agg: Aggregate
    rows: list[Any]
    copy: bytes | None

    @classmethod
    def of(cls, agg: Aggregate, dialect: str) -> Prepared:
        if dialect == "postgresql":
            return cls(agg, [], _copy_text(agg.counts.items()) if agg.counts else None)
        rows = sorted(
            agg.counts.items(), key=lambda item: (*item[0][:3], item[0][3] or "", item[0][4])
        )
        return cls(agg, rows, None)


def apply_batches(
    connection: Connection,
    batches: list[tuple[str, BatchFigures]],
    prepared: Prepared,
    now: datetime,
) -> None:
    """Several batches at once, in the caller's transaction: each recorded in the ledger
    with its own figures, ``prepared`` (their sum) written once. Raises
    :class:`AlreadyApplied` when any of them was applied before (the caller rolls back)."""
    broken = "ledger" in os.environ.get("FLEET_CHAOS_BREAK", "")  # see queue.CHAOS_BREAK
    for batch_id, figures in batches:
        if not claim_batch(connection, batch_id, figures, now) and not broken:
            raise AlreadyApplied(batch_id)
    _write(connection, prepared)


def _write(connection: Connection, prepared: Prepared) -> None:
    if prepared.copy is not None:
        _copy_counts(connection, prepared.copy)
    elif prepared.rows:
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


def _copy_text(rows: Iterable[tuple[CountKey, int]]) -> bytes:
    """The rows in COPY text format, built in one pass. Names, tenants and minutes repeat
    from row to row, so each is escaped (or formatted) once and then looked up."""
    escape = _COPY_ESCAPES
    names: dict[tuple[str, str, str], str] = {}
    tenants: dict[str | None, str] = {None: "\\N"}
    stamps: dict[datetime, str] = {}
    lines = []
    for (flag, environment, variant, tenant, bucket), count in rows:
        name = names.get((flag, environment, variant))
        if name is None:
            name = names[(flag, environment, variant)] = (
                f"{flag.translate(escape)}\t{environment.translate(escape)}\t"
                f"{variant.translate(escape)}\t"
            )
        tenant_text = tenants.get(tenant)
        if tenant_text is None:
            tenant_text = tenants[tenant] = tenant.translate(escape)  # type: ignore[union-attr]
        stamp = stamps.get(bucket)
        if stamp is None:
            stamp = stamps[bucket] = bucket.isoformat()
        lines.append(f"{name}{tenant_text}\t{stamp}\t{count}\n")
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
