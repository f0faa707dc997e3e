"""The impression list in Redis, taken in batches that survive the worker taking them.

A batch moves atomically (one Lua script) from the right end of the platform's list (the
oldest impressions: producers ``LPUSH``) to its own processing list, and is listed in a
sorted set scored by the time it was taken. The move stays inside Redis (``SORT ... BY
nosort LIMIT ... STORE`` copies a range of a list natively, then ``LTRIM``), and the worker
reads the batch with a plain ``LRANGE`` in the same round trip: handing thousands of
payloads through Lua costs Redis about three times as much. The batch leaves both, with its
dead letters pushed, in one more atomic step once its counts are committed
(:meth:`ImpressionQueue.finish`, which only the first finisher performs). A batch whose
worker died stays listed; after the in-flight timeout any worker takes it over and applies
it again, which the database's batch ledger makes harmless.

Everything a batch's outcome depends on is fixed when it is taken: its id carries the take
time (:attr:`Batch.taken_at`), and every worker classifies the batch against that time, not
its own clock. A worker that takes a batch over, minutes later or with a skewed clock, so
decides exactly what the first one decided: the same counts, the same dead letters (byte
for byte) and the same users.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import redis

from workers.backlog import IMPRESSIONS, IMPRESSIONS_DEAD, IMPRESSIONS_IN_FLIGHT

SOURCE = IMPRESSIONS
DEAD = IMPRESSIONS_DEAD
# Only ``python -m chaos`` sets this, to prove its checks catch a broken fleet: ``dead_letters``
# drops every dead letter, ``ledger`` lets the batch ledger count a batch twice. Never set it.
CHAOS_BREAK = "FLEET_CHAOS_BREAK"
BATCH_PREFIX = "fleet:impressions:batch:"
IN_FLIGHT = IMPRESSIONS_IN_FLIGHT

# The batch keeps the list's order (newest first): readers reverse it. Safe to repeat: a
# batch id already in flight means this very take ran (its answer was lost and the client
# sent it again), and nothing more is moved.
_TAKE = """
if redis.call('ZSCORE', KEYS[3], ARGV[3]) then return redis.call('LLEN', KEYS[2]) end
local length = redis.call('LLEN', KEYS[1])
if length == 0 then return 0 end
local size = math.min(length, tonumber(ARGV[1]))
redis.call('SORT', KEYS[1], 'BY', 'nosort', 'LIMIT', length - size, size, 'STORE', KEYS[2])
if size == length then
  redis.call('DEL', KEYS[1])
else
  redis.call('LTRIM', KEYS[1], 0, length - size - 1)
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return size
"""

# Safe to repeat: the claim's score is the claimant's own time; found again (to the
# microsecond), it means this take-over already ran, and it answers the same.
_TAKE_OVER = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and math.abs(tonumber(score) - tonumber(ARGV[3])) < 0.000001 then
  return redis.call('LRANGE', KEYS[2], 0, -1)
end
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
local items = redis.call('LRANGE', KEYS[2], 0, -1)
if #items == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return items
"""

