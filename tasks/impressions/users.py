"""Distinct users per flag, environment, variant and day: HyperLogLog in Redis, kept in
the database too.

Adding a user to a sketch is idempotent, so a batch applied twice changes nothing. Redis
here keeps nothing on disk: when a day's sketch is missing from Redis, the copy in the
database is merged back in (``PFMERGE``, a union, safe with other workers adding at the
same time) before new users are added. Sketches that changed are listed in a set and
written to the database at the end of each run.
"""

from __future__ import annotations

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

PREFIX = "fleet:impressions:users:"
DIRTY = "fleet:impressions:users:dirty"
TAKING = "fleet:impressions:users:taking:"  # + a persist call's token: the names it took
# Take up to ARGV[1] dirty names into this call's own set KEYS[2] (expiring in ARGV[2] s).
# Safe to repeat: a call whose set exists already ran (its answer lost); it gets the same
# names back, where a bare SPOP sent again would take others and leave the first ones out.
_TAKE_DIRTY = """
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.call('SMEMBERS', KEYS[2]) end
local names = redis.call('SPOP', KEYS[1], ARGV[1])
if #names > 0 then
  redis.call('SADD', KEYS[2], unpack(names))
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return names
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
    """Write changed sketches and their counts to the database; returns how many."""
    taking = TAKING + uuid.uuid4().hex
    taken = client.eval(_TAKE_DIRTY, 2, DIRTY, taking, limit, 3600)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in taken or []]
    if not names:
        return 0
    try:
        # Safe to repeat: each row is overwritten with the sketch as it stands.
        rows = read_sketches(client, names)
        _upsert(engine, rows)
    except Exception:
        client.sadd(DIRTY, *names)  # try again next run
        raise
    finally:
        client.delete(taking)  # safe to repeat
    return len(rows)


def read_sketches(client: redis.Redis, names: list[str]) -> list[dict[str, Any]]:
    """The sketches ``names`` as they stand, as rows to write, stamped ``updated_at`` with
    the moment Redis read them: all at once (MULTI), on Redis's clock, the one clock every
    worker shares. A sketch only ever grows, so of two reads of one sketch the later holds
    every user the earlier does: :func:`_upsert` never lets an earlier read overwrite a
    later one (two workers persisting the same day's sketch can commit in either order)."""
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


def _upsert(engine: Engine, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statement = insert(FlagImpressionUsers)
    statement = statement.on_conflict_do_update(
        index_elements=["flag_key", "environment", "variant", "day"],
        set_={
            "users": statement.excluded.users,
            "sketch": statement.excluded.sketch,
            "updated_at": statement.excluded.updated_at,
        },
        # A read older than the stored one holds no user that one lacks: keep the newer.
        where=FlagImpressionUsers.updated_at <= statement.excluded.updated_at,
    )
    rows.sort(key=lambda r: (r["flag_key"], r["environment"], r["variant"], r["day"]))
    with engine.begin() as connection:
        connection.execute(statement, rows)
