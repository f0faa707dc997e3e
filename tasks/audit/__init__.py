"""``audit.ship``: every audit event delivered to every sink, in order, tamper-evident.

For each sink (one shipper per sink at a time), each source table is read in id order
from the sink's cursor, rendered (sensitive values replaced by an HMAC), chained, delivered,
and only then are the cursor and the chain head (with the file sink's committed offset)
written, in one transaction. A sink that fails holds its cursors; one that refuses is
stopped until an operator resumes it. Checkpoints sign the chain head periodically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg import sql
from sqlalchemy import DateTime, Table, select
from sqlalchemy.orm import Session

from tasks.audit.events import (
    GENESIS,
    SOURCES,
    Chain,
    Protector,
    render_document,
    render_values,
)
from tasks.audit.sinks import (
    AuditSink,
    FileSink,
    HttpSink,
    SinkRefused,
    SinkUnavailable,
    _FileConfig,
    _HttpConfig,
    load_sinks,
)
from workers.db.models import AUDIT_SOURCE_TABLES, AuditCursor, AuditSinkState, UTCDateTime
from workers.fleetstate import AUDIT_SINK, audit_backlog, prune_health, record_health
from workers.jobs import PermanentError, RetryPolicy, job
from workers.locks import job_locks
from workers.logs import get_logger, register_secret
from workers.runtime import Runtime, runtime
from workers.settings import FleetSettings

log = get_logger("fleet.audit")

TABLES: dict[str, Table] = AUDIT_SOURCE_TABLES
TIME_LIMIT = 300
LOCK_TTL = 20  # renewed while the shipper lives; a killed one frees the sink within this


def hmac_key(settings: FleetSettings) -> bytes:
    """FLEET_AUDIT_HMAC_KEY, else a key generated once into FLEET_HOME/audit-hmac.key."""
    if settings.audit_hmac_key is not None:
        return settings.audit_hmac_key.get_secret_value().encode()
    path = settings.home / "audit-hmac.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(os.urandom(32).hex())
    key = path.read_text().strip()
    register_secret(key)
    return key.encode()


def open_sink(settings: FleetSettings, config: _FileConfig | _HttpConfig) -> AuditSink:
    if isinstance(config, _FileConfig):
        directory = Path(config.path)
        if not directory.is_absolute():
            directory = settings.home / directory
        return FileSink(config.name, directory, config.max_bytes)
    return HttpSink(config, settings.audit_sink_headers.get(config.name, {}))


@dataclass
class SinkRun:
    shipped: dict[str, int] = field(default_factory=dict)
    checkpoints: int = 0
    malformed: int = 0
    error: str | None = None
    stopped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "shipped": self.shipped,
            "checkpoints": self.checkpoints,
            "malformed": self.malformed,
            "error": self.error,
            "stopped": self.stopped,
        }


def _state(session: Session, sink: str, now: datetime) -> AuditSinkState:
    state = session.get(AuditSinkState, sink)
    if state is None:
        state = AuditSinkState(
            sink=sink, seq=0, head_hash=GENESIS, segment=None, offset=0, updated_at=now
        )
        session.add(state)
        session.flush()
    return state


def _cursor(session: Session, source: str, sink: str, now: datetime) -> AuditCursor:
    cursor = session.get(AuditCursor, (source, sink))
    if cursor is None:
        cursor = AuditCursor(source=source, sink=sink, last_id=0, updated_at=now)
        session.add(cursor)
        session.flush()
    return cursor


def _page(session: Session, table: Table, after: int, limit: int) -> Sequence[Sequence[Any]]:
    """The next rows after id ``after`` (SQLite; PostgreSQL reads through :class:`_Pages`)."""
    query = select(table).where(table.c.id > after).order_by(table.c.id).limit(limit)
    return session.connection().execute(query).all()


def _contiguous(rows: Sequence[Sequence[Any]], last_id: int, gaps_upto: int | None) -> int:
    """How many leading ``rows`` follow ``last_id`` with no id missing, except below
    ``gaps_upto`` (ids known to be final there)."""
    expected = last_id + 1
    limit = gaps_upto or 0
    for index, row in enumerate(rows):
        number = row[0]
        if number != expected and number > limit:
            return index
        expected = number + 1
    return len(rows)


# A timestamptz as Python's datetime.isoformat() writes it in UTC (microseconds only when
# there are some), so that rows rendered by PostgreSQL make the same events.
_ISO_UTC = (
    "to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE WHEN "
    "date_part('microseconds', {c})::bigint %% 1000000 = 0 THEN '' "
    "ELSE to_char({c} AT TIME ZONE 'UTC', '.US') END || '+00:00'"
)


def _rendered_page(
    connection: Any, table: Table, after: int, limit: int
) -> Sequence[Sequence[Any]]:
    """PostgreSQL: the next rows after id ``after`` as ``(id, metadata, document)``, the
    document every other column as one JSON object that PostgreSQL renders (on its own
    core, while this process ships the page before)."""
    fields: list[sql.Composable] = []
    for column in table.c:
        if column.name in ("metadata", "id"):
            continue
        name = sql.Identifier(column.name)
        value = (
            sql.SQL(_ISO_UTC).format(c=name)
            if isinstance(column.type, DateTime | UTCDateTime)
            else name
        )
        fields += [sql.Literal(column.name), value]
    document = sql.SQL("json_build_object('id', id, {})::text").format(sql.SQL(", ").join(fields))
    query = sql.SQL("SELECT id, metadata, {} FROM {} WHERE id > %s ORDER BY id LIMIT %s")
    try:
        with connection.cursor() as cursor:
            cursor.execute(query.format(document, sql.Identifier(table.name)), (after, limit))
            rows: Sequence[Sequence[Any]] = cursor.fetchall()
    finally:
        connection.rollback()  # no transaction left open between pages
    return rows


class _Pages:
    """A source's pages on PostgreSQL, on a connection of their own: while one page is
    shipped, the next (after its last id) is read in a thread. A page asked for after any
    other id (a gap stopped the batch short) is read then, and the one read ahead dropped.
    Reading ahead is safe: audit rows are only ever appended, and the shipper holds the
    sink's lock, so nothing but this run moves its cursors."""

    def __init__(self, rt: Runtime, table: Table, batch_size: int) -> None:
        self.table = table
        self.batch_size = batch_size
        self.pooled = rt.engine.raw_connection()
        self.connection = self.pooled.driver_connection
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="audit-read-ahead")
        self.ahead: tuple[int, Future[Sequence[Sequence[Any]]]] | None = None

    def read(self, after: int) -> Sequence[Sequence[Any]]:
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == after:
            rows = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].exception()  # wait for it: the connection is shared
            rows = _rendered_page(self.connection, self.table, after, self.batch_size)
        if len(rows) == self.batch_size:
            last = int(rows[-1][0])
            self.ahead = (
                last,
                self.reader.submit(
                    _rendered_page, self.connection, self.table, last, self.batch_size
                ),
            )
        return rows

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead[1].exception()
        self.reader.shutdown(wait=True)
        self.pooled.close()


