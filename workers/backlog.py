"""What is waiting in Redis, read at scrape time so that it shows even when no worker runs:
broker queue depths and the platform's impression list (length, age of the oldest)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
import redis

from workers.jobs import QUEUES

IMPRESSIONS = "feature_flag_impressions"  # the platform's list (producers LPUSH)
IMPRESSIONS_DEAD = "feature_flag_impressions:dead"
# kombu's Redis transport keeps priorities in lists suffixed like this.
_PRIORITY_SEPARATOR, _PRIORITY_STEPS = "\x06\x16", (0, 3, 6, 9)


@dataclass
class Backlog:
    queues: dict[str, int] = field(default_factory=dict)
    impressions: int = 0
    impressions_dead: int = 0
    oldest_impression_age: float | None = None  # None: empty, or the oldest has no timestamp


def _list_names(queue: str) -> list[str]:
    return [
        queue if step == 0 else f"{queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS
    ]


def read_backlog(client: redis.Redis, now: datetime | None = None) -> Backlog:
    """One round trip. Raises redis errors: the caller reports the broker as down."""
    pipe = client.pipeline(transaction=False)
    for queue in QUEUES:
        for name in _list_names(queue):
            pipe.llen(name)
    pipe.llen(IMPRESSIONS)
    pipe.llen(IMPRESSIONS_DEAD)
    pipe.lindex(IMPRESSIONS, -1)  # the right end: the oldest
    *lengths, impressions, dead, oldest = pipe.execute()
    steps = len(_PRIORITY_STEPS)
    queues = {q: sum(lengths[i * steps : (i + 1) * steps]) for i, q in enumerate(QUEUES)}
    return Backlog(
        queues=queues,
        impressions=int(impressions),
        impressions_dead=int(dead),
        oldest_impression_age=_age(oldest, now or datetime.now(UTC)),
    )


def _age(raw: bytes | None, now: datetime) -> float | None:
    if raw is None:
        return None
    try:
        stamp = orjson.loads(raw).get("timestamp")
        moment = datetime.fromisoformat(stamp)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (now - moment).total_seconds())
