"""``fleet audit verify``: walk a file sink's chain and name the first record that breaks it."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from tasks.audit.events import GENESIS, event_hash, key_id


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
) -> Verdict:
    """Check every record's hash and link. ``from_start``: the first record must be the
    chain's first (seq 1 after the genesis hash), so that a removed beginning shows.
    ``key``: the fleet's key, or several (the current one and older ones, to verify an
    archive across a key rotation); each checkpoint is checked with the key it names."""
    keys = {key_id(k): k for k in ([key] if isinstance(key, bytes) else list(key or []))}
    files = segment_files(paths)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        return Verdict(False, 0, 0, f"{missing[0]}: no such file")
    seq, head, count, checkpoints = (0, GENESIS, 0, 0)
    sink: str | None = None
    first = True
    for where, line in _records(files):
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            return Verdict(False, count, checkpoints, f"{where}: not a JSON record")
        label = f"{where} (seq {event.get('seq')}, {event.get('event_id')})"
        if first and not from_start:
            seq, head = int(event.get("seq", 1)) - 1, str(event.get("prev_hash"))
        first = False
        if event.get("hash") != event_hash(event):
            return Verdict(False, count, checkpoints, f"{label}: altered (its hash does not match)")
        if event.get("seq") != seq + 1:
            return Verdict(
                False,
                count,
                checkpoints,
                f"{label}: expected seq {seq + 1} (a record was removed, reordered or inserted)",
            )
        if event.get("prev_hash") != head:
            return Verdict(
                False,
                count,
                checkpoints,
                f"{label}: does not follow the previous record (removed, reordered or inserted)",
            )
        if event.get("source") == "checkpoint":
            problem = _checkpoint_problem(event, seq, head, keys)
            if problem:
                return Verdict(False, count, checkpoints, f"{label}: {problem}")
            checkpoints += 1
            sink = str(event.get("sink"))
        seq, head = int(event["seq"]), str(event["hash"])
        count += 1
    return Verdict(True, count, checkpoints, head_seq=seq, head_hash=head, sink=sink)


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
