"""Audit events and their chain, by tables: canonical JSON, hashing, protection of
sensitive values, malformed rows, and tampering of every kind caught by verify."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from tasks.audit.events import (
    GENESIS,
    Chain,
    Protector,
    canonical,
    event_hash,
    hashed_bytes,
    iso_utc,
    line_hash,
    lines,
    render,
)
from tasks.audit.verify import CHECKPOINT_SLACK, verify

KEY = b"audit-test-key"
NOW = datetime(2026, 5, 1, 12, tzinfo=UTC)


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical({"b": 1, "a": [1, "é"], "c": None}) == '{"a":[1,"é"],"b":1,"c":null}'.encode()


def test_the_hash_covers_everything_but_itself() -> None:
    event = {"seq": 1, "prev_hash": GENESIS, "x": 1}
    digest = event_hash(event)
    assert event_hash({**event, "hash": "anything"}) == digest
    assert event_hash({**event, "x": 2}) != digest


def test_a_chain_links_each_event_to_the_one_before() -> None:
    chain = Chain(0, GENESIS)
    first, second = {"a": 1}, {"a": 2}
    line = chain.link(first)
    chain.link(second)
    assert orjson.loads(line) == first
    assert (first["seq"], first["prev_hash"]) == (1, GENESIS)
    assert (second["seq"], second["prev_hash"]) == (2, first["hash"])
    assert (chain.seq, chain.head) == (2, second["hash"])


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"value": "v", "password": "p", "note": "n"},
            {"value": "v", "password": "H", "note": "n"},
        ),
        (
            {"nested": {"api_key": "k", "ok": [{"token": "t"}]}},
            {"nested": {"api_key": "H", "ok": [{"token": "H"}]}},
        ),
    ],
)
def test_secret_looking_keys_are_always_hashed(
    row: dict[str, Any], expected: dict[str, Any]
) -> None:
    protected = Protector(KEY).protect(row, sensitive=False)
    assert _shape(protected) == expected


def test_sensitive_rows_have_their_values_hashed_too() -> None:
    protector = Protector(KEY)
    protected = protector.protect({"value": "gpt-4", "old_value": 3, "key": "model"}, True)
    assert protected["key"] == "model"
    assert protected["value"] == protector.digest("gpt-4")
    assert protected["value"].startswith("hmac-sha256:") and len(protected["value"]) == 12 + 64
    assert protected["old_value"] == protector.digest(3)
    assert Protector(b"another-key").digest("gpt-4") != protected["value"]


def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return "H" if isinstance(value, str) and value.startswith("hmac-sha256:") else value


def test_render_a_row() -> None:
    row = {
        "id": 7,
        "action": "SET",
        "timestamp": NOW,
        "sensitive": False,
        "metadata": json.dumps({"checksum": "abc"}),
    }
    event = render("configuration_audit_log", row, Protector(KEY)).event
    assert event == {
        "event_id": "configuration_audit_log:7",
        "source": "configuration_audit_log",
        "id": 7,
        "action": "SET",
        "timestamp": NOW.isoformat(),
        "sensitive": False,
        "metadata": {"checksum": "abc"},
    }


@pytest.mark.parametrize("sensitive", [False, True])
def test_a_malformed_row_ships_raw_with_an_error(sensitive: bool) -> None:
    row = {"id": 8, "timestamp": NOW, "sensitive": sensitive, "metadata": "{not json"}
    rendered = render("configuration_audit_log", row, Protector(KEY))
    assert rendered.malformed
    assert rendered.event["error"] == "metadata is not valid JSON"
    assert "metadata" not in rendered.event
    assert (rendered.event["raw"] == "{not json") is (not sensitive)


def write_chain(directory: Path, count: int = 10, checkpoint_at: int = 5) -> list[dict[str, Any]]:
    chain = Chain(0, GENESIS)
    events = []
    for i in range(1, count + 1):
        event = {"event_id": f"s:{i}", "source": "s", "id": i}
        chain.link(event)
        events.append(event)
        if i == checkpoint_at:
            events.append(chain.checkpoint(KEY, NOW, "archive").event)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "audit-20260501-000001.jsonl").write_bytes(lines(events[:6]))
    (directory / "audit-20260501-000002.jsonl").write_bytes(lines(events[6:]))
    return events


def test_an_untouched_chain_verifies(tmp_path: Path) -> None:
    write_chain(tmp_path)
    verdict = verify([tmp_path], KEY)
    assert (verdict.ok, verdict.records, verdict.checkpoints, verdict.head_seq) == (True, 11, 1, 11)


def _tamper(directory: Path, how: str) -> None:
    second = directory / "audit-20260501-000002.jsonl"
    records = second.read_bytes().splitlines(keepends=True)
    if how == "altered":
        event = orjson.loads(records[1])
        event["id"] = 999
        records[1] = orjson.dumps(event) + b"\n"
    elif how == "altered and rehashed":
        event = orjson.loads(records[1])
        event["id"] = 999
        event["hash"] = event_hash(event)
        records[1] = orjson.dumps(event) + b"\n"
    elif how == "removed":
        del records[1]
    elif how == "reordered":
        records[0], records[1] = records[1], records[0]
    elif how == "inserted":
        records.insert(1, records[1])
    elif how == "first file removed":
        (directory / "audit-20260501-000001.jsonl").unlink()
    elif how == "forged checkpoint":
        first = directory / "audit-20260501-000001.jsonl"
        head = first.read_bytes().splitlines(keepends=True)
        event = orjson.loads(head[5])
        event["hmac"] = "0" * 64
        event["hash"] = event_hash(event)
        head[5] = orjson.dumps(event) + b"\n"
        first.write_bytes(b"".join(head))
    elif how == "not json":
        records[2] = b"{garbage\n"
    second.write_bytes(b"".join(records))


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("altered", "altered (its hash does not match)"),
        ("altered and rehashed", "does not follow the previous record"),
        ("removed", "expected seq 8"),
        ("reordered", "expected seq 7"),
        ("inserted", "expected seq 9"),
        ("first file removed", "expected seq 1"),
        ("forged checkpoint", "checkpoint signature is wrong"),
        ("not json", "not a JSON record"),
    ],
)
def test_tampering_of_every_kind_is_named(tmp_path: Path, how: str, problem: str) -> None:
    write_chain(tmp_path)
    _tamper(tmp_path, how)
    verdict = verify([tmp_path], KEY)
    assert not verdict.ok
    assert verdict.problem is not None and problem in verdict.problem, verdict.problem


def test_a_rechained_forgery_is_caught_only_by_the_checkpoint_key(tmp_path: Path) -> None:
    """Someone who rewrites the tail and recomputes every hash escapes the hash checks;
    the checkpoint's HMAC, made with a key they do not have, still names the forgery."""
    forged = Chain(0, GENESIS)
    rewritten = b"".join(
        forged.link({"event_id": f"s:{i}", "source": "s", "id": 99 if i == 2 else i})
        for i in range(1, 4)
    )
    rewritten += forged.checkpoint(b"the-forger's-key", NOW, "archive").line
    (tmp_path / "audit-20260501-000001.jsonl").write_bytes(rewritten)
    assert verify([tmp_path], None).ok
    verdict = verify([tmp_path], KEY)
    assert not verdict.ok and "checkpoint signature is wrong" in (verdict.problem or "")


