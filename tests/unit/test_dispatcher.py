"""The fire-claim decisions, with an injected clock and an in-memory claim store.

The real claim store (Redis, Lua) is tested in tests/integration/test_claims.py; here the
question is what the dispatcher does with each answer.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

import tasks.heartbeat  # noqa: F401
from schedules.claims import Fire
from schedules.daemon import Dispatcher
from schedules.table import Schedule, parse_schedules
from workers.jobs import JOBS

T0 = datetime(2026, 1, 1, 10, 0, 0, tzinfo=UTC)
TABLE = """
schedules:
  - {name: hb, job: fleet.heartbeat, cron: "* * * * * *", misfire_grace_seconds: 5}
  - {name: lax, job: fleet.heartbeat, cron: "* * * * *", misfire_grace_seconds: null}
"""


class MemoryClaims:
    """Shared by several dispatchers to play several replicas."""

    def __init__(self, clock: Clock, lease: float = 30) -> None:
        self.clock = clock
        self.lease = lease
        self.state: dict[Fire, tuple[str, datetime]] = {}

    def claim(self, fire: Fire) -> bool:
        if fire in self.state:
            return False
        self.state[fire] = ("pending", self.clock())
        return True

    def confirm(self, fire: Fire) -> None:
        self.state[fire] = ("enqueued", self.clock())

    def stale(self) -> list[Fire]:
        cutoff = self.clock() - timedelta(seconds=self.lease)
        return [f for f, (s, at) in self.state.items() if s == "pending" and at <= cutoff]

    def take_over(self, fire: Fire) -> bool:
        if fire not in self.stale():
            return False
        self.state[fire] = ("pending", self.clock())
        return True


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


Sent = list[tuple[str, Fire]]
Counted = list[tuple[str, str]]


def replicas(
    clock: Clock, count: int, fail: frozenset[int] = frozenset()
) -> tuple[list[Dispatcher], Sent, Counted]:
    """``count`` dispatchers sharing one claim store; those in ``fail`` cannot send."""
    schedules = parse_schedules(TABLE, "t.yaml", JOBS)
    claims = MemoryClaims(clock)
    sent: Sent = []
    counted: Counted = []

    def sender(index: int) -> Callable[[Schedule, Fire], None]:
        def send(schedule: Schedule, fire: Fire) -> None:
            if index in fail:
                raise ConnectionError("broker away")
            sent.append((schedule.name, fire))

        return send

    def count_result(schedule: str, result: str) -> None:
        counted.append((schedule, result))

    built = [
        Dispatcher(schedules, claims, sender(i), clock=clock, count=count_result)
        for i in range(count)
    ]
    return built, sent, counted


def test_each_fire_is_sent_once_whatever_the_number_of_replicas(clock: Clock) -> None:
    dispatchers, sent, counted = replicas(clock, 3)
    for second in range(10):
        at = T0 + timedelta(seconds=second)
        clock.now = at + timedelta(milliseconds=5)
        results = sorted(d.fire("hb", at) for d in dispatchers)
        assert results == ["already_claimed", "already_claimed", "enqueued"]
    assert [fire.at for _, fire in sent] == [T0 + timedelta(seconds=s) for s in range(10)]
    assert counted.count(("hb", "enqueued")) == 10


def test_a_fire_later_than_its_grace_is_misfired_not_sent(clock: Clock) -> None:
    (dispatcher,), sent, counted = replicas(clock, 1)
    clock.now = T0 + timedelta(seconds=6)
    assert dispatcher.fire("hb", T0) == "misfired"
    clock.now = T0 + timedelta(seconds=5)
    assert dispatcher.fire("hb", T0) == "enqueued"  # exactly at the grace: still on time
    assert len(sent) == 1 and counted[0] == ("hb", "misfired")


def test_no_grace_means_never_misfired(clock: Clock) -> None:
    (dispatcher,), _, _ = replicas(clock, 1)
    clock.now = T0 + timedelta(hours=3)
    assert dispatcher.fire("lax", T0) == "enqueued"


def test_a_failed_send_is_recovered_by_another_replica_after_the_lease(clock: Clock) -> None:
    (broken, healthy), sent, counted = replicas(clock, 2, fail=frozenset({0}))
    assert broken.fire("hb", T0) == "error"
    assert healthy.fire("hb", T0) == "already_claimed"  # the claim is held...
    assert healthy.recover() == 0  # ...and not yet stale
    clock.now = T0 + timedelta(seconds=31)
    assert healthy.recover() == 1
    assert healthy.recover() == 0  # recovered once, not again
    assert sent == [("hb", Fire("hb", T0))]
    assert ("hb", "recovered") in counted


def test_a_recovered_fire_keeps_its_task_id(clock: Clock) -> None:
    fire = Fire("hb", T0)
    assert fire.task_id == Fire("hb", T0 + timedelta(microseconds=0)).task_id
    assert fire.task_id != Fire("hb", T0 + timedelta(seconds=1)).task_id
    assert Fire.from_key(fire.key) == fire
