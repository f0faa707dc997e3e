"""The pure core of impression aggregation: raw payloads in, counts and dead letters out.

An impression is the JSON the platform's services ``LPUSH`` (``flag_key, environment,
variant, user_id, tenant_id, timestamp, context``). It counts in the minute of its own
timestamp (UTC; a timestamp without an offset is UTC, as the platform writes it). A record
that cannot be counted is never dropped and never blocks the others: it becomes a
:class:`DeadLetter` with one of the reasons in :data:`REASONS`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import repeat
from operator import attrgetter, getitem
from typing import Annotated, Any, cast

import msgspec
import orjson

REQUIRED = ("flag_key", "environment", "variant", "timestamp")
REASONS = (
    "not_json",
    "not_an_object",
    "missing_field",
    "empty_field",
    "bad_field_type",
    "bad_timestamp",
    "future_timestamp",
)

# (flag_key, environment, variant, tenant_id or None, minute)
CountKey = tuple[str, str, str, str | None, datetime]
# (flag_key, environment, variant, day)
UsersKey = tuple[str, str, str, date]


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    detail: str
    payload: str

    def encode(self, batch_id: str, at: datetime) -> bytes:
        return orjson.dumps(
            {
                "reason": self.reason,
                "detail": self.detail,
                "payload": self.payload,
                "batch_id": batch_id,
                "dead_lettered_at": at.isoformat(),
            }
        )


@dataclass
class Aggregate:
    """What one batch adds: counts per minute, per flag and environment, users per day."""

    counts: Counter[CountKey] = field(default_factory=Counter)
    flags: dict[tuple[str, str], list[Any]] = field(default_factory=dict)  # [count, last]
    users: dict[UsersKey, set[str]] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    impressions: int = 0


def merge(parts: list[Aggregate]) -> Aggregate:
    """The sum of several batches' aggregates (their dead letters stay with each batch)."""
    if len(parts) == 1:
        return parts[0]
    total = Aggregate()
    for part in parts:
        total.counts.update(part.counts)
        for key, (number, last) in part.flags.items():
            per_flag = total.flags.get(key)
            if per_flag is None:
                total.flags[key] = [number, last]
            else:
                per_flag[0] += number
                per_flag[1] = max(per_flag[1], last)
        for users_key, members in part.users.items():
            known = total.users.get(users_key)
            if known is None:
                total.users[users_key] = set(members)
            else:
                known.update(members)
        total.impressions += part.impressions
    return total


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail


def _text(record: dict[str, Any], name: str, required: bool) -> str | None:
    if name not in record or record[name] is None:
        if required:
            raise _Bad("missing_field", f"{name} is missing")
        return None
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Bad("bad_field_type", f"{name} is a {type(value).__name__}, not text")
    value = str(value)
    if required and not value.strip():
        raise _Bad("empty_field", f"{name} is empty")
    return value


