"""What is waiting in Redis, read at scrape time so that it shows even when no worker runs:
broker queue depths, the platform's impression list (length, age of the oldest parsable
impression) and the drainers' batches in flight (all of them, and those whose worker seems
gone: in flight longer than the take-over timeout)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
import redis

from workers.jobs import QUEUES

IMPRESSIONS = "feature_flag_impressions"  # the platform's list (producers LPUSH)
IMPRESSIONS_DEAD = "feature_flag_impressions:dead"
IMPRESSIONS_IN_FLIGHT = "fleet:impressions:inflight"  # batch id -> time taken (or taken over)
# How many of the oldest impressions are looked at for one with a readable timestamp.
OLDEST_WINDOW = 64
# kombu's Redis transport keeps priorities in lists suffixed like this.
_PRIORITY_SEPARATOR, _PRIORITY_STEPS = "\x06\x16", (0, 3, 6, 9)


@dataclass
class Backlog:
    queues: dict[str, int] = field(default_factory=dict)
    impressions: int = 0
    impressions_dead: int = 0
    oldest_impression_age: float | None = None  # None: empty, or none of the oldest parses
    # Unreadable impressions (no JSON, no timestamp) at the old end, passed over for the age.
    oldest_unparsable: int = 0
    batches_in_flight: int = 0
    batches_orphaned: int = 0  # in flight for longer than the take-over timeout


def _list_names(queue: str) -> list[str]:
    return [
        queue if step == 0 else f"{queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS
    ]


def read_backlog(
    client: redis.Redis, now: datetime | None = None, orphaned_after: float = 120.0
) -> Backlog:
    """One round trip. Raises redis errors: the caller reports the broker as down.
    ``orphaned_after``: the take-over timeout, in seconds."""
    moment = now or datetime.now(UTC)
    pipe = client.pipeline(transaction=False)
    for queue in QUEUES:
        for name in _list_names(queue):
            pipe.llen(name)
    pipe.llen(IMPRESSIONS)
    pipe.llen(IMPRESSIONS_DEAD)
    pipe.lrange(IMPRESSIONS, -OLDEST_WINDOW, -1)  # the right end: the oldest, last
    pipe.zcard(IMPRESSIONS_IN_FLIGHT)
    pipe.zcount(IMPRESSIONS_IN_FLIGHT, "-inf", f"({moment.timestamp() - orphaned_after}")
    *lengths, impressions, dead, oldest, in_flight, orphaned = pipe.execute()
    steps = len(_PRIORITY_STEPS)
    queues = {q: sum(lengths[i * steps : (i + 1) * steps]) for i, q in enumerate(QUEUES)}
    age, unparsable = _oldest_age(oldest, moment)
    return Backlog(
        queues=queues,
        impressions=int(impressions),
        impressions_dead=int(dead),
        oldest_impression_age=age,
        oldest_unparsable=unparsable,
        batches_in_flight=int(in_flight),
        batches_orphaned=int(orphaned),
    )


def _oldest_age(window: list[bytes], now: datetime) -> tuple[float | None, int]:
    """The age of the oldest impression with a readable timestamp in ``window`` (oldest
    last), and how many unreadable ones were passed over to find it."""
    for passed, raw in enumerate(reversed(window)):
        age = _age(raw, now)
        if age is not None:
            return age, passed
    return None, len(window)


def _age(raw: bytes, now: datetime) -> float | None:
    try:
        stamp = orjson.loads(raw).get("timestamp")
        moment = datetime.fromisoformat(stamp)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (now - moment).total_seconds())
