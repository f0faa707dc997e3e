"""One sink's shipper: adopts what the sink holds past its committed position, ships each
source in batches (each one delivered, then committed with the cursor and the chain head, the
sink's state row locked and its fence checked), writes checkpoints, and turns any failure
into that sink's state and metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tasks.audit.events import (
    GENESIS,
    SOURCES,
    Chain,
    Protector,
    chain_page,
    key_id,
    render_values,
)
from tasks.audit.reading import TABLES, _contiguous, _page, _Pages
from tasks.audit.sinks import (
    AuditSink,
    Position,
    SinkRefused,
    SinkUnavailable,
    SinkUnusable,
)
from workers.db.models import AuditCursor, AuditSinkState, UTCDateTime
from workers.errors import FleetError
from workers.fleetstate import AUDIT_SINK, record_health
from workers.jobs import TransientError
from workers.logs import get_logger
from workers.runtime import Runtime

log = get_logger("fleet.audit")


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


class SinkFenced(FleetError):
    """Another shipper took the sink (this one lost its lease): stop, write nothing."""


class SinkKeyMismatch(FleetError):
    """The sink's chain is signed with another key than this shipper's."""


class SinkBusy(FleetError):
    """Another shipper holds the sink's state row (it is inside a batch)."""


LOCK_WAIT = "5s"  # how long to wait for the sink's state row before leaving it to its holder