class Shipper:
    """Ships one sink; the caller holds the sink's lock."""

    def __init__(
        self,
        rt: Runtime,
        sink: AuditSink,
        protector: Protector,
        key: bytes,
        batch_size: int,
        deadline: float,
    ) -> None:
        self.rt = rt
        self.sink = sink
        self.protector = protector
        self.key = key
        self.batch_size = batch_size
        self.deadline = deadline
        self.run = SinkRun()

    def ship(self) -> SinkRun:
        from monitoring import metrics

        with self.rt.sessions.begin() as session:
            state = _state(session, self.sink.name, datetime.now(UTC))
            if state.stopped_reason:
                self.run.stopped = state.stopped_reason
                _record_sink(session, self.sink.name, False, state.stopped_reason)
                return self.run
            self.sink.recover(state.segment, state.offset)
        try:
            for source in SOURCES:
                pages = self._pages(source)
                try:
                    while time.monotonic() < self.deadline and self._batch(source, pages):
                        pass
                finally:
                    if pages is not None:
                        pages.close()
            self._checkpoint_if_due(force=False)
        except SinkUnavailable as exc:
            self.run.error = str(exc)
            with self.rt.sessions.begin() as session:
                _record_sink(session, self.sink.name, False, str(exc))
            metrics.AUDIT_SINK_ERRORS.labels(self.sink.name, "unavailable").inc()
            log.error("audit_sink_unavailable", sink=self.sink.name, reason=str(exc))
            return self.run
        except SinkRefused as exc:
            self._stop(str(exc))
            return self.run
        with self.rt.sessions.begin() as session:
            _record_sink(session, self.sink.name, True)
        return self.run

    def _stop(self, reason: str) -> None:
        from monitoring import metrics

        with self.rt.sessions.begin() as session:
            _state(session, self.sink.name, datetime.now(UTC)).stopped_reason = reason
            _record_sink(session, self.sink.name, False, reason)
        self.run.stopped = reason
        metrics.AUDIT_SINK_ERRORS.labels(self.sink.name, "refused").inc()
        log.error(
            "audit_sink_stopped",
            sink=self.sink.name,
            reason=reason,
            resume=f"fleet audit resume {self.sink.name}",
        )

    def _pages(self, source: str) -> _Pages | None:
        if self.rt.engine.dialect.name != "postgresql":
            return None
        return _Pages(self.rt, TABLES[source], self.batch_size)

    def _batch(self, source: str, pages: _Pages | None) -> bool:
        """Ship one batch of ``source``; False when there was nothing to ship."""
        from monitoring import metrics

        table = TABLES[source]
        now = datetime.now(UTC)
        with self.rt.sessions.begin() as session:
            cursor = _cursor(session, source, self.sink.name, now)
            columns = list(table.c.keys())
            stamps = [c.key for c in table.c if isinstance(c.type, DateTime | UTCDateTime)]
            rows = (
                pages.read(cursor.last_id)
                if pages is not None
                else _page(session, table, cursor.last_id, self.batch_size)
            )
            if rows:
                rows = self._settled(session, source, cursor, rows, now)
            if not rows:
                return False
            state = _state(session, self.sink.name, now)
            chain = Chain(state.seq, state.head_hash)
            events, chained = [], []
            for row in rows:
                rendered = (
                    render_document(source, row[2], row[1], self.protector)
                    if pages is not None
                    else render_values(source, columns, row, self.protector, stamps)
                )
                if rendered.malformed:
                    self.run.malformed += 1
                    metrics.AUDIT_MALFORMED.labels(source).inc()
                events.append(rendered.event)
                chained.append(chain.link(rendered.event))
            if self._due(state, now):
                checkpoint = chain.checkpoint(self.key, now, self.sink.name)
                events.append(checkpoint.event)
                chained.append(checkpoint.line)
                state.last_checkpoint_at = now
                self.run.checkpoints += 1
            # Confirmed by the sink, then (and only then) committed with the cursor.
            state.segment, state.offset = self.sink.deliver(
                events, b"".join(chained), state.segment, state.offset, now
            )
            state.seq, state.head_hash, state.updated_at = chain.seq, chain.head, now
            cursor.last_id, cursor.updated_at = int(rows[-1][0]), now
        self.run.shipped[source] = self.run.shipped.get(source, 0) + len(rows)
        metrics.AUDIT_SHIPPED.labels(source, self.sink.name).inc(len(rows))
        return True

    def _settled(
        self,
        session: Session,
        source: str,
        cursor: AuditCursor,
        rows: Sequence[Sequence[Any]],
        now: datetime,
    ) -> Sequence[Sequence[Any]]:
        """The leading ``rows`` that can ship now, in id order with none missing before them.

        On PostgreSQL ids are taken when rows are inserted but seen when they commit: a
        missing id below a committed one may belong to a transaction still running, and
        shipping past it would lose that row. The shipper waits at such a gap until
        ``FLEET_AUDIT_GAP_GRACE`` has passed and every transaction that could still commit
        it has ended; then the id was rolled back, and the gap is passed (and counted).
        SQLite has one writer at a time: its gaps are final when seen.
        """
        take = _contiguous(rows, cursor.last_id, cursor.gap_upto if not cursor.gap_seen_at else 0)
        if take:
            if cursor.gap_seen_at is not None:  # the missing rows arrived
                cursor.gap_seen_at = cursor.gap_upto = cursor.gap_horizon_xid = None
            return self._count_gaps(rows[:take], cursor.last_id, source)
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            if cursor.gap_seen_at is None:
                cursor.gap_seen_at, cursor.gap_upto = now, int(rows[-1][0])
                cursor.gap_horizon_xid = None
                log.info(
                    "audit_waiting_at_gap",
                    source=source,
                    sink=self.sink.name,
                    missing_from=cursor.last_id + 1,
                    next_id=int(rows[0][0]),
                )
            if now - cursor.gap_seen_at < self.rt.settings.audit_gap_grace:
                return []
            if cursor.gap_horizon_xid is None:
                # Any transaction that took a missing id did so before the gap was seen,
                # and got its transaction id then: below the next one to be given out now.
                cursor.gap_horizon_xid = int(
                    connection.exec_driver_sql(
                        "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
                    ).scalar_one()
                )
            running = connection.exec_driver_sql(
                "SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) AS x "
                "WHERE x::text::bigint < %(horizon)s "
                "AND x IS DISTINCT FROM pg_current_xact_id_if_assigned()",
                {"horizon": cursor.gap_horizon_xid},
            ).scalar_one()
            if running:
                return []
        else:
            cursor.gap_upto = int(rows[-1][0])
        cursor.gap_seen_at = cursor.gap_horizon_xid = None
        take = _contiguous(rows, cursor.last_id, cursor.gap_upto or 0)
        return self._count_gaps(rows[:take], cursor.last_id, source)

    def _count_gaps(
        self, rows: Sequence[Sequence[Any]], last_id: int, source: str
    ) -> Sequence[Sequence[Any]]:
        from monitoring import metrics

        expected = last_id + 1
        for row in rows:
            if row[0] != expected:
                metrics.AUDIT_ID_GAPS.labels(source, self.sink.name).inc()
                log.warning(
                    "audit_gap_passed",
                    source=source,
                    sink=self.sink.name,
                    missing=f"{expected}-{int(row[0]) - 1}",
                    reason="no transaction can commit these ids any more (rolled back)",
                )
            expected = int(row[0]) + 1
        return rows

    def _due(self, state: AuditSinkState, now: datetime) -> bool:
        interval = self.rt.settings.audit_checkpoint_interval
        return state.last_checkpoint_at is None or now - state.last_checkpoint_at >= interval

    def _checkpoint_if_due(self, force: bool) -> None:
        now = datetime.now(UTC)
        with self.rt.sessions.begin() as session:
            state = _state(session, self.sink.name, now)
            if state.seq == 0 or not (force or self._due(state, now)):
                return
            chain = Chain(state.seq, state.head_hash)
            checkpoint = chain.checkpoint(self.key, now, self.sink.name)
            state.segment, state.offset = self.sink.deliver(
                [checkpoint.event], checkpoint.line, state.segment, state.offset, now
            )
            state.seq, state.head_hash = chain.seq, chain.head
            state.last_checkpoint_at = state.updated_at = now
        self.run.checkpoints += 1