def test_partial_verification_starts_mid_chain(tmp_path: Path) -> None:
    write_chain(tmp_path)
    later = tmp_path / "audit-20260501-000002.jsonl"
    assert not verify([later], KEY).ok
    assert verify([later], KEY, from_start=False).ok


# The end of the archive: every run ends with a checkpoint, one comes every interval -------

HOUR = timedelta(hours=1)


def write_hours(directory: Path) -> None:
    """Three runs an hour apart, each ending with a checkpoint, and an idle hour's
    checkpoint after them (as the shipper writes them)."""
    chain, out = Chain(0, GENESIS), []
    for run in range(3):
        out += [chain.link({"event_id": f"s:{run}{i}", "source": "s"}) for i in range(3)]
        out.append(chain.checkpoint(KEY, NOW + run * HOUR, "archive").line)
    out.append(chain.checkpoint(KEY, NOW + 3 * HOUR, "archive").line)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "audit-20260501-000001.jsonl").write_bytes(b"".join(out))


def _cut(directory: Path, lines_kept: int) -> None:
    path = directory / "audit-20260501-000001.jsonl"
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:lines_kept]))


@pytest.mark.parametrize(
    ("kept", "problem"),
    [
        (13, None),  # untouched: its last checkpoint is 10 minutes old
        (12, "the last checkpoint was signed at 2026-05-01T14:00:00+00:00, 1 h 10 min before"),
        (11, "(seq 9, s:20), the first record after it, and what follows are unsigned"),
        (7, "(seq 5, s:10), the first record after it"),  # cut before a run's checkpoint
        (3, "(seq 1, s:00): no checkpoint signs any record"),
    ],
)
def test_an_archive_whose_end_was_cut_is_caught_without_the_database(
    tmp_path: Path, kept: int, problem: str | None
) -> None:
    write_hours(tmp_path)
    _cut(tmp_path, kept)
    verdict = verify([tmp_path], KEY, interval=HOUR, as_of=NOW + 3 * HOUR + timedelta(minutes=10))
    assert verdict.ok is (problem is None)
    assert problem is None or problem in (verdict.problem or ""), verdict.problem