def _state(session: Session, sink: str, now: datetime, *, locked: bool = False) -> AuditSinkState:
    """The sink's state row; ``locked``: held (FOR UPDATE) until the transaction ends, so
    that no other shipper takes the sink while this one writes its segment and commits."""
    if locked and session.get_bind().dialect.name == "postgresql":
        # synchronous_commit off: a commit lost in a database crash loses nothing, since the
        # sink's records past its committed position are adopted on the next run (file
        # sinks) or sent again with the same event ids (HTTP sinks: at least once).
        session.execute(
            text(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'; SET LOCAL synchronous_commit = off")
        )
    try:
        state = session.get(AuditSinkState, sink, with_for_update=locked)
    except OperationalError as exc:
        if "lock timeout" in str(exc) or "could not obtain lock" in str(exc):
            raise SinkBusy(f"audit sink {sink}: another shipper is writing it") from None
        raise
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
        old_keys: Sequence[bytes] = (),
    ) -> None:
        self.rt = rt
        self.old_key_ids = {key_id(k) for k in old_keys}
        self.sink = sink
        self.protector = protector
        self.key = key
        self.batch_size = batch_size
        self.deadline = deadline
        self.run = SinkRun()
        self.fence = -1  # set when the sink is taken

    def ship(self) -> SinkRun:
        """Ship what is new; whatever goes wrong marks this sink down (with the kind of
        failure) and leaves the other sinks to ship."""
        try:
            self._ship()
        except (SinkFenced, SinkBusy) as exc:  # not a failure: another shipper has the sink
            self.run.error = str(exc)
            log.warning("audit_sink_taken", sink=self.sink.name, reason=str(exc))
        except SinkRefused as exc:
            self._stop(str(exc))
        except Exception as exc:  # one sink's failure is that sink's, never the run's
            self._down(exc)
        return self.run

    def _ship(self) -> None:
        with self.rt.sessions.begin() as session:
            state = _state(session, self.sink.name, datetime.now(UTC), locked=True)
            if state.stopped_reason:
                self.run.stopped = state.stopped_reason
                _record_sink(session, self.sink.name, False, state.stopped_reason)
                return
            # The fence: from now on every write of this sink checks it is still ours.
            state.fence = self.fence = state.fence + 1
            mine = key_id(self.key)
            if state.key_id in self.old_key_ids:  # the key was rotated: sign with the new one
                log.warning("audit_key_rotated", sink=self.sink.name, old=state.key_id, new=mine)
            elif state.key_id is not None and state.key_id != mine:
                raise SinkKeyMismatch(
                    f"audit sink {self.sink.name}: its chain is signed with key {state.key_id}, "
                    f"this shipper has key {mine}: give every host the fleet's one key "
                    "(FLEET_AUDIT_HMAC_KEY or FLEET_AUDIT_HMAC_KEY_PATH)"
                )
            state.key_id = mine
            self._adopt(session, state)
        for source in SOURCES:
            pages = self._pages(source)
            try:
                while time.monotonic() < self.deadline and self._batch(source, pages):
                    pass
            finally:
                if pages is not None:
                    pages.close()
        self._end_signed()
        with self.rt.sessions.begin() as session:
            _record_sink(session, self.sink.name, True)

    def _down(self, exc: BaseException) -> None:
        from monitoring import metrics

        kind = _failure_kind(exc)
        reason = str(exc) if isinstance(exc, FleetError | TransientError) else type(exc).__name__
        if isinstance(exc, OSError):
            reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        self.run.error = reason
        metrics.AUDIT_SINK_ERRORS.labels(self.sink.name, kind).inc()
        log.error("audit_sink_down", sink=self.sink.name, kind=kind, reason=reason)
        # The database may be what failed: then the sink's state cannot be written either.
        with contextlib.suppress(Exception), self.rt.sessions.begin() as session:
            _record_sink(session, self.sink.name, False, f"{kind}: {reason}")

    def _owned(self, session: Session, now: datetime) -> AuditSinkState:
        """The sink's state, locked, if this shipper still holds the fence; else SinkFenced
        (before anything is written)."""
        state = _state(session, self.sink.name, now, locked=True)
        if state.fence != self.fence:
            raise SinkFenced(
                f"audit sink {self.sink.name}: taken by another shipper (fence {state.fence}, "
                f"this one's {self.fence}): stopped without writing"
            )
        return state

    def _adopt(self, session: Session, state: AuditSinkState) -> None:
        """Move the state and the cursors past whatever the sink holds beyond them (records
        written before a crash, or by this sink under another name or database)."""
        committed = Position(state.seq, state.head_hash, state.segment, state.offset)
        found = self.sink.recover(committed)
        if found == committed:
            return
        now = datetime.now(UTC)
        state.seq, state.head_hash = found.seq, found.head
        state.segment, state.offset, state.updated_at = found.segment, found.offset, now
        for source, last in found.shipped.items():
            if source in TABLES:
                cursor = _cursor(session, source, self.sink.name, now)
                cursor.last_id, cursor.updated_at = max(cursor.last_id, last), now
        log.warning(
            "audit_sink_adopted",
            sink=self.sink.name,
            records=found.adopted,
            seq=found.seq,
            shipped=dict(found.shipped),
        )

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

            def read() -> Sequence[Sequence[Any]]:
                if pages is not None:
                    return pages.read(cursor.last_id)
                return _page(session, table, cursor.last_id, self.batch_size)

            rows = read()
            if rows:
                settled = self._settled(session, source, cursor, rows, now)
                if settled is None:  # a gap may be passed: only with a page read after that
                    fresh = read()
                    take = _contiguous(fresh, cursor.last_id, cursor.gap_upto or 0)
                    settled = self._count_gaps(fresh[:take], cursor.last_id, source)
                rows = settled
            if not rows:
                return False
            state = self._owned(session, now)
            chain = Chain(state.seq, state.head_hash)
            if pages is not None:
                chained, malformed = chain_page(chain, source, rows, self.protector)
            else:
                chained, malformed = [], 0
                for row in rows:
                    rendered = render_values(source, columns, row, self.protector, stamps)
                    malformed += rendered.malformed
                    chained.append(chain.link(rendered.event))
            if malformed:
                self.run.malformed += malformed
                metrics.AUDIT_MALFORMED.labels(source).inc(malformed)
            if self._due(state, now):
                checkpoint = chain.checkpoint(self.key, now, self.sink.name)
                chained.append(checkpoint.line)
                state.last_checkpoint_at = now
                self.run.checkpoints += 1
            # Confirmed by the sink, then (and only then) committed with the cursor.
            # Resolved by reading back: if this commit's answer is lost, the next run adopts
            # the file sink's records past the committed position and moves the cursors; an
            # HTTP sink gets the batch again with the same event_ids, which receivers drop.
            state.segment, state.offset = self.sink.deliver(
                b"".join(chained), state.segment, state.offset, now
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
    ) -> Sequence[Sequence[Any]] | None:
        """The leading ``rows`` that can ship now, in id order with none missing before them;
        None when a gap may be passed now, but only with rows read again (see below).

        On PostgreSQL ids are taken when rows are inserted but seen when they commit: a
        missing id below a committed one may belong to a transaction still running, and
        shipping past it would lose that row. The shipper waits at such a gap until
        ``FLEET_AUDIT_GAP_GRACE`` has passed and every transaction that could still commit
        it has ended; then the id was rolled back, and the gap is passed (and counted).
        SQLite has one writer at a time: its gaps are final when seen.

        ``rows`` were read before that check: a transaction that committed a missing id in
        between is over when checked, yet its row is not among them. So a gap is passed
        only with a page read after the check (the caller reads again on None).
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
            self._before_gap_check()
            running = connection.exec_driver_sql(
                "SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) AS x "
                "WHERE x::text::bigint < %(horizon)s "
                "AND x IS DISTINCT FROM pg_current_xact_id_if_assigned()",
                {"horizon": cursor.gap_horizon_xid},
            ).scalar_one()
            if running:
                return []
            cursor.gap_seen_at = cursor.gap_horizon_xid = None
            return None  # passed, with the page read again
        cursor.gap_upto = int(rows[-1][0])
        cursor.gap_seen_at = cursor.gap_horizon_xid = None
        take = _contiguous(rows, cursor.last_id, cursor.gap_upto)
        return self._count_gaps(rows[:take], cursor.last_id, source)

    def _before_gap_check(self) -> None:
        """A seam between reading a page and checking for running transactions (tests
        commit a transaction here)."""

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

    def _end_signed(self) -> None:
        """Every run ends with a checkpoint of the head (unless the head is one already and
        the interval has not passed): what a run shipped is signed when it ends, and an idle
        sink still gets a checkpoint every interval, so that an archive whose last checkpoint
        is older than the interval has lost its end (``fleet audit verify``)."""
        now = datetime.now(UTC)
        with self.rt.sessions.begin() as session:
            state = self._owned(session, now)
            if state.seq == 0 or (_head_signed(state) and not self._due(state, now)):
                return
            chain = Chain(state.seq, state.head_hash)
            checkpoint = chain.checkpoint(self.key, now, self.sink.name)
            state.segment, state.offset = self.sink.deliver(
                checkpoint.line, state.segment, state.offset, now
            )
            state.seq, state.head_hash = chain.seq, chain.head
            state.last_checkpoint_at = state.updated_at = now
        self.run.checkpoints += 1


def _head_signed(state: AuditSinkState) -> bool:
    """Whether the chain's last record is a checkpoint: a checkpoint is written last in its
    transaction and stamps the state's ``updated_at`` and ``last_checkpoint_at`` alike; any
    later record (or an adoption) moves ``updated_at`` alone."""
    return state.last_checkpoint_at is not None and state.last_checkpoint_at == state.updated_at


def _failure_kind(exc: BaseException) -> str:
    """unavailable (retried next run), unusable (its files do not continue its chain), io
    (disk full, permissions, a missing file), or error (anything else, the database's too)."""
    if isinstance(exc, SinkUnavailable):
        return "unavailable"
    if isinstance(exc, SinkUnusable):
        return "unusable"
    if isinstance(exc, SinkKeyMismatch):
        return "key"
    if isinstance(exc, OSError):
        return "io"
    return "error"


def _record_sink(session: Session, sink: str, up: bool, reason: str | None = None) -> None:
    """Whether the sink took its last batch, for ``fleet exporter`` (which also reads the
    backlog and lag of every sink recorded here, at scrape time)."""
    now = datetime.now(UTC)
    record_health(session, AUDIT_SINK, {sink: 1 if up else 0}, now, details={sink: reason})
