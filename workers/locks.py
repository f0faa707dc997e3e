"""Redis locks for jobs that must not overlap (one drift run per environment, say).

Acquisition never waits: a second run skips and says so. A held lock is renewed in the
background while its holder lives, so its TTL can stay short: a worker killed while holding
one frees it within ``ttl`` seconds, not at the end of the job's time limit.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator, Sequence

import redis
from redis.exceptions import LockError, RedisError

PREFIX = "fleet:lock:"


@contextlib.contextmanager
def job_locks(client: redis.Redis, names: Sequence[str], ttl: float) -> Iterator[str | None]:
    """Hold every lock in ``names`` or none. Yields None when all are held, else the name
    of the first lock another run holds (nothing is held then)."""
    held: list[redis.lock.Lock] = []
    busy: str | None = None
    for name in sorted(set(names)):
        # Not thread-local: the renewal thread must see the token the holder acquired with.
        lock = client.lock(PREFIX + name, timeout=ttl, blocking=False, thread_local=False)
        if not _acquire(client, lock):
            busy = name
            break
        held.append(lock)
    if busy is not None:
        _release(held)
        held = []
    stop = threading.Event()
    renewer = None
    if held:
        renewer = threading.Thread(
            target=_renew, args=(held, ttl, stop), daemon=True, name="lock-renewal"
        )
        renewer.start()
    try:
        yield busy
    finally:
        stop.set()
        if renewer is not None:
            renewer.join(timeout=5)
        _release(held)


def _acquire(client: redis.Redis, lock: redis.lock.Lock) -> bool:
    """``SET NX`` with this acquisition's own token, resolved by reading back: when the
    answer to a successful SET was lost and the client sent it again, the repeat finds the
    key taken, and the token there says it is ours."""
    token = uuid.uuid4().hex
    if lock.acquire(blocking=False, token=token):
        return True
    if client.get(lock.name) == token.encode():
        lock.local.token = token.encode()  # as Lock.acquire keeps it
        return True
    return False


def _renew(locks: list[redis.lock.Lock], ttl: float, stop: threading.Event) -> None:
    # Renewal (a script that extends the key only while it holds our token) and release
    # (one that deletes it only then) are safe to repeat; a repeated release finds the key
    # gone and is ignored.
    while not stop.wait(ttl / 3):
        for lock in locks:
            with contextlib.suppress(LockError, RedisError):  # lost: the next run will see
                lock.reacquire()


def _release(locks: list[redis.lock.Lock]) -> None:
    for lock in reversed(locks):
        with contextlib.suppress(LockError, RedisError):  # expired: someone may hold it now
            lock.release()
