"""Reading a source table for a sink: pages in id order from a cursor, contiguous up to
the first gap, rendered to JSON by PostgreSQL and read ahead on a connection of their own."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import psycopg
from psycopg import sql
from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from workers.db.models import AUDIT_SOURCE_TABLES
from workers.runtime import Runtime

TABLES: dict[str, Table] = AUDIT_SOURCE_TABLES


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


def _page_query(table: Table) -> sql.Composed:
    """PostgreSQL: the next rows after id ``%s`` (at most ``%s``) as ``(id, metadata,
    sensitive, document)``, texts as UTF-8 bytes: the document is every other column,
    ``event_id`` and ``source``, as one JSON object that PostgreSQL renders (on its own core,
    while this process ships the page before)."""
    # The document is row_to_json of a row built per page row (LATERAL): ``id``, the other
    # columns but ``metadata`` in table order, ``event_id`` and ``source``, compact; it
    # renders in about two thirds of the time json_build_object takes with as many pairs.
    fields: list[sql.Composable] = [
        sql.SQL("page.{0} AS {0}").format(sql.Identifier(column.name))
        for column in table.c
        if column.name != "metadata"
    ]
    fields += [
        sql.SQL("{} || page.id AS event_id").format(sql.Literal(f"{table.name}:")),
        sql.SQL("{} AS source").format(sql.Literal(table.name)),
    ]
    sensitive = sql.SQL("page.sensitive" if "sensitive" in table.c else "false")
    # Texts as bytea, results in binary: the bytes as PostgreSQL wrote them, never decoded.
    # The page is chosen first, then rendered: however the planner reads the table (an
    # index scan, or a scan and a sort when its statistics are off), only the page's rows
    # are rendered.
    return sql.SQL(
        "SELECT page.id, convert_to(page.metadata::text, 'UTF8'), {}, "
        "convert_to(row_to_json(document)::text, 'UTF8') FROM "
        "(SELECT * FROM {} WHERE id > %s ORDER BY id LIMIT %s) AS page, "
        "LATERAL (SELECT {}) AS document ORDER BY page.id"
    ).format(sensitive, sql.Identifier(table.name), sql.SQL(", ").join(fields))


class _Pages:
    """A source's pages on PostgreSQL, on a connection of their own: while one page is
    shipped, the next (after its last id) is read in a thread. A page asked for after any
    other id (a gap stopped the batch short) is read then, and the one read ahead dropped.
    Reading ahead is safe: audit rows are only ever appended, and the shipper holds the
    sink's lock, so nothing but this run moves its cursors.

    The connection reads in autocommit (no transaction is left open between pages, and a
    page costs one round trip) with its time zone UTC, as PostgreSQL's JSON writes the
    timestamps the Python path renders (see events.iso_utc); both are undone on close."""

    def __init__(self, rt: Runtime, table: Table, batch_size: int) -> None:
        self.table = table
        self.batch_size = batch_size
        self.pooled = rt.engine.raw_connection()
        self.connection = cast("psycopg.Connection[Any]", self.pooled.driver_connection)
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="audit-read-ahead")
        self.ahead: tuple[int, Future[Sequence[Sequence[Any]]]] | None = None
        self.closed = False
        try:
            self.connection.rollback()
            self.connection.autocommit = True
            self.connection.execute("SET TIME ZONE 'UTC'")
            self.query = _page_query(table).as_bytes(self.connection)
        except BaseException:
            self._release(reusable=False)
            raise

    def read(self, after: int) -> Sequence[Sequence[Any]]:
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == after:
            rows = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].exception()  # wait for it: the connection is shared
            rows = self._page(after)
        if len(rows) == self.batch_size:
            last = int(rows[-1][0])
            self.ahead = (last, self.reader.submit(self._page, last))
        return rows

    def _page(self, after: int) -> Sequence[Sequence[Any]]:
        with self.connection.cursor(binary=True) as cursor:
            cursor.execute(self.query, (after, self.batch_size))
            rows: Sequence[Sequence[Any]] = cursor.fetchall()
        return rows

    def close(self) -> None:
        """Safe to call again. The read ahead is waited for (the connection is shared); if
        that wait is interrupted, the connection is dropped instead of going back to the pool."""
        if self.closed:
            return
        self.closed = True
        reusable = False
        try:
            if self.ahead is not None:
                self.ahead[1].exception()  # wait for it: the connection is shared
            reusable = True
        finally:
            self._release(reusable=reusable)

    def _release(self, *, reusable: bool) -> None:
        """Back to the pool as it came, or dropped when that cannot be done."""
        self.reader.shutdown(wait=True)
        try:
            if reusable:
                self.connection.execute("RESET TIME ZONE")
                self.connection.autocommit = False
            else:
                self.pooled.invalidate()
        except Exception:  # a broken connection: the pool drops it instead of reusing it
            self.pooled.invalidate()
        finally:
            self.pooled.close()
