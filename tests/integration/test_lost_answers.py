"""Redis answers lost on the way back, with the fleet's own client (which sends a command
again when its connection fails): every script and multi-step operation the fleet acts on
has the effect of one run, or reads back what happened.

The proxy forwards a command, waits for Redis to answer (Redis has acted), drops the answer
and cuts the connection: a fault no real server can be made to produce (tests/cutting_proxy).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
import redis

from schedules.claims import Fire, FireClaims
from tasks.impressions.queue import BATCH_PREFIX, IN_FLIGHT, SOURCE, ImpressionQueue
from tests.cutting_proxy import CuttingProxy, cutting_proxy
from workers.locks import PREFIX as LOCK_PREFIX
from workers.locks import job_locks
from workers.runtime import redis_client

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)


@pytest.fixture
def proxied(redis_url: str) -> Iterator[tuple[CuttingProxy, redis.Redis]]:
    """A proxy in front of the test Redis (armed by each test), and the fleet's client
    through it."""
    parts = urlsplit(redis_url)
    target = (parts.hostname or "127.0.0.1", parts.port or 6379)
    with cutting_proxy(target, b"never-sent", times=0) as proxy:
        client = redis_client(f"redis://127.0.0.1:{proxy.port}{parts.path}", socket_timeout=5)
        try:
            yield proxy, client
        finally:
            client.close()


def test_the_fleets_client_sends_again_when_a_connection_fails(redis_url: str) -> None:
    retry = redis_client(redis_url).get_retry()
    assert retry is not None and retry.get_retries() == 5


def test_a_take_whose_answer_is_lost_moves_its_batch_once(
    proxied: tuple[CuttingProxy, redis.Redis], redis_client_: redis.Redis
) -> None:
    proxy, client = proxied
    payloads = [f"impression-{i}".encode() for i in range(12_000)]
    for start in range(0, len(payloads), 1000):
        redis_client_.lpush(SOURCE, *payloads[start : start + 1000])
    queue = ImpressionQueue(client)
    first = queue.take(1, time.time())  # the scripts loaded, before the cut is armed
    assert first is not None
    queue.finish(first, [])
    taken = list(first.items)
    proxy.arm(b"EVALSHA", times=4)  # takes and finishes lose their answers
    while (batch := queue.take(5000, time.time())) is not None:
        taken += batch.items
        queue.finish(batch, [])  # a repeat answers "already finished": the batch is gone
    assert proxy.cuts == 4
    assert len(taken) == len(set(taken)) == 12_000  # nothing lost, nothing twice
    assert set(taken) == set(payloads)
    assert redis_client_.llen(SOURCE) == 0
    assert redis_client_.zcard(IN_FLIGHT) == 0
    assert not list(redis_client_.scan_iter(BATCH_PREFIX + "*"))


def test_a_take_over_whose_answer_is_lost_still_gets_the_batch(
    proxied: tuple[CuttingProxy, redis.Redis], redis_client_: redis.Redis
) -> None:
    proxy, client = proxied
    redis_client_.lpush(SOURCE, b"a", b"b", b"c")
    taken = ImpressionQueue(redis_client_).take(10, 1000.0)  # its worker then died
    assert taken is not None
    queue = ImpressionQueue(client)
    queue.orphans(2000.0, 60)  # connected, before the cut is armed
    proxy.arm(b"EVALSHA")
    recovered = queue.take_over(taken.id, 2000.123456, timeout=60)
    assert proxy.cuts == 1
    assert recovered is not None and recovered.items == [b"a", b"b", b"c"]
    # Anyone else finds it claimed (within the timeout of the claim).
    assert ImpressionQueue(redis_client_).take_over(taken.id, 2001.0, timeout=60) is None


def test_a_fire_claim_whose_answer_is_lost_is_still_won(
    proxied: tuple[CuttingProxy, redis.Redis], redis_client_: redis.Redis
) -> None:
    proxy, client = proxied

    def clock() -> datetime:
        return T0

    mine = FireClaims(client, "r1", ttl_seconds=3600, lease_seconds=30, clock=clock)
    other = FireClaims(redis_client_, "r2", ttl_seconds=3600, lease_seconds=30, clock=clock)
    fire = Fire("heartbeat", T0)
    mine.state(fire)  # connected, before the cut is armed
    proxy.arm(b"EVALSHA")
    assert mine.claim(fire) is True  # won, though its first answer was lost
    assert proxy.cuts == 1
    assert other.claim(fire) is False
    proxy.arm(b"SET")
    mine.confirm(fire)  # a transaction: sent again whole, same effect
    assert mine.state(fire) == "enqueued"
    assert redis_client_.zcard("fleet:schedule:pending") == 0


def test_a_lock_whose_answer_is_lost_is_held(
    proxied: tuple[CuttingProxy, redis.Redis], redis_client_: redis.Redis
) -> None:
    proxy, client = proxied
    client.ping()
    proxy.arm(LOCK_PREFIX.encode() + b"drift")
    with job_locks(client, ["drift"], ttl=30) as busy:
        assert proxy.cuts == 1
        assert busy is None  # held: the token found there is this acquisition's
        with job_locks(redis_client_, ["drift"], ttl=30) as other:
            assert other == "drift"
    assert not redis_client_.exists(LOCK_PREFIX + "drift")  # released


@pytest.fixture
def redis_client_(redis_url: str) -> Iterator[redis.Redis]:
    """A client with no proxy between it and Redis, that never sends twice."""
    client = redis.Redis.from_url(redis_url, retry=None)
    yield client
    client.close()


def test_a_users_take_whose_answer_is_lost_persists_every_dirty_sketch(
    proxied: tuple[CuttingProxy, redis.Redis], redis_client_: redis.Redis, postgres_url: str
) -> None:
    """The dirty sketches are taken into the call's own set: sent again, the take returns
    the same names (a bare SPOP sent again would take others and leave these unsaved)."""
    from sqlalchemy import func, select

    from tasks.impressions.users import DIRTY, TAKING, persist_users, users_key
    from workers.db import make_engine
    from workers.db.models import FlagImpressionUsers

    proxy, client = proxied
    day = T0.date()
    names = [users_key((f"flag{i}", "production", "on", day)) for i in range(40)]
    for index, name in enumerate(names):
        redis_client_.pfadd(name, *(f"u{index}-{n}" for n in range(index + 1)))
    redis_client_.sadd(DIRTY, *names)
    engine = make_engine(postgres_url)
    try:
        proxy.arm(b"EVAL")
        assert persist_users(client, engine, limit=25) == 25
        assert proxy.cuts == 1
        assert persist_users(client, engine, limit=25) == 15
        with engine.connect() as connection:
            saved = connection.scalar(select(func.count()).select_from(FlagImpressionUsers))
            users = connection.scalar(select(func.sum(FlagImpressionUsers.users)))
        estimated = sum(int(redis_client_.pfcount(name)) for name in names)  # HyperLogLog
        assert saved == 40 and users == estimated
    finally:
        engine.dispose()
    assert redis_client_.scard(DIRTY) == 0
    assert not list(redis_client_.scan_iter(match=TAKING + "*"))  # nothing left taken


def test_a_rotation_request_whose_answer_is_lost_is_still_this_checks(
    proxied: tuple[CuttingProxy, redis.Redis], redis_client_: redis.Redis
) -> None:
    """The request key's SET NX succeeded, its answer lost, the client sent it again and
    found the key taken: the token there is this check's own, so it still sends the one
    rotation; a second check in the interval does not."""
    from tasks.secrets import ENQUEUED_KEY, claim_rotation_request

    proxy, client = proxied
    proxy.arm((ENQUEUED_KEY + "db/chatbot").encode())
    assert claim_rotation_request(client, "db/chatbot") is True
    assert proxy.cuts == 1
    assert claim_rotation_request(client, "db/chatbot") is False  # the next check
    assert redis_client_.ttl(ENQUEUED_KEY + "db/chatbot") > 0


def test_a_lock_renewal_or_release_whose_answer_is_lost_keeps_the_lock_right(
    proxied: tuple[CuttingProxy, redis.Redis], redis_client_: redis.Redis
) -> None:
    """Renewal extends the key only while it holds our token, release deletes it only
    then: sent again after a lost answer, each has the effect of once. The lock outlives
    its TTL through a lost renewal, and a lost release still leaves it free."""
    from tests.helpers import wait_for

    proxy, client = proxied
    key = LOCK_PREFIX + "audit"
    ttl = 1.5
    with job_locks(client, ["audit"], ttl=ttl) as busy:
        assert busy is None
        proxy.arm(b"EVALSHA")  # the next renewal's answer is lost
        wait_for(lambda: proxy.cuts == 1, timeout=10, what="a renewal cut")
        cut_at = time.monotonic()
        wait_for(  # held for twice its TTL after the lost renewal: renewed all along
            lambda: time.monotonic() - cut_at > 2 * ttl and bool(redis_client_.exists(key)),
            timeout=10,
            what="the lock to outlive its TTL",
        )
        with job_locks(redis_client_, ["audit"], ttl=30) as other:
            assert other == "audit"
        proxy.arm(b"EVALSHA")  # and the release's
    assert proxy.cuts == 2
    assert not redis_client_.exists(key)
