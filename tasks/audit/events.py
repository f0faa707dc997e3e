"""The pure core of audit shipping: rows become events, events become a hash chain.

An event is the row as JSON (metadata parsed, sensitive values replaced by an HMAC), with
``event_id`` (``source:id``, stable, for receivers to drop repeats), and its place in the
sink's chain: ``seq``, ``prev_hash`` and ``hash`` = SHA-256 of the canonical JSON of the
event without ``hash``. Changing, removing, reordering or inserting any event breaks the
chain from there on; checkpoint records sign the head with HMAC-SHA256.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

GENESIS = "0" * 64
SOURCES = ("configuration_audit_log", "feature_flag_audit_log", "fleet_audit_log")
# Keys whose values are the configuration value itself: hashed when the row is sensitive.
VALUE_KEYS = frozenset({"value", "old_value", "new_value", "previous_value", "data"})
DEFAULT_SENSITIVE_KEYS = (
    "*password*",
    "*secret*",
    "*token*",
    "*api_key*",
    "*apikey*",
    "*private_key*",
    "*credential*",
)


def canonical(document: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes the chain hashes."""
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def event_hash(event: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in event.items() if k != "hash"})).hexdigest()


class Protector:
    """Replaces sensitive values with ``hmac-sha256:<hex>`` (the same value always gives the
    same digest, so equal values can still be matched, never read)."""

    def __init__(self, key: bytes, sensitive_keys: Sequence[str] = DEFAULT_SENSITIVE_KEYS) -> None:
        self._key = key
        pattern = "|".join(f"(?:{fnmatch.translate(p)})" for p in sensitive_keys)
        self._keys = re.compile(pattern, re.IGNORECASE) if sensitive_keys else None
        # The words of the key globs: a metadata text containing none of them has no key
        # to hide, and is shipped without walking it.
        self._words = tuple(
            sorted(
                {part.lower() for p in sensitive_keys for part in re.split(r"[*?\[\]]", p) if part}
            )
        )

    def needs_walk(self, raw: str, sensitive: bool) -> bool:
        if sensitive:
            return True
        text = raw.lower()
        for word in self._words:  # noqa: SIM110 - a loop is 2x faster than any() here
            if word in text:
                return True
        return False

    def digest(self, value: Any) -> str:
        raw = value if isinstance(value, str) else orjson.dumps(value).decode()
        return "hmac-sha256:" + hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()

    def protect(self, value: Any, sensitive: bool, key: str | None = None) -> Any:
        if key is not None and (
            (self._keys is not None and self._keys.match(key)) or (sensitive and key in VALUE_KEYS)
        ):
            return None if value is None else self.digest(value)
        if isinstance(value, dict):
            return {k: self.protect(v, sensitive, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.protect(v, sensitive) for v in value]
        return value


@dataclass(frozen=True)
class Rendered:
    event: dict[str, Any]
    malformed: bool


def render(source: str, row: Mapping[Any, Any], protector: Protector) -> Rendered:
    """One source row as an event, before chaining. Never raises on a bad row: a metadata
    text that is not JSON ships in ``raw`` with an ``error``."""
    return render_values(source, list(row.keys()), tuple(row.values()), protector)


def render_values(
    source: str,
    columns: Sequence[str],
    values: Sequence[Any],
    protector: Protector,
    stamps: Sequence[str] | None = None,
) -> Rendered:
    """:func:`render` for a row as a tuple in ``columns`` order (the batch path);
    ``stamps``: the columns that hold datetimes, when known (else every value is looked at)."""
    event: dict[str, Any] = dict(zip(columns, values, strict=True))
    metadata = event.pop("metadata", None)
    sensitive = bool(event.get("sensitive"))
    for name in stamps if stamps is not None else list(event):
        value = event.get(name)
        if type(value) is datetime:
            event[name] = value.isoformat()
    event["event_id"] = f"{source}:{event['id']}"
    event["source"] = source
    return _with_metadata(event, metadata, sensitive, protector)


def render_document(
    source: str, document: str | bytes, metadata: Any, protector: Protector
) -> Rendered:
    """:func:`render_values` for a row that PostgreSQL rendered as a JSON object (every
    column but ``metadata``, timestamps already in ISO 8601): the same event."""
    event: dict[str, Any] = orjson.loads(document)
    event["event_id"] = f"{source}:{event['id']}"
    event["source"] = source
    return _with_metadata(event, metadata, bool(event.get("sensitive")), protector)


def _with_metadata(
    event: dict[str, Any], metadata: Any, sensitive: bool, protector: Protector
) -> Rendered:
    if isinstance(metadata, str):
        try:
            parsed = orjson.loads(metadata)
        except orjson.JSONDecodeError:
            event["raw"] = protector.digest(metadata) if sensitive else metadata
            event["error"] = "metadata is not valid JSON"
            return Rendered(event, True)
        event["metadata"] = (
            protector.protect(parsed, sensitive)
            if protector.needs_walk(metadata, sensitive)
            else parsed
        )
    else:
        event["metadata"] = protector.protect(metadata, sensitive)
    return Rendered(event, False)


@dataclass(frozen=True)
class Checkpoint:
    event: dict[str, Any]
    line: bytes


class Chain:
    """A sink's chain head; :meth:`link` appends an event (or a checkpoint)."""

    def __init__(self, seq: int, head: str) -> None:
        self.seq = seq
        self.head = head

    def link(self, event: dict[str, Any]) -> bytes:
        """Chain ``event`` (it gains ``seq``, ``prev_hash``, ``hash``); returns its line.

        The hash covers the canonical JSON of everything but ``hash``; the line is those
        same bytes with ``hash`` appended (a record need not be canonical, only what is
        hashed), so each event is serialized once.
        """
        self.seq += 1
        event["seq"] = self.seq
        event["prev_hash"] = self.head
        event.pop("hash", None)
        body = canonical(event)
        event["hash"] = self.head = hashlib.sha256(body).hexdigest()
        return b'%s,"hash":"%s"}\n' % (body[:-1], self.head.encode())

    def checkpoint(self, key: bytes, now: datetime, sink: str) -> Checkpoint:
        """A record signing the head so far, chained like any event; it names the key."""
        signed = f"{sink}:{self.seq}:{self.head}:{now.isoformat()}"
        event = {
            "event_id": f"checkpoint:{sink}:{self.seq + 1}",
            "source": "checkpoint",
            "sink": sink,
            "key_id": key_id(key),
            "signed_seq": self.seq,
            "signed_hash": self.head,
            "signed_at": now.isoformat(),
            "hmac": hmac.new(key, signed.encode(), hashlib.sha256).hexdigest(),
        }
        return Checkpoint(event, self.link(event))


def key_id(key: bytes) -> str:
    """A key's public name: which key signed a checkpoint, without revealing it."""
    return "k-" + hashlib.sha256(b"config-fleet audit key id:" + key).hexdigest()[:12]


def lines(events: Iterable[Mapping[str, Any]]) -> bytes:
    """Records already chained, as lines (their ``hash`` last)."""
    out = []
    for event in events:
        body = canonical({k: v for k, v in event.items() if k != "hash"})
        out.append(b'%s,"hash":"%s"}\n' % (body[:-1], str(event["hash"]).encode()))
    return b"".join(out)
