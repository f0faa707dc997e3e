"""Redis locks for jobs that must not overlap (one drift run per environment, say).

A lock has a TTL above the job's hard time limit, so a worker killed while holding one
frees it by expiry. Acquisition never waits: a second run skips and says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import redis
from redis.exceptions import LockError

PREFIX = "fleet:lock:"


@contextlib.contextmanager
def job_locks(client: redis.Redis, names: Sequence[str], ttl: float) -> Iterator[str | None]:
    """Hold every lock in ``names`` or none. Yields None when all are held, else the name
    of the first lock another run holds (nothing is held then)."""
    held: list[redis.lock.Lock] = []
    busy: str | None = None
    try:
        for name in sorted(set(names)):
            lock = client.lock(PREFIX + name, timeout=ttl, blocking=False)
            if not lock.acquire(blocking=False):
                busy = name
                break
            held.append(lock)
        if busy is not None:
            _release(held)
            held = []
        yield busy
    finally:
        _release(held)


def _release(locks: list[redis.lock.Lock]) -> None:
    for lock in reversed(locks):
        with contextlib.suppress(LockError):  # expired: someone else may hold it now
            lock.release()