def test_the_end_is_judged_as_of_the_time_given(tmp_path: Path) -> None:
    write_hours(tmp_path)
    later = NOW + 4 * HOUR + CHECKPOINT_SLACK
    assert verify([tmp_path], KEY, interval=HOUR, as_of=later).ok  # just in time
    late = verify([tmp_path], KEY, interval=HOUR, as_of=later + timedelta(seconds=1))
    assert not late.ok and "or the shipper has not run since" in (late.problem or "")
    assert verify([tmp_path], KEY).ok  # no interval given: links and signatures only


# Records hashed as written; the hot path's pieces ----------------------------------------


def test_a_record_is_hashed_as_written() -> None:
    """Not only canonical lines: any JSON object whose last field is the hash of the bytes
    before it (the PostgreSQL-rendered records of the hot path)."""
    body = b'{"seq":1,"prev_hash":"%s","id" : 1, "x" : "a b"}' % GENESIS.encode()
    digest = hashlib.sha256(body).hexdigest()
    line = body[:-1] + b',"hash":"%s"}\n' % digest.encode()
    assert hashed_bytes(line) == (body, digest)
    assert line_hash(line) == digest
    assert line_hash(line.replace(b"a b", b"a c")) is None  # edited
    assert line_hash(line.replace(b'"hash":"', b'"hush":"')) is None  # no hash field
    assert hashed_bytes(b'{"hash":"short"}\n') is None
    chain = Chain(0, GENESIS)
    canonical_line = chain.link({"event_id": "s:1", "source": "s"})
    assert line_hash(canonical_line) == chain.head  # the canonical lines too


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(2026, 3, 1, 12, tzinfo=UTC), "2026-03-01T12:00:00+00:00"),
        (datetime(2026, 3, 1, 12, 0, 0, 120000, tzinfo=UTC), "2026-03-01T12:00:00.12+00:00"),
        (datetime(2026, 3, 1, 12, 0, 0, 7, tzinfo=UTC), "2026-03-01T12:00:00.000007+00:00"),
        (datetime(2026, 3, 1, 12), "2026-03-01T12:00:00+00:00"),  # naive: taken as UTC
        (
            datetime(2026, 3, 1, 14, 0, 0, 500000, tzinfo=timezone(timedelta(hours=2))),
            "2026-03-01T12:00:00.5+00:00",
        ),
    ],
)
def test_times_are_written_as_postgresql_writes_them_in_json(value: datetime, text: str) -> None:
    assert iso_utc(value) == text


@pytest.mark.parametrize(
    ("metadata", "as_is"),
    [
        (b'{"who": "admin", "n": 1}', True),
        (b'{"who": "the password is x"}', True),  # values do not matter, keys do
        (b'{"db_password": "x"}', False),
        (b'{"pass\\u0077ord": "x"}', False),  # an escape spelling a sensitive key
        (b'{"outer": {"who": 1}}', False),  # nested: walked
        (b'["a"]', False),
        (b"{oops", False),
    ],
)
def test_metadata_ships_as_is_only_with_nothing_to_protect(metadata: bytes, as_is: bool) -> None:
    protector = Protector(KEY)
    for _ in range(2):  # decided, then remembered
        assert (protector.as_is(metadata) == metadata) is as_is


@pytest.mark.parametrize(
    ("globs", "texts", "plain"),
    [
        (("*password*",), [b'{"who": 1}', b'{"n": 2}'], True),
        (("*password*",), [b'{"who": 1}', b'{"DB_PASSWORD": 2}'], False),  # any case
        (("*password*",), [b'{"pass\\u0077ord": 1}'], False),  # an escape may spell a key
        (("*password*",), ['{"pässword": 1}'.encode()], False),  # beyond ASCII
        (("*password*",), [b'{\n"who": 1}'], False),  # a line break: compacted one by one
        (("pass[wW]ord",), [b'{"password": 1}'], False),  # a class is no word
        (("[abc]",), [b'{"a": 1}'], False),  # a glob with no word: every page walked
        (("*",), [b'{"who": 1}'], False),
        ((), [b'{"who": 1}'], True),
    ],
)
def test_a_page_skips_the_walk_only_when_no_key_can_be_sensitive(
    globs: tuple[str, ...], texts: list[bytes], plain: bool
) -> None:
    protector = Protector(KEY, globs)
    assert protector.plain_page(texts) is plain
    if not plain and protector.words is None:
        assert protector.needs_walk(texts[0], False)


def test_metadata_over_several_lines_ships_on_one() -> None:
    assert Protector(KEY).as_is(b'{\n "a": 1,\r\n "b": 2}') == b'{"a":1,"b":2}'
