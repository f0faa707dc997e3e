"""Fire claims on a real Redis: one winner per fire, leases, take-over, expiry."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import redis

from schedules.claims import PENDING_INDEX, Fire, FireClaims

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def claims(client: redis.Redis, replica: str, clock: Clock) -> FireClaims:
    return FireClaims(client, replica, ttl_seconds=3600, lease_seconds=30, clock=clock)


def test_one_winner_among_many_racing_replicas(redis_client: redis.Redis) -> None:
    clock = Clock()
    fire = Fire("hb", T0)
    stores = [claims(redis_client, f"r{i}", clock) for i in range(16)]
    barrier = threading.Barrier(len(stores))
    won: list[str] = []

    def race(store: FireClaims, name: str) -> None:
        barrier.wait()
        if store.claim(fire):
            won.append(name)

    threads = [threading.Thread(target=race, args=(s, f"r{i}")) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert claims(redis_client, "late", clock).state(fire) == "pending"
    assert 0 < redis_client.ttl(fire.key) <= 3600


def test_confirmed_claims_are_final_and_leave_the_pending_index(redis_client: redis.Redis) -> None:
    clock = Clock()
    store = claims(redis_client, "a", clock)
    fire = Fire("hb", T0)
    assert store.claim(fire)
    store.confirm(fire)
    assert store.state(fire) == "enqueued"
    assert redis_client.zcard(PENDING_INDEX) == 0
    clock.now += timedelta(hours=0.5)
    assert store.stale() == []
    assert not claims(redis_client, "b", clock).claim(fire)


def test_a_pending_claim_is_taken_over_once_after_the_lease(redis_client: redis.Redis) -> None:
    clock = Clock()
    dead, b, c = (claims(redis_client, name, clock) for name in ("dead", "b", "c"))
    fire = Fire("hb", T0)
    assert dead.claim(fire)
    clock.now = T0 + timedelta(seconds=29)
    assert b.stale() == [] and not b.take_over(fire)
    clock.now = T0 + timedelta(seconds=31)
    assert b.stale() == [fire]
    assert b.take_over(fire)
    assert not c.take_over(fire)  # the lease restarted with b's claim
    b.confirm(fire)
    assert c.stale() == []
    assert redis_client.get(fire.key).decode().startswith("enqueued:b:")


def test_expired_fires_are_forgotten(redis_client: redis.Redis) -> None:
    clock = Clock()
    store = claims(redis_client, "a", clock)
    assert store.claim(Fire("hb", T0))
    clock.now = T0 + timedelta(hours=2)
    assert store.stale() == []
    assert redis_client.zcard(PENDING_INDEX) == 0
