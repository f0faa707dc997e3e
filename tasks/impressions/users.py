"""Distinct users per flag, environment, variant and day: HyperLogLog in Redis, kept in
the database too.

Adding a user to a sketch is idempotent, so a batch applied twice changes nothing. Redis
here keeps nothing on disk: when a day's sketch is missing from Redis, the copy in the
database is merged back in (``PFMERGE``, a union, safe with other workers adding at the
same time) before new users are added. Sketches that changed are listed in a set and
written to the database at the end of each run.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import redis
from sqlalchemy import Engine, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from tasks.impressions.records import UsersKey
from workers.db.models import FlagImpressionUsers
from workers.logs import get_logger

log = get_logger("fleet.impressions")

PREFIX = "fleet:impressions:users:"
DIRTY = "fleet:impressions:users:dirty"
TAKING = "fleet:impressions:users:taking:"  # + a persist call's token: the names it took
# Every call's set, scored with the Redis time it was taken: a set still there long after is
# a call that died (a worker killed, Redis unreachable on the way back), given back whole.
TAKINGS = "fleet:impressions:users:takings"
ORPHANED_AFTER = 300  # seconds: a persist call takes well under a second per 5,000 names
READ_AT_ONCE = 200  # sketches read in one MULTI (up to 12 KB each): Redis serves others between
# Take up to ARGV[1] dirty names into this call's own set KEYS[2], registered in KEYS[3].
# Safe to repeat: a call whose set exists already ran (its answer lost); it gets the same
# names back, where a bare SPOP sent again would take others and leave the first ones out.
_TAKE_DIRTY = """
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.call('SMEMBERS', KEYS[2]) end
local names = redis.call('SPOP', KEYS[1], ARGV[1])
if #names > 0 then
  for i = 1, #names, 1000 do
    redis.call('SADD', KEYS[2], unpack(names, i, math.min(i + 999, #names)))
  end
  redis.call('ZADD', KEYS[3], redis.call('TIME')[1], KEYS[2])
end
return names
"""
# A take set KEYS[2] made by a version of the fleet that did not register its takes (it let
# them expire ARGV[1] s after the take instead) registered in KEYS[1] as taken when its
# expiry says, and kept from expiring; 0 when there is none, or it is registered already.
_REGISTER_UNLISTED = """
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('ZSCORE', KEYS[1], KEYS[2]) then
  return 0
end
local ttl = redis.call('TTL', KEYS[2])
local age = 0
if ttl > 0 then age = math.max(0, tonumber(ARGV[1]) - ttl) end
redis.call('ZADD', KEYS[1], tonumber(redis.call('TIME')[1]) - age, KEYS[2])
redis.call('PERSIST', KEYS[2])
return 1
"""
UNLISTED_TAKE_EXPIRY = 3600  # what that version set
_unlisted_checked = False  # once per process: only a worker of an older version makes them
# A call's names back into the dirty set KEYS[1] (its set KEYS[2] gone, unregistered from
# KEYS[3]); safe to repeat.
_GIVE_BACK = """
local names = redis.call('SMEMBERS', KEYS[2])
for i = 1, #names, 1000 do
  redis.call('SADD', KEYS[1], unpack(names, i, math.min(i + 999, #names)))
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], KEYS[2])
return #names
"""
KEEP = timedelta(days=8)  # older days are final in the database


def users_key(key: UsersKey) -> str:
    flag, environment, variant, day = key
    return PREFIX + orjson.dumps([flag, environment, variant, day.isoformat()]).decode()


def parse_users_key(name: str) -> UsersKey:
    flag, environment, variant, day = orjson.loads(name.removeprefix(PREFIX))
    return flag, environment, variant, date.fromisoformat(day)


class UserSketches:
    """One drain run's writer of sketches: it checks each day's sketch in Redis once per run
    (restoring it from the database if Redis lost it), then only adds."""

    def __init__(self, client: redis.Redis, engine: Engine) -> None:
        self._redis = client
        self._engine = engine
        self._ready: set[str] = set()

    def add(self, users: Mapping[UsersKey, set[str]]) -> None:
        if not users:
            return
        names = {key: users_key(key) for key in users}
        unchecked = [key for key, name in names.items() if name not in self._ready]
        if unchecked:
            self._ensure(unchecked, names)
        pipe = self._redis.pipeline(transaction=False)
        for key, members in users.items():
            pipe.pfadd(names[key], *members)
        pipe.sadd(DIRTY, *names.values())
        pipe.execute()

    def _ensure(self, keys: list[UsersKey], names: dict[UsersKey, str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(names[key])
        found = pipe.execute()
        missing = [key for key, present in zip(keys, found, strict=True) if not present]
        if missing:
            _restore(self._redis, self._engine, missing)
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            # PFADD of nothing creates an empty sketch, so the expiry holds from now on.
            pipe.pfadd(names[key])
            pipe.expire(names[key], int(KEEP.total_seconds()))
        pipe.execute()
        self._ready.update(names[key] for key in keys)


def _restore(client: redis.Redis, engine: Engine, keys: list[UsersKey]) -> None:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                FlagImpressionUsers.flag_key,
                FlagImpressionUsers.environment,
                FlagImpressionUsers.variant,
                FlagImpressionUsers.day,
                FlagImpressionUsers.sketch,
            ).where(
                tuple_(
                    FlagImpressionUsers.flag_key,
                    FlagImpressionUsers.environment,
                    FlagImpressionUsers.variant,
                    FlagImpressionUsers.day,
                ).in_(keys)
            )
        ).all()
    for flag, environment, variant, day, sketch in rows:
        name = users_key((flag, environment, variant, day))
        scratch = f"{name}:restore"
        pipe = client.pipeline(transaction=True)
        pipe.set(scratch, sketch, ex=60)
        pipe.pfmerge(name, name, scratch)
        pipe.delete(scratch)
        pipe.execute()


def persist_users(client: redis.Redis, engine: Engine, limit: int = 5000) -> int:
    """Write changed sketches and their counts to the database; returns how many were
    read to be written (a row kept because the stored one was read later counts too)."""
    give_back_orphans(client)
    taking = TAKING + uuid.uuid4().hex
    taken = client.eval(_TAKE_DIRTY, 3, DIRTY, taking, TAKINGS, limit)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in taken or []]
    if not names:
        return 0
    try:
        # Safe to repeat: a read never overwrites a later one (see _upsert).
        rows = read_sketches(client, names)
        written = _upsert(engine, rows)
        kept = [key for key in map(_key, rows) if key not in written]
        if kept:
            _save_kept(client, engine, kept)
    except Exception:
        with contextlib.suppress(redis.RedisError):  # else a call 5 minutes later does
            client.eval(_GIVE_BACK, 3, DIRTY, taking, TAKINGS)
        raise
    pipe = client.pipeline(transaction=True)
    pipe.delete(taking)  # lost on the way back: given back later and written again, harmless
    pipe.zrem(TAKINGS, taking)
    pipe.execute()
    return len(rows)


def _save_kept(client: redis.Redis, engine: Engine, keys: list[UsersKey]) -> None:
    """Sketches whose stored row was kept: read when a later read was already stored, or
    counting fewer users than stored because Redis lost part of them (restarted during a
    run that had already checked them, so nothing was merged back). The stored copies are
    merged into Redis's (a union), and the result, which holds every user of both, is read
    and saved once more."""
    from monitoring import metrics

    log.warning("impressions_users_kept_stored", sketches=len(keys))
    metrics.IMPRESSIONS_USERS_RECOVERED.labels(reason="kept_stored").inc(len(keys))
    _restore(client, engine, keys)
    _upsert(engine, read_sketches(client, [users_key(key) for key in keys]))


def _key(row: Mapping[str, Any]) -> UsersKey:
    return row["flag_key"], row["environment"], row["variant"], row["day"]


def give_back_orphans(client: redis.Redis) -> int:
    """Names taken by calls that never finished, :data:`ORPHANED_AFTER` seconds or more ago,
    back into the dirty set; returns how many. Without this a worker killed between taking
    and writing would leave those days' last users out of the database until the sketch
    changed again, and a Redis restart in between would lose them."""
    from monitoring import metrics

    global _unlisted_checked
    if not _unlisted_checked:
        register_unlisted_takes(client)
        _unlisted_checked = True
    seconds, _ = client.time()
    stale = client.zrangebyscore(TAKINGS, "-inf", seconds - ORPHANED_AFTER)
    returned = 0
    for raw in stale:
        taking = raw.decode() if isinstance(raw, bytes) else str(raw)
        count = int(client.eval(_GIVE_BACK, 3, DIRTY, taking, TAKINGS))
        if count:
            log.warning("impressions_users_orphans_returned", taking=taking, sketches=count)
            metrics.IMPRESSIONS_USERS_RECOVERED.labels(reason="orphaned_take").inc(count)
        returned += count
    return returned


def register_unlisted_takes(client: redis.Redis) -> int:
    """Take sets left by workers of an older version (during a rolling upgrade), which did
    not register them, registered so that :func:`give_back_orphans` sees them; returns how
    many. One ``SCAN`` of the keyspace, done once per process."""
    found = 0
    for raw in client.scan_iter(match=TAKING + "*", count=1000):
        taking = raw.decode() if isinstance(raw, bytes) else str(raw)
        found += int(client.eval(_REGISTER_UNLISTED, 2, TAKINGS, taking, UNLISTED_TAKE_EXPIRY))
    if found:
        log.warning("impressions_users_unlisted_takes", takes=found)
    return found


def read_sketches(client: redis.Redis, names: list[str]) -> list[dict[str, Any]]:
    """The sketches ``names`` as they stand, as rows to write, each stamped ``updated_at``
    with the moment Redis read it: :data:`READ_AT_ONCE` at a time (MULTI), on Redis's clock,
    which every worker shares. A sketch only ever grows, so of two reads of one sketch the
    later holds every user the earlier does: :func:`_upsert` keeps the later (two workers
    persisting the same day's sketch can commit in either order)."""
    rows: list[dict[str, Any]] = []
    for start in range(0, len(names), READ_AT_ONCE):
        rows += _read(client, names[start : start + READ_AT_ONCE])
    return rows


def _read(client: redis.Redis, names: list[str]) -> list[dict[str, Any]]:
    pipe = client.pipeline(transaction=True)
    pipe.time()
    for name in names:
        pipe.get(name)
        pipe.pfcount(name)
    (seconds, micros), *answers = pipe.execute()
    read_at = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micros)
    rows: list[dict[str, Any]] = []
    for index, name in enumerate(names):
        sketch, count = answers[2 * index], answers[2 * index + 1]
        if sketch is None:
            continue  # expired: the database copy is final
        flag, environment, variant, day = parse_users_key(name)
        rows.append(
            {
                "flag_key": flag,
                "environment": environment,
                "variant": variant,
                "day": day,
                "users": int(count),
                "sketch": sketch,
                "updated_at": read_at,
            }
        )
    return rows


def _upsert(engine: Engine, rows: list[dict[str, Any]]) -> set[UsersKey]:
    """Rows saved, unless the stored one is newer; returns the keys of those saved."""
    if not rows:
        return set()
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statement = insert(FlagImpressionUsers)
    stored, read = FlagImpressionUsers, statement.excluded
    upsert = statement.on_conflict_do_update(
        index_elements=["flag_key", "environment", "variant", "day"],
        set_={"users": read.users, "sketch": read.sketch, "updated_at": read.updated_at},
        # A sketch only grows: a read counting more users is newer whatever the stamps say
        # (a clock set back by a Redis failover, rows stamped with a worker's clock by an
        # older version cannot pin a stale row); of two counting as many, the later read.
        # One counting fewer is an earlier read, or Redis lost users: kept (see persist_users).
        where=(read.users > stored.users)
        | ((read.users == stored.users) & (stored.updated_at <= read.updated_at)),
    ).returning(stored.flag_key, stored.environment, stored.variant, stored.day)
    rows.sort(key=_key)
    with engine.begin() as connection:
        saved = connection.execute(upsert, rows).all()
    return {(flag, environment, variant, day) for flag, environment, variant, day in saved}
