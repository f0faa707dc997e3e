"""Audit shipping at size: 1,000,000 rows of configuration_audit_log to the JSONL file sink.

Printed: events per second end to end (paging by id, rendering, hashing the chain, writing
and fsyncing per batch, committing cursors), each as a ratio to a bare export of the same rows
run just before it (keyset paging, lines rendered by PostgreSQL, an fsync per 5,000; no chain,
no checkpoint, no cursor, no fence: the floor any shipper pays), and the naive way (one row
read, written and fsynced at a time) on 10,000 rows, as a ratio.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, text

ADMIN_URL = os.environ.get(
    "FLEET_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
ROWS = int(os.environ.get("FLEET_BENCH_AUDIT_ROWS", "1000000"))
NAIVE_ROWS = 10_000


def _fill(url: str) -> None:
    import psycopg

    now = datetime.now(UTC)
    columns = (
        "action, key, environment, scope, tenant_id, version, user_id, timestamp, "
        "checksum, sensitive, metadata"
    )
    with (
        psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection,
        connection.cursor() as cursor,
        cursor.copy(f"COPY configuration_audit_log ({columns}) FROM STDIN") as copy,
    ):
        for i in range(ROWS):
            metadata = json.dumps(
                {
                    "action": "SET",
                    "key": f"services.svc{i % 500}.replicas",
                    "version": f"v{i}",
                    "user_id": "admin",
                }
            )
            copy.write_row(
                (
                    "SET",
                    f"services.svc{i % 500}.replicas",
                    "production",
                    "environment",
                    None,
                    f"v{i}",
                    "admin",
                    now,
                    "c" * 64,
                    i % 10 == 0,
                    metadata,
                )
            )


def _analyze(url: str) -> None:
    """Statistics, as autovacuum would gather them after such a load."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as c:
        c.execute("VACUUM ANALYZE configuration_audit_log")


def _naive(url: str, directory: Path) -> float:
    import psycopg

    began = time.perf_counter()
    with (
        psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection,
        open(directory / "naive.jsonl", "ab") as out,
    ):
        for i in range(1, NAIVE_ROWS + 1):
            row = connection.execute(
                "SELECT * FROM configuration_audit_log WHERE id = %s", (i,)
            ).fetchone()
            out.write(json.dumps([str(v) for v in row or ()]).encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
    return NAIVE_ROWS / (time.perf_counter() - began)


def _bare(url: str, directory: Path, batch: int = 5000) -> float:
    """The bare export: what a script would do, with nothing that makes an archive trustworthy."""
    import psycopg

    query = (
        "SELECT id, row_to_json(t)::text FROM configuration_audit_log t "
        "WHERE id > %s ORDER BY id LIMIT %s"
    )
    began, rows, last = time.perf_counter(), 0, 0
    with (
        psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as connection,
        open(directory / "bare.jsonl", "wb") as out,
    ):
        while True:
            page = connection.execute(query, (last, batch)).fetchall()
            if not page:
                break
            out.write("\n".join(line for _, line in page).encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
            rows, last = rows + len(page), page[-1][0]
    (directory / "bare.jsonl").unlink()
    return rows / (time.perf_counter() - began)


def main() -> None:
    from tasks.audit import ship
    from workers.db import make_engine, migrate
    from workers.logs import configure_logging
    from workers.runtime import Runtime, install
    from workers.settings import FleetSettings

    configure_logging(level="ERROR")
    name = f"fleet_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate(make_engine(url))
        _fill(url)
        _analyze(url)
        with tempfile.TemporaryDirectory() as scratch:
            home = Path(scratch)
            config = home / "config"
            config.mkdir()
            (config / "audit-sinks.yaml").write_text(
                f"sinks:\n  - {{name: archive, type: file, path: {home / 'archive'}}}\n"
            )
            rates: dict[int, float] = {}
            for batch in (1000, 5000, 20000):
                rt = install(
                    Runtime(
                        FleetSettings(
                            home=home,
                            database_url=url,
                            redis_url="redis://127.0.0.1:6379/14",
                            config_dir=config,
                            audit_batch_size=batch,
                            audit_hmac_key="bench-audit-key-0001",
                        )
                    )
                )
                with rt.engine.begin() as connection:
                    connection.execute(text("DELETE FROM audit_cursors"))
                    connection.execute(text("DELETE FROM audit_sink_state"))
                for path in (home / "archive").glob("*"):
                    path.unlink()
                bare = _bare(url, home)
                began = time.perf_counter()
                result = ship(rt, budget_seconds=3600)["sinks"]["archive"]
                seconds = time.perf_counter() - began
                shipped = sum(result["shipped"].values())
                rate = rates[batch] = shipped / seconds
                print(
                    f"file sink, batches of {batch:,}: {shipped:,} events in {seconds:.1f} s = "
                    f"{rate:,.0f} events/s (hash chain, checkpoints, fence, fsync per batch, "
                    f"cursor commit); bare export just before: {bare:,.0f} rows/s; "
                    f"{rate / bare:.0%} of it"
                )
                rt.close()
            naive = _naive(url, home)
            print(
                f"naive, one row at a time with an fsync each ({NAIVE_ROWS:,} rows): "
                f"{naive:,.0f} rows/s; ratio at the default batch of 5,000: "
                f"{rates[5000] / naive:,.0f}x"
            )
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