def parse_timestamp(value: str) -> datetime:
    """ISO 8601; no offset means UTC. Raises ValueError."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


# Length is checked in C; a name of only spaces is caught in the loop (a regex here would
# cost more than the rest of the decoding).
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _Impression(msgspec.Struct, gc=False):
    """A well-formed impression, as msgspec checks it in C (other fields are ignored)."""

    flag_key: _NonEmpty
    environment: _NonEmpty
    variant: _NonEmpty
    timestamp: str
    user_id: str | None = None
    tenant_id: str | None = None


_decode_batch = msgspec.json.Decoder(list[_Impression]).decode
_decode_one = msgspec.json.Decoder(_Impression).decode
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


@dataclass
class _Decoded:
    """A batch decoded: ``records`` when every payload is a well-formed impression."""

    items: list[bytes]
    records: list[_Impression] | None

    def pairs(self) -> Iterable[tuple[bytes, _Impression | None]]:
        """Each payload with its record, or None when it is not a well-formed impression."""
        if self.records is not None:
            return zip(self.items, self.records, strict=True)
        return ((item, _one(item)) for item in self.items)


def _decoded(items: list[bytes]) -> _Decoded:
    """The whole batch is first decoded as one JSON array, in one call: the common case of
    a batch with nothing wrong. Joining cannot hide a bad payload: JSON has no empty array
    elements, so as many records as payloads means one record per payload.
    """
    if items:
        try:
            # Brackets added to the first and last payloads, not to a copy of the batch.
            ends = list(items)
            ends[0] = b"[" + ends[0]
            ends[-1] = ends[-1] + b"]"  # the same payload when there is one
            records = _decode_batch(b",".join(ends))
        except _DECODE_ERRORS:
            records = []
        if len(records) == len(items):
            return _Decoded(items, records)
    return _Decoded(items, None)


def _one(item: bytes) -> _Impression | None:
    try:
        return _decode_one(item)
    except _DECODE_ERRORS:
        return None


def aggregate(raw: Iterable[bytes | str], now: datetime, skew: timedelta) -> Aggregate:
    """Parse, check and add up one batch. Never raises on a bad record."""
    tally = Tally()
    counted = tally.add(raw, now, skew)
    result = tally.total()
    result.dead = counted.dead
    return result


@dataclass(frozen=True)
class Counted:
    """What one batch of a :class:`Tally` brought: its own figures for the batch ledger,
    and its dead letters."""

    impressions: int
    dead: list[DeadLetter]

    @property
    def dead_by_reason(self) -> Counter[str]:
        return Counter(letter.reason for letter in self.dead)


_timestamp = attrgetter("timestamp")
_flag, _environment = attrgetter("flag_key"), attrgetter("environment")
_variant, _tenant, _user = attrgetter("variant"), attrgetter("tenant_id"), attrgetter("user_id")
_MINUTE, _DAY = slice(0, 16), slice(0, 10)  # of a timestamp text


class Tally:
    """Batches added up. This is the hot path of the fleet: every evaluation of every flag
    passes here.

    A batch in which every record is well formed, naive-timestamped (as the platform writes
    them) and not in the future, nearly every batch, is checked a column at a time with the
    per-record work in C, and its keys (minute and day as text) are counted into the
    group's counter at once, while they are still in the cache; texts become datetimes
    once per distinct key, in :meth:`total`. Any other batch goes record by record
    (:func:`_by_record`), which finds each bad record's reason, or, for an id given as a
    number, still counts it.
    """

    def __init__(self) -> None:
        # Batches taken whole: counts by (flag, environment, variant, tenant, minute text),
        # each one's latest moment per flag,
        # and users by (flag, environment, variant, day text).
        self._counts: Counter[Any] = Counter()
        self._last: list[dict[tuple[str, str], datetime]] = []
        self._users: defaultdict[Any, set[str | None]] = defaultdict(set)
        self._parts: list[Aggregate] = []  # batches taken record by record

    def add(self, raw: Iterable[bytes | str], now: datetime, skew: timedelta) -> Counted:
        latest = (now + skew).astimezone(UTC).replace(tzinfo=None)
        items = [item if isinstance(item, bytes) else item.encode() for item in raw]
        decoded = _decoded(items)
        if decoded.records is not None and self._add_whole(decoded.records, latest):
            return Counted(len(items), [])
        part = _by_record(decoded, latest, now)
        self._parts.append(part)
        return Counted(part.impressions, part.dead)

    def _add_whole(self, records: list[_Impression], latest: datetime) -> bool:
        """Every check of :func:`_by_record`, made on the whole batch: each timestamp parses
        (``map``), none carries an offset (``max`` of naive and aware ones raises, and an
        aware maximum means all are), none is in the future, and each distinct minute text
        and name is checked once. False: the batch needs a closer look. Count and user keys
        are built a column at a time (``map`` and ``zip`` of getters: no Python per record)."""
        stamps = list(map(_timestamp, records))
        try:
            moments = list(map(datetime.fromisoformat, stamps))
            top = max(moments)
            if top.tzinfo is not None or top > latest:
                return False
        except (ValueError, TypeError):
            return False
        minutes = list(map(getitem, stamps, repeat(_MINUTE)))
        if not all(len(minute) == 16 and minute[13] == ":" for minute in set(minutes)):
            return False
        flag_col, env_col = list(map(_flag, records)), list(map(_environment, records))
        variant_col = list(map(_variant, records))
        for column in (flag_col, env_col, variant_col):
            if any(name.isspace() for name in set(column)):
                return False
        if moments == sorted(moments):  # FIFO: each flag's last record is its latest
            last = dict(zip(zip(flag_col, env_col, strict=True), moments, strict=True))
        else:
            last = {}
            for flag, moment in zip(zip(flag_col, env_col, strict=True), moments, strict=True):
                if flag not in last or moment > last[flag]:
                    last[flag] = moment
        days = map(getitem, stamps, repeat(_DAY))
        users = self._users
        for key, user in zip(
            zip(flag_col, env_col, variant_col, days, strict=True),
            map(_user, records),
            strict=True,
        ):
            users[key].add(user)
        tenants = map(_tenant, records)
        self._counts.update(zip(flag_col, env_col, variant_col, tenants, minutes, strict=True))
        self._last.append(last)
        return True

    def total(self) -> Aggregate:
        """The sum of every batch added (their dead letters stay with each batch)."""
        counts = self._counts
        result = Aggregate()
        flags = result.flags
        for (flag, environment, _, _, _), number in counts.items():
            per_flag = flags.get((flag, environment))
            if per_flag is None:
                flags[(flag, environment)] = [number, None]
            else:
                per_flag[0] += number
        for last in self._last:
            for flag_env, moment in last.items():
                per_flag = flags[flag_env]
                if per_flag[1] is None or moment > per_flag[1]:
                    per_flag[1] = moment
        users: dict[Any, set[str]] = {}
        for key, members in self._users.items():
            members.discard(None)  # anonymous evaluations count, but are no user
            if members:
                users[key] = cast(set[str], members)
        _finish(result, counts, users)
        return merge([result, *self._parts]) if self._parts else result


def _by_record(decoded: _Decoded, latest: datetime, now: datetime) -> Aggregate:
    """Any batch, one record at a time, dead letters found and kept."""
    result = Aggregate()
    counts: Counter[Any] = Counter()
    users: dict[Any, set[str]] = {}
    flags, from_iso = result.flags, datetime.fromisoformat
    for payload, record in decoded.pairs():
        fast = _fast(record, from_iso)
        if fast is not None:
            flag, environment, variant, tenant, user, moment, minute, day = fast
        else:
            checked = _classify(payload, latest, now, result.dead)
            if checked is None:
                continue
            flag, environment, variant, tenant, user, moment = checked
            minute, day = moment.replace(second=0, microsecond=0), moment.date()
        if moment > latest:
            result.dead.append(_future(moment, now, payload))
            continue
        counts[(flag, environment, variant, tenant, minute)] += 1
        per_flag = flags.get((flag, environment))
        if per_flag is None:
            flags[(flag, environment)] = [1, moment]
        else:
            per_flag[0] += 1
            if moment > per_flag[1]:
                per_flag[1] = moment
        if user is not None:
            members = users.get((flag, environment, variant, day))
            if members is None:
                users[(flag, environment, variant, day)] = {user}
            else:
                members.add(user)
    _finish(result, counts, users)
    return result


def _fast(record: _Impression | None, from_iso: Any) -> tuple[Any, ...] | None:
    """A record the common way (naive timestamp, text names), keyed by text; else None."""
    if record is None:
        return None
    stamp = record.timestamp
    try:
        moment = from_iso(stamp)
    except ValueError:
        return None
    if moment.tzinfo is not None or len(stamp) < 16 or stamp[13] != ":":
        return None
    flag, environment, variant = record.flag_key, record.environment, record.variant
    if flag.isspace() or environment.isspace() or variant.isspace():
        return None
    return (
        flag,
        environment,
        variant,
        record.tenant_id,
        record.user_id,
        moment,
        stamp[:16],
        stamp[:10],
    )


def _future(moment: datetime, now: datetime, payload: bytes) -> DeadLetter:
    shown = moment.replace(tzinfo=UTC).isoformat()
    return DeadLetter(
        "future_timestamp", f"timestamp {shown} is ahead of {now.isoformat()}", _text_of(payload)
    )


def _as_minute(key: str | datetime) -> datetime:
    moment = datetime.fromisoformat(key) if isinstance(key, str) else key
    return moment.replace(tzinfo=UTC)


def _finish(result: Aggregate, counts: Counter[Any], users: dict[Any, set[str]]) -> None:
    """Text buckets and days become aware datetimes and dates, once per distinct key.
    Two spellings of one minute (``T`` or a space) land on the same key."""
    minutes = {bucket: _as_minute(bucket) for bucket in {key[4] for key in counts}}
    if len(set(minutes.values())) == len(minutes) and not any(key[3] == "" for key in counts):
        result.counts = Counter(
            {
                (f, e, v, t, minutes[bucket]): number
                for (f, e, v, t, bucket), number in counts.items()
            }
        )
    else:  # a minute spelt two ways, or a blank tenant, which is no tenant: keys merge
        for (flag, environment, variant, tenant, bucket), number in counts.items():
            result.counts[(flag, environment, variant, tenant or None, minutes[bucket])] += number
    days: dict[Any, date] = {}
    for (flag, environment, variant, day), members in users.items():
        moment = days.get(day)
        if moment is None:
            moment = days[day] = date.fromisoformat(day) if isinstance(day, str) else day
        result.users.setdefault((flag, environment, variant, moment), set()).update(members)
    for per_flag in result.flags.values():
        per_flag[1] = per_flag[1].replace(tzinfo=UTC)
    result.impressions = sum(counts.values())


def _classify(
    payload: bytes, latest: datetime, now: datetime, dead: list[DeadLetter]
) -> tuple[str, str, str, str | None, str | None, datetime] | None:
    """The thorough check of a record msgspec refused: fields as text, or a dead letter."""
    try:
        record = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        dead.append(DeadLetter("not_json", str(exc).split(":")[0], _text_of(payload)))
        return None
    if not isinstance(record, dict):
        kind = type(record).__name__
        dead.append(DeadLetter("not_an_object", f"a JSON {kind}", _text_of(payload)))
        return None
    try:
        flag, environment, variant, tenant, user, aware = _impression(record, latest, now)
    except _Bad as bad:  # the future is checked by the caller, on the same clock
        dead.append(DeadLetter(bad.reason, bad.detail, _text_of(payload)))
        return None
    return flag, environment, variant, tenant, user, aware.replace(tzinfo=None)


Checked = tuple[str, str, str, str | None, str | None, datetime]


def _impression(record: dict[str, Any], latest: datetime, now: datetime) -> Checked:
    """The slow, thorough check: the reason a record fails, or its fields as text."""
    flag = _text(record, "flag_key", True)
    environment = _text(record, "environment", True)
    variant = _text(record, "variant", True)
    stamp = _text(record, "timestamp", True)
    tenant = _text(record, "tenant_id", False)
    user = _text(record, "user_id", False)
    assert flag is not None and environment is not None and variant is not None
    assert stamp is not None
    try:
        moment = parse_timestamp(stamp)
    except ValueError:
        raise _Bad("bad_timestamp", f"timestamp {stamp!r} is not ISO 8601") from None
    if moment.replace(tzinfo=None) > latest:
        raise _Bad("future_timestamp", f"timestamp {stamp} is ahead of {now.isoformat()}")
    return flag, environment, variant, tenant, user, moment


def _text_of(payload: bytes | str) -> str:
    if isinstance(payload, bytes):
        return payload.decode("utf-8", errors="replace")
    return payload
