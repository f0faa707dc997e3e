"""Each fire enqueued once, however many scheduler replicas run.

Every replica computes the same fire times from the same table. For a fire (schedule name
and scheduled time) each replica tries ``SET key NX EX ttl``: one wins and enqueues; the
others count ``already_claimed``. A claim starts *pending* and is listed in a sorted set
scored by claim time; once the message is sent it becomes *enqueued* and leaves the set.
A replica that dies between its claim and its send leaves a pending claim behind: after
the lease, any replica takes it over (atomically, one winner) and sends it. The task id is
derived from the fire, so the fire has the same id whoever sends it, and a worker runs a
fire's id once (:mod:`workers.bookkeeping` drops a second message of it). The time of the
latest fire enqueued per schedule is kept (``fleet:schedule:last``), for the catch-up of
fires missed while every replica was down.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import redis

KEY_PREFIX = "fleet:schedule:fire:"
PENDING_INDEX = "fleet:schedule:pending"
LAST_FIRES = "fleet:schedule:last"  # schedule -> time of its latest enqueued fire

_FIRE_NAMESPACE = uuid.UUID("6d1c5a3e-7a52-4a53-9d5e-2f0b9c0de7a1")

# Claim a fire: SET NX with expiry and list it as pending, in one step. Safe to repeat: the
# claim's value is this replica's and this call's own (replica and time to the millisecond);
# found again, this very claim already ran (its answer was lost), and it is still won.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""

# Take over a pending claim older than the lease: only if it is still the same claim. Safe
# to repeat: a claim holding this call's own value means it already ran.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
local score = redis.call('ZSCORE', KEYS[2], KEYS[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
local value = redis.call('GET', KEYS[1])
if not value or string.sub(value, 1, 8) ~= 'pending:' then
  redis.call('ZREM', KEYS[2], KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
return 1
"""


@dataclass(frozen=True)
class Fire:
    schedule: str
    at: datetime
    # When its message stops being worth running (sent as Celery's ``expires``).
    expires: datetime | None = field(default=None, compare=False)

    @property
    def stamp(self) -> str:
        return self.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def key(self) -> str:
        return f"{KEY_PREFIX}{self.schedule}@{self.stamp}"

    @property
    def task_id(self) -> str:
        return str(uuid.uuid5(_FIRE_NAMESPACE, f"{self.schedule}@{self.stamp}"))

    @classmethod
    def from_key(cls, key: str) -> Fire:
        schedule, _, stamp = key.removeprefix(KEY_PREFIX).rpartition("@")
        at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return cls(schedule, at)


class ClaimStore(Protocol):
    """Where replicas agree on who sends a fire (Redis in production)."""

    def claim(self, fire: Fire) -> bool: ...
    def confirm(self, fire: Fire) -> None: ...
    def stale(self) -> list[Fire]: ...
    def take_over(self, fire: Fire) -> bool: ...
    def last_fire(self, schedule: str) -> datetime | None: ...
    def skip_to(self, schedule: str, at: datetime) -> None: ...


class FireClaims:
    def __init__(
        self,
        client: redis.Redis,
        replica: str,
        *,
        ttl_seconds: int,
        lease_seconds: int,
        clock: Callable[[], datetime],
    ) -> None:
        self._redis = client
        self._replica = replica
        self._ttl = ttl_seconds
        self._lease = lease_seconds
        self._clock = clock
        self._claim = client.register_script(_CLAIM)
        self._take_over = client.register_script(_TAKE_OVER)

    def _pending_value(self) -> str:
        return f"pending:{self._replica}:{self._clock().timestamp():.3f}"

    def claim(self, fire: Fire) -> bool:
        """True when this replica won the fire and must send it."""
        now = self._clock().timestamp()
        won = self._claim(
            keys=[fire.key, PENDING_INDEX], args=[self._pending_value(), self._ttl, now]
        )
        return bool(won)

    def confirm(self, fire: Fire) -> None:
        """The fire's message is with the broker: the claim is final. Safe to repeat (it
        sets the same value and removes the same member)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(fire.key, f"enqueued:{self._replica}:{fire.task_id}", xx=True, keepttl=True)
        pipe.zrem(PENDING_INDEX, fire.key)
        pipe.zadd(LAST_FIRES, {fire.schedule: fire.at.timestamp()}, gt=True)
        pipe.execute()

    def skip_to(self, schedule: str, at: datetime) -> None:
        """Fires up to ``at`` are accounted for (caught up or counted missed). Safe to
        repeat: ``ZADD GT`` only raises the score; the same time twice is once."""
        self._redis.zadd(LAST_FIRES, {schedule: at.timestamp()}, gt=True)

    def last_fire(self, schedule: str) -> datetime | None:
        score = self._redis.zscore(LAST_FIRES, schedule)
        return None if score is None else datetime.fromtimestamp(float(score), UTC)

    def stale(self) -> list[Fire]:
        """Pending claims older than the lease: their replica died or failed to send."""
        now = self._clock().timestamp()
        self._redis.zremrangebyscore(PENDING_INDEX, "-inf", now - self._ttl)
        keys = self._redis.zrangebyscore(PENDING_INDEX, "-inf", now - self._lease)
        return [Fire.from_key(k.decode() if isinstance(k, bytes) else str(k)) for k in keys]

    def take_over(self, fire: Fire) -> bool:
        """Claim a stale pending fire for this replica; True for exactly one replica."""
        now = self._clock().timestamp()
        won = self._take_over(
            keys=[fire.key, PENDING_INDEX],
            args=[self._pending_value(), now - self._lease, now],
        )
        return bool(won)

    def state(self, fire: Fire) -> str | None:
        value = self._redis.get(fire.key)
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        return text.split(":", 1)[0]