def _record_sink(session: Session, sink: str, up: bool, reason: str | None = None) -> None:
    """Whether the sink took its last batch, for ``fleet exporter`` (which also reads the
    backlog and lag of every sink recorded here, at scrape time)."""
    now = datetime.now(UTC)
    record_health(session, AUDIT_SINK, {sink: 1 if up else 0}, now, details={sink: reason})


def record_backlog(rt: Runtime, sinks: list[str], now: datetime) -> dict[str, dict[str, int]]:
    """Events not yet shipped, per sink and source."""
    with rt.sessions() as session:
        waiting, _lag = audit_backlog(session, sinks, now)
    backlog: dict[str, dict[str, int]] = {}
    for (source, sink), count in waiting.items():
        backlog.setdefault(sink, {})[source] = count
    return backlog


def ship(rt: Runtime, sink: str | None = None, budget_seconds: float = 240.0) -> dict[str, Any]:
    """Ship the audit tables to every configured sink (or one), until caught up."""
    config = load_sinks(rt.settings.configuration_dir)
    chosen = [c for c in config.sinks if sink is None or c.name == sink]
    if sink is not None and not chosen:
        raise PermanentError(
            f"audit.ship: no sink named {sink!r} "
            f"(configured: {', '.join(c.name for c in config.sinks)})"
        )
    key = hmac_key(rt.settings)
    protector = (
        Protector(key, config.sensitive_keys)
        if config.sensitive_keys is not None
        else Protector(key)
    )
    deadline = time.monotonic() + budget_seconds
    results: dict[str, Any] = {}
    if sink is None:
        with rt.sessions.begin() as session:
            prune_health(session, AUDIT_SINK, [c.name for c in config.sinks])
    for sink_config in chosen:
        target = open_sink(rt.settings, sink_config)
        with job_locks(rt.redis, [f"audit:{target.name}"], ttl=LOCK_TTL) as busy:
            if busy is not None:
                results[target.name] = {"skipped": "another shipper holds this sink"}
                continue
            results[target.name] = (
                Shipper(rt, target, protector, key, rt.settings.audit_batch_size, deadline)
                .ship()
                .as_dict()
            )
    backlog = record_backlog(rt, [c.name for c in chosen], datetime.now(UTC))
    for name, outcome in results.items():
        if isinstance(outcome, dict) and "shipped" in outcome:
            outcome["backlog"] = backlog.get(name, {})
    log.info("audit_shipped", sinks=results)
    return {"sinks": results}


@job(
    "audit.ship",
    queue="audit",
    soft_time_limit=TIME_LIMIT - 30,
    time_limit=TIME_LIMIT,
    retry=RetryPolicy(max_retries=2, backoff_base=5, backoff_cap=60),
)
def ship_audit(*, sink: str | None = None, budget_seconds: float = 240.0) -> dict[str, Any]:
    """Ship the audit tables to every configured sink (or one), until caught up."""
    return ship(runtime(), sink, budget_seconds)
