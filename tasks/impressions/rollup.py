"""Retention: minute counts older than the retention folded into hourly counts.

The fold moves rows, it never copies them: on PostgreSQL one statement deletes the old
minute rows and adds exactly those into their hours (a data-modifying CTE), so a minute row
written concurrently by a drainer is either folded or left for next time, never lost; on
SQLite the database-wide write lock makes the two statements of one transaction just as
safe. A fold that fails changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, text

from workers.db.models import ImpressionBatch

# Applied batch ids are kept long after any batch could still be in flight.
LEDGER_RETENTION = timedelta(days=2)

_FOLD_POSTGRES = text("""
WITH moved AS (
    DELETE FROM flag_impression_counts WHERE bucket_start < :cutoff
    RETURNING flag_key, environment, variant, tenant_id, bucket_start, count
)
INSERT INTO flag_impression_counts_hourly
    (flag_key, environment, variant, tenant_id, bucket_start, count)
SELECT flag_key, environment, variant, tenant_id,
       date_trunc('hour', bucket_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', sum(count)
FROM moved
GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 3, coalesce(tenant_id, ''), 5
ON CONFLICT (flag_key, environment, variant, (coalesce(tenant_id, '')), bucket_start)
DO UPDATE SET count = flag_impression_counts_hourly.count + EXCLUDED.count
""")

_FOLD_SQLITE = text("""
INSERT INTO flag_impression_counts_hourly
    (flag_key, environment, variant, tenant_id, bucket_start, count)
SELECT flag_key, environment, variant, tenant_id,
       strftime('%Y-%m-%d %H:00:00.000000', bucket_start) AS hour, sum(count)
FROM flag_impression_counts
WHERE bucket_start < :cutoff
GROUP BY flag_key, environment, variant, tenant_id, hour
ORDER BY 1, 2, 3, coalesce(tenant_id, ''), 5
ON CONFLICT (flag_key, environment, variant, coalesce(tenant_id, ''), bucket_start)
DO UPDATE SET count = flag_impression_counts_hourly.count + excluded.count
""")


def fold_minutes(engine: Engine, cutoff: datetime, now: datetime) -> dict[str, Any]:
    """Fold minute rows with ``bucket_start < cutoff``; prune the batch ledger."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            moved = connection.execute(
                text("SELECT count(*) FROM flag_impression_counts WHERE bucket_start < :cutoff"),
                {"cutoff": cutoff},
            ).scalar_one()
            connection.execute(_FOLD_POSTGRES, {"cutoff": cutoff})
        else:
            bound = _sqlite_time(cutoff)
            moved = connection.execute(
                text("SELECT count(*) FROM flag_impression_counts WHERE bucket_start < :cutoff"),
                {"cutoff": bound},
            ).scalar_one()
            connection.execute(_FOLD_SQLITE, {"cutoff": bound})
            connection.execute(
                text("DELETE FROM flag_impression_counts WHERE bucket_start < :cutoff"),
                {"cutoff": bound},
            )
        pruned = connection.execute(
            delete(ImpressionBatch).where(ImpressionBatch.applied_at < now - LEDGER_RETENTION)
        ).rowcount
    return {
        "cutoff": cutoff.isoformat(),
        "minute_rows_folded": int(moved),
        "ledger_rows_pruned": int(pruned or 0),
    }


def _sqlite_time(moment: datetime) -> str:
    """How SQLAlchemy stores a UTC datetime in SQLite, for comparisons in plain SQL."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
