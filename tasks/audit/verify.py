"""``fleet audit verify``: walk a file sink's chain and name the first record that breaks it."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from tasks.audit.events import GENESIS, event_hash


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    checkpoints: int
    problem: str | None = None
    head_seq: int = 0
    head_hash: str = GENESIS


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


def verify(paths: Sequence[Path], key: bytes | None = None, *, from_start: bool = True) -> Verdict:
    """Check every record's hash and link. ``from_start``: the first record must be the
    chain's first (seq 1 after the genesis hash), so that a removed beginning shows."""
    files = segment_files(paths)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        return Verdict(False, 0, 0, f"{missing[0]}: no such file")
    seq, head, count, checkpoints = (0, GENESIS, 0, 0)
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
            problem = _checkpoint_problem(event, seq, head, key)
            if problem:
                return Verdict(False, count, checkpoints, f"{label}: {problem}")
            checkpoints += 1
        seq, head = int(event["seq"]), str(event["hash"])
        count += 1
    return Verdict(True, count, checkpoints, head_seq=seq, head_hash=head)


def _checkpoint_problem(
    event: dict[str, object], seq: int, head: str, key: bytes | None
) -> str | None:
    if event.get("signed_seq") != seq or event.get("signed_hash") != head:
        return "checkpoint does not sign the record before it"
    if key is None:
        return None
    parts = (event.get(name) for name in ("sink", "signed_seq", "signed_hash", "signed_at"))
    signed = ":".join(str(part) for part in parts)
    expected = hmac.new(key, signed.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(event.get("hmac"))):
        return "checkpoint signature is wrong (forged, or another key)"
    return None
