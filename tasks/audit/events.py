"""The pure core of audit shipping: rows become events, events become a hash chain.

An event is the row as JSON (metadata parsed, sensitive values replaced by an HMAC), with
``event_id`` (``source:id``, stable, for receivers to drop repeats), and its place in the
sink's chain: ``seq``, ``prev_hash`` and ``hash``. A record is one line, a JSON object whose
last field is ``"hash":"<64 hex>"``; the hash is the SHA-256 of the line's bytes without that
field (``{...,"x":1,"hash":"..."}`` hashes ``{...,"x":1}``): see :func:`hashed_bytes`. Records
chained from a Python dict are written as canonical JSON (sorted keys, compact), so that
:func:`event_hash` of the parsed record gives the same hash; records rendered by PostgreSQL
are hashed as written. Changing, removing, reordering or inserting any record breaks the
chain from there on; checkpoint records sign the head with HMAC-SHA256.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
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
    """The hash of a record written from ``event`` as canonical JSON."""
    return hashlib.sha256(canonical({k: v for k, v in event.items() if k != "hash"})).hexdigest()


_HASH_FIELD = b',"hash":"'
_HASH_TAIL = len(_HASH_FIELD) + 64 + 2  # ,"hash":"<64 hex>"}


def hashed_bytes(line: bytes) -> tuple[bytes, str] | None:
    """A record line's hashed bytes (the object without its last field, ``hash``) and the
    hash it states; None when the line does not end with a ``hash`` field."""
    line = line.rstrip(b"\n")
    if len(line) <= _HASH_TAIL or not line.endswith(b'"}'):
        return None
    cut = len(line) - _HASH_TAIL
    if line[cut : cut + len(_HASH_FIELD)] != _HASH_FIELD:
        return None
    return line[:cut] + b"}", line[cut + len(_HASH_FIELD) : -2].decode("ascii", "replace")


def line_hash(line: bytes) -> str | None:
    """The hash a record line states, if its bytes have that hash; else None."""
    parts = hashed_bytes(line)
    if parts is None or hashlib.sha256(parts[0]).hexdigest() != parts[1]:
        return None
    return parts[1]


class Protector:
    """Replaces sensitive values with ``hmac-sha256:<hex>`` (the same value always gives the
    same digest, so equal values can still be matched, never read)."""

    def __init__(self, key: bytes, sensitive_keys: Sequence[str] = DEFAULT_SENSITIVE_KEYS) -> None:
        self._key = key
        pattern = "|".join(f"(?:{fnmatch.translate(p)})" for p in sensitive_keys)
        self._keys = re.compile(pattern, re.IGNORECASE) if sensitive_keys else None
        self._plain: dict[tuple[str, ...], bool] = {}  # keys -> none of them is sensitive
        self._secret_keys: dict[str, bool] = {}
        # The words of the key globs: a metadata text containing none of them (in any case)
        # has no key to hide, and is shipped without walking it. A word is a glob's literal
        # part outside any ``[...]`` class, so every key the glob matches contains it; a glob
        # with no such part (``*``, ``[abc]``) can match a key holding no word: then every
        # text is walked (``words`` is None).
        words: set[bytes] = set()
        for glob in sensitive_keys:
            parts = [p for p in re.split(r"[*?]", re.sub(r"\[[^\]]*\]", "*", glob)) if p]
            if not parts:
                self.words: tuple[bytes, ...] | None = None
                break
            words.update(part.lower().encode() for part in parts)
        else:
            self.words = tuple(sorted(words))

    def needs_walk(self, raw: str | bytes, sensitive: bool) -> bool:
        """Whether ``raw`` (metadata text) may hold a key to protect: it is sensitive, or
        contains a key word in any case, or a backslash (an escape may spell a key), or
        anything beyond ASCII (where case rules differ)."""
        if sensitive:
            return True
        if isinstance(raw, str):
            raw = raw.encode()
        if b"\\" in raw or not raw.isascii():
            return True
        if self.words is None:
            return True
        text = raw.lower()
        for word in self.words:  # noqa: SIM110 - a loop is 2x faster than any() here
            if word in text:
                return True
        return False

    def plain_page(self, texts: Iterable[bytes]) -> bool:
        """Whether none of ``texts`` (metadata of rows that are not sensitive) can hold a
        sensitive key or a line break, checked on the page at once as :meth:`needs_walk`
        checks one text: then each that is a JSON object of scalars ships as stored, and
        only its shape is left to check (:func:`flat_object`)."""
        joined = b"\x00".join(texts)
        if b"\n" in joined or b"\r" in joined:
            return False  # compacted by as_is
        return not self.needs_walk(joined, False)

    def as_is(self, metadata: bytes) -> bytes | None:
        """Metadata text of a row that is not sensitive, as it may ship unchanged: when it
        is a JSON object of scalars none of whose keys is sensitive (compacted when it spans
        lines: one record, one line); else None (walk it, or ship it as malformed). Decided
        on the decoded keys, as :meth:`protect` does, and remembered per set of keys."""
        try:
            parsed = orjson.loads(metadata)
        except orjson.JSONDecodeError:
            return None
        if type(parsed) is not dict:
            return None
        for value in parsed.values():
            if type(value) is dict or type(value) is list:
                return None
        keys = tuple(parsed)
        plain = self._plain.get(keys)
        if plain is None:
            if len(self._plain) >= 4096:
                self._plain.clear()
            plain = self._plain[keys] = not any(self._secret(k) for k in keys)
        if not plain:
            return None
        if b"\n" in metadata or b"\r" in metadata:
            return orjson.dumps(parsed)
        return metadata

    def protected(self, metadata: bytes, sensitive: bool) -> bytes | None:
        """Metadata text with its sensitive values replaced (:meth:`protect`), as compact
        JSON; None when it is not JSON."""
        try:
            parsed = orjson.loads(metadata)
        except orjson.JSONDecodeError:
            return None
        return orjson.dumps(self.protect(parsed, sensitive))

    def digest(self, value: Any) -> str:
        raw = value if isinstance(value, str) else orjson.dumps(value).decode()
        return "hmac-sha256:" + hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()

    def _secret(self, key: str) -> bool:
        """Whether ``key`` matches a sensitive key pattern (remembered per key)."""
        known = self._secret_keys.get(key)
        if known is None:
            if len(self._secret_keys) >= 4096:
                self._secret_keys.clear()
            known = self._secret_keys[key] = bool(self._keys is not None and self._keys.match(key))
        return known

    def protect(self, value: Any, sensitive: bool, key: str | None = None) -> Any:
        if key is not None and (self._secret(key) or (sensitive and key in VALUE_KEYS)):
            return None if value is None else self.digest(value)
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                name = str(k)
                if self._secret(name) or (sensitive and name in VALUE_KEYS):
                    out[k] = None if v is None else self.digest(v)
                elif type(v) is dict or type(v) is list:
                    out[k] = self.protect(v, sensitive)
                else:
                    out[k] = v
            return out
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
            event[name] = iso_utc(value)
    event["event_id"] = f"{source}:{event['id']}"
    event["source"] = source
    return _with_metadata(event, metadata, sensitive, protector)


def iso_utc(value: datetime) -> str:
    """A time as PostgreSQL's JSON writes a timestamptz in UTC (the hot path's rendering):
    ISO 8601 with offset ``+00:00``, the fraction of a second without trailing zeros, none
    when the second is whole. A naive time is taken as UTC."""
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = value.isoformat()
    if value.microsecond:
        whole, _, rest = text.partition(".")
        text = f"{whole}.{rest[:6].rstrip('0')}{rest[6:]}"
    return text


def render_document(
    source: str, document: str | bytes, metadata: Any, protector: Protector
) -> Rendered:
    """:func:`render_values` for a row that PostgreSQL rendered as a JSON object (every
    column but ``metadata``, timestamps as :func:`iso_utc` writes them): the same event."""
    event: dict[str, Any] = orjson.loads(document)
    event["event_id"] = f"{source}:{event['id']}"
    event["source"] = source
    if isinstance(metadata, bytes):
        metadata = metadata.decode()
    return _with_metadata(event, metadata, bool(event.get("sensitive")), protector)


_decode_flat = msgspec.json.Decoder(dict[str, str | int | float | bool | None]).decode


def flat_object(text: bytes) -> bool:
    """Whether ``text`` is a JSON object of scalars, as msgspec checks it in C (a text it
    refuses is decided by :meth:`Protector.as_is`, which accepts nothing msgspec refuses
    here and refuses nothing msgspec accepts: both are strict RFC 8259 parsers)."""
    try:
        _decode_flat(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return True


def chain_page(
    chain: Chain, source: str, rows: Sequence[Sequence[Any]], protector: Protector
) -> tuple[list[bytes], int]:
    """Chain a page that PostgreSQL rendered: rows ``(id, metadata, sensitive, document)``,
    texts as UTF-8 bytes, the document every column but ``metadata`` with ``event_id`` and
    ``source``. Returns the lines and how many rows were malformed.

    The hot path: the document is written as PostgreSQL rendered it, and hashed as written
    (no canonical form), with the metadata as stored when it has nothing to protect
    (on a page :meth:`Protector.plain_page` clears, a :func:`flat_object`; else decided by
    :meth:`Protector.as_is`), else as :meth:`Protector.protected` writes it. A row whose
    metadata is not JSON is rendered by :func:`render_document` and chained canonical.
    """
    out: list[bytes] = []
    append, sha256 = out.append, hashlib.sha256
    as_is, protected = protector.as_is, protector.protected
    seq, head, malformed = chain.seq, chain.head.encode(), 0
    plain = protector.plain_page(
        m for _, m, sensitive, _ in rows if m is not None and not sensitive
    )
    for _, metadata, sensitive, document in rows:
        if metadata is None:
            encoded: bytes | None = b"null"
        elif sensitive:
            encoded = protected(metadata, True)
        elif plain and flat_object(metadata):
            encoded = metadata
        else:
            encoded = as_is(metadata)
            if encoded is None:
                encoded = protected(metadata, False)
        if encoded is None:  # not JSON: shipped as ``raw`` with an ``error``
            chain.seq, chain.head = seq, head.decode()
            rendered = render_document(source, document, metadata, protector)
            malformed += rendered.malformed
            append(chain.link(rendered.event))
            seq, head = chain.seq, chain.head.encode()
            continue
        seq += 1
        body = b'{"seq":%d,"prev_hash":"%s",%s,"metadata":%s' % (
            seq,
            head,
            document[1:-1],
            encoded,
        )
        digest = sha256(body)
        digest.update(b"}")
        head = digest.hexdigest().encode()
        append(b'%s,"hash":"%s"}\n' % (body, head))
    chain.seq, chain.head = seq, head.decode()
    return out, malformed


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