# Safe to repeat: the first run removes the batch from the in-flight set, a repeat finds it
# gone and does nothing. A repeat answers 0: the letters were pushed once, but this run's
# dead-letter metric and log leave them out.
_FINISH = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 2, #ARGV, 1000 do
  redis.call('LPUSH', KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('DEL', KEYS[2])
return 1
"""


def new_batch_id(now: float) -> str:
    """A batch id that carries its take time, in microseconds: ``<micros>.<random hex>``."""
    return f"{round(now * 1_000_000)}.{uuid.uuid4().hex}"


# Replay, one bounded chunk per call: look at up to ARGV[1] of the oldest dead letters (the
# right end) and send back, as the producers wrote them, those of reason ARGV[3] (any, when
# empty), up to ARGV[2] of them; the others go to the left end, so the next call looks at
# letters it has not seen. Each call is atomic (a letter is dead or queued again, never both
# or neither) and short, so producers pushing meanwhile never meet a busy Redis.
# Not safe to repeat as a whole: a repeated call is one more step. No letter is lost or
# doubled, but the count can fall short and --limit be passed by up to one chunk.
_REPLAY = """
local looked, moved = 0, 0
while looked < tonumber(ARGV[1]) and moved < tonumber(ARGV[2]) do
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  looked = looked + 1
  local ok, letter = pcall(cjson.decode, raw)
  if ok and type(letter) == 'table' and type(letter['payload']) == 'string'
     and (ARGV[3] == '' or letter['reason'] == ARGV[3]) then
    redis.call('LPUSH', KEYS[2], letter['payload'])
    moved = moved + 1
  else
    redis.call('LPUSH', KEYS[1], raw)
  end
end
return {looked, moved}
"""
REPLAY_CHUNK = 1000


def replay_dead_letters(
    client: redis.Redis,
    limit: int,
    reason: str | None = None,
    chunk: int = REPLAY_CHUNK,
    progress: Callable[[int, int, int], None] | None = None,
) -> int:
    """Send up to ``limit`` dead letters (of ``reason``, or any) back to the platform's
    list, oldest first, ``chunk`` letters looked at per atomic step; each letter present at
    the start is looked at once. ``progress(looked, total, moved)`` after each step.
    Returns how many were sent back."""
    script = client.register_script(_REPLAY)
    total = int(client.llen(DEAD))
    looked = moved = 0
    while looked < total and moved < limit:
        step = min(chunk, total - looked)
        seen, sent = script(keys=[DEAD, SOURCE], args=[step, limit - moved, reason or ""])
        looked, moved = looked + int(seen), moved + int(sent)
        if progress is not None:
            progress(looked, total, moved)
        if not seen:
            break  # emptied meanwhile (by another replay)
    return moved


@dataclass(frozen=True)
class Batch:
    id: str
    items: list[bytes]
    recovered: bool = False

    @property
    def key(self) -> str:
        return BATCH_PREFIX + self.id

    @property
    def taken_at(self) -> float | None:
        """When the batch was taken (the clock of the worker that took it); None for a
        batch taken by a version of the fleet whose ids carried no time."""
        micros, dot, _ = self.id.partition(".")
        return int(micros) / 1_000_000 if dot and micros.isdigit() else None

    def counted(self) -> Batch:
        """The batch without its payloads: once counted, a group holds batch ids, and the
        payloads stay in Redis until the batch is finished (see :meth:`ImpressionQueue.reread`)."""
        return Batch(self.id, [], self.recovered)


class ImpressionQueue:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._take = client.register_script(_TAKE)
        self._take_over = client.register_script(_TAKE_OVER)
        self._finish = client.register_script(_FINISH)

    def take(self, size: int, now: float) -> Batch | None:
        """Up to ``size`` of the oldest impressions, as a new batch; None when empty."""
        batch_id = new_batch_id(now)
        key = BATCH_PREFIX + batch_id
        pipe = self._redis.pipeline(transaction=False)
        self._take(keys=[SOURCE, key, IN_FLIGHT], args=[size, now, batch_id], client=pipe)
        pipe.lrange(key, 0, -1)
        taken, items = pipe.execute()
        if not taken:
            return None
        items.reverse()  # oldest first
        return Batch(batch_id, items)

    def orphans(self, now: float, timeout: float, limit: int = 10) -> list[str]:
        ids = self._redis.zrangebyscore(IN_FLIGHT, "-inf", now - timeout, start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def take_over(self, batch_id: str, now: float, timeout: float) -> Batch | None:
        """Claim a batch whose worker is presumed dead; None if someone else did."""
        items = self._take_over(
            keys=[IN_FLIGHT, BATCH_PREFIX + batch_id], args=[batch_id, now - timeout, now]
        )
        return Batch(batch_id, items[::-1], recovered=True) if items else None

    def reread(self, batch: Batch) -> Batch | None:
        """A batch still in flight, payloads and all; None once it was finished."""
        items = cast(list[bytes], self._redis.lrange(batch.key, 0, -1))
        return Batch(batch.id, items[::-1], batch.recovered) if items else None

    def finish(self, batch: Batch, dead_letters: Sequence[bytes]) -> bool:
        """Dead letters pushed and the batch forgotten, once; False if already done."""
        if "dead_letters" in os.environ.get(CHAOS_BREAK, ""):
            dead_letters = ()  # a deliberately broken build: see CHAOS_BREAK
        done = self._finish(keys=[IN_FLIGHT, batch.key, DEAD], args=[batch.id, *dead_letters])
        return bool(done)

    def depth(self) -> int:
        return int(self._redis.llen(SOURCE))

    def in_flight(self) -> int:
        return int(self._redis.zcard(IN_FLIGHT))
