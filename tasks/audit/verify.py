"""``fleet audit verify``: walk a file sink's chain and name the first record that breaks it."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from tasks.audit.events import GENESIS, key_id, line_hash

# Beyond the checkpoint interval, how late the last checkpoint may be before the end of an
# archive counts as cut: a checkpoint comes with the first run (every 30 s by default) after
# the interval has passed.
CHECKPOINT_SLACK = timedelta(minutes=5)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    checkpoints: int
    problem: str | None = None
    head_seq: int = 0
    head_hash: str = GENESIS
    sink: str | None = None  # as its last checkpoint names it


def segment_files(paths: Sequence[Path]) -> list[Path]:
    """Files in chain order: a directory's segments by name, files as given."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(path.glob("*.jsonl")))
        else:
            found.append(path)
    return found


def _records(files: list[Path]) -> Iterator[tuple[str, bytes]]:
    for file in files:
        with open(file, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                yield f"{file}:{number}", line


def verify(
    paths: Sequence[Path],
    key: bytes | Sequence[bytes] | None = None,
    *,
    from_start: bool = True,
    interval: timedelta | None = None,
    as_of: datetime | None = None,
) -> Verdict:
    """Check every record's hash and link. ``from_start``: the first record must be the
    chain's first (seq 1 after the genesis hash), so that a removed beginning shows.
    ``key``: the fleet's key, or several (the current one and older ones, to verify an
    archive across a key rotation); each checkpoint is checked with the key it names.

    ``interval`` (the fleet's checkpoint interval) and ``as_of`` (when the archive was
    read; default now): every shipping run ends with a checkpoint, and one is written at
    least every interval, so an archive whose last checkpoint is older than the interval
    (plus :data:`CHECKPOINT_SLACK`), or that has records and no checkpoint at all, lost its
    end: a tail cut, a cut before the last checkpoint, or a rewrite by someone without the
    key (who must drop the checkpoints after what they changed). The first record after the
    last checkpoint is named."""
    keys = {key_id(k): k for k in ([key] if isinstance(key, bytes) else list(key or []))}
    files = segment_files(paths)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        return Verdict(False, 0, 0, f"{missing[0]}: no such file")
    seq, head, count, checkpoints = (0, GENESIS, 0, 0)
    sink: str | None = None
    first = True
    signed_at: str | None = None  # the last checkpoint's time
    unsigned: str | None = None  # the first record after it
    for where, line in _records(files):
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            return Verdict(False, count, checkpoints, f"{where}: not a JSON record")
        label = f"{where} (seq {event.get('seq')}, {event.get('event_id')})"
        if first and not from_start:
            seq, head = int(event.get("seq", 1)) - 1, str(event.get("prev_hash"))
        first = False
        checkpoint = event.get("source") == "checkpoint"
        problem = _link_problem(event, line, seq, head) or (
            _checkpoint_problem(event, seq, head, keys) if checkpoint else None
        )
        if problem:
            return Verdict(False, count, checkpoints, f"{label}: {problem}")
        if checkpoint:
            checkpoints += 1
            sink = str(event.get("sink"))
            signed_at, unsigned = str(event.get("signed_at")), None
        elif unsigned is None:
            unsigned = label
        seq, head = int(event["seq"]), str(event["hash"])
        count += 1
    if interval is not None and count:
        problem = _end_problem(signed_at, unsigned, interval, as_of)
        if problem:
            return Verdict(False, count, checkpoints, problem, seq, head, sink)
    return Verdict(True, count, checkpoints, head_seq=seq, head_hash=head, sink=sink)


def _link_problem(event: dict[str, Any], line: bytes, seq: int, head: str) -> str | None:
    stated = line_hash(line)
    if stated is None or event.get("hash") != stated:
        return "altered (its hash does not match)"
    if event.get("seq") != seq + 1:
        return f"expected seq {seq + 1} (a record was removed, reordered or inserted)"
    if event.get("prev_hash") != head:
        return "does not follow the previous record (removed, reordered or inserted)"
    return None


def _end_problem(
    signed_at: str | None, unsigned: str | None, interval: timedelta, as_of: datetime | None
) -> str | None:
    """What is wrong with the archive's end, judged by its last checkpoint's age."""
    if signed_at is None:
        return (
            f"{unsigned}: no checkpoint signs any record: the archive was rewritten (or its "
            "checkpoints removed)"
        )
    try:
        when = datetime.fromisoformat(signed_at)
    except ValueError:
        return f"a checkpoint's time {signed_at!r} is not a time"
    age = (as_of or datetime.now(when.tzinfo)) - when
    if age <= interval + CHECKPOINT_SLACK:
        return None
    after = (
        f"{unsigned}, the first record after it, and what follows are unsigned: "
        if unsigned
        else ""
    )
    return (
        f"{after}the last checkpoint was signed at {signed_at}, {_span(age)} before "
        f"{'the time given' if as_of else 'now'}, and one is written every {_span(interval)}: "
        "the end of the archive was cut (or the shipper has not run since)"
    )


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


def against_state(verdict: Verdict, rt: Any, sink: str | None) -> tuple[Verdict, str | None]:
    """Compare the archive's end with the sink's chain head in the database: an archive
    behind it had records cut from its end (a tail cut, or a cut before the last
    checkpoint, which the links alone cannot show). Returns the verdict and the sink
    compared (None when there was nothing to compare with)."""
    from workers.db.models import AuditSinkState

    name = sink or verdict.sink
    if name is None:
        return verdict, None
    try:
        with rt.sessions() as session:
            state = session.get(AuditSinkState, name)
    except Exception:  # no database here (or not the fleet's): nothing to compare with
        return verdict, None
    if state is None:
        return verdict, None
    if state.seq > verdict.head_seq:
        problem = (
            f"the end: the archive stops at seq {verdict.head_seq}, the database's state of "
            f"sink {name} is at seq {state.seq}: records were cut from the end"
        )
        return replace(verdict, ok=False, problem=problem), name
    if state.seq == verdict.head_seq and state.head_hash != verdict.head_hash:
        problem = f"seq {state.seq}: the archive's last record is not the one sink {name} wrote"
        return replace(verdict, ok=False, problem=problem), name
    return verdict, name


def _checkpoint_problem(
    event: dict[str, object], seq: int, head: str, keys: dict[str, bytes]
) -> str | None:
    if event.get("signed_seq") != seq or event.get("signed_hash") != head:
        return "checkpoint does not sign the record before it"
    if not keys:
        return None
    named = event.get("key_id")
    if named is not None and named not in keys:
        return f"checkpoint signature is wrong: signed with key {named}, not among the keys given"
    candidates = [keys[str(named)]] if named is not None else list(keys.values())
    parts = (event.get(name) for name in ("sink", "signed_seq", "signed_hash", "signed_at"))
    signed = ":".join(str(part) for part in parts).encode()
    for candidate in candidates:
        expected = hmac.new(candidate, signed, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, str(event.get("hmac"))):
            return None
    return "checkpoint signature is wrong (forged, or another key)"
