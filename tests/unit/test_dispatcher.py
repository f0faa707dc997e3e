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
  - {name: every2, job: fleet.heartbeat, cron: "*/2 * * * * *", catch_up: once}
  - {name: slow, job: fleet.heartbeat, cron: "*/10 * * * *", misfire_grace_seconds: 30}
"""


class MemoryClaims:
    """Shared by several dispatchers to play several replicas."""

    def __init__(self, clock: Clock, lease: float = 30) -> None:
        self.clock = clock
        self.lease = lease
        self.state: dict[Fire, tuple[str, datetime]] = {}
        self.skipped: dict[str, datetime] = {}

    def claim(self, fire: Fire) -> bool:
        if fire in self.state:
            return False
        self.state[fire] = ("pending", self.clock())
        return True

    def confirm(self, fire: Fire) -> None:
        self.state[fire] = ("enqueued", self.clock())

    def skip_to(self, schedule: str, at: datetime) -> None:
        self.skipped[schedule] = max(at, self.skipped.get(schedule, at))

    def last_fire(self, schedule: str) -> datetime | None:
        done = [
            f.at for f, (s, _) in self.state.items() if f.schedule == schedule and s == "enqueued"
        ]
        if schedule in self.skipped:
            done.append(self.skipped[schedule])
        return max(done, default=None)

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


def test_sent_fires_expire_at_the_next_fire_or_the_grace_whichever_is_first(
    clock: Clock,
) -> None:
    (dispatcher,), sent, _ = replicas(clock, 1)
    for name in ("hb", "lax", "slow"):
        dispatcher.fire(name, T0)
    expiry = {name: fire.expires - fire.at for name, fire in sent}  # type: ignore[operator]
    assert expiry == {
        "hb": timedelta(seconds=1),  # the next fire comes before the 5 s grace
        "lax": timedelta(minutes=1),  # no grace: the next fire
        "slow": timedelta(seconds=30),  # the grace comes before the next fire
    }


def test_catch_up_once_sends_the_latest_missed_fire_and_counts_the_rest(clock: Clock) -> None:
    (first, second), sent, counted = replicas(clock, 2)
    clock.now = T0
    assert first.fire("every2", T0) == "enqueued"
    assert first.fire("hb", T0) == "enqueued"
    sent.clear()
    # every replica down for 7 s: every2 missed T0+2, +4, +6; hb missed seven fires
    clock.now = T0 + timedelta(seconds=7)
    report = second.catch_up()
    assert report == {"every2": 2, "hb": 7}  # catch_up once: two dropped, one sent
    assert [(name, f.at) for name, f in sent] == [("every2", T0 + timedelta(seconds=6))]
    assert sent[0][1].expires == clock.now + timedelta(seconds=2)
    assert counted.count(("every2", "caught_up")) == 1
    assert counted.count(("every2", "missed")) == 2
    assert counted.count(("hb", "missed")) == 7 and ("hb", "caught_up") not in counted
    # a second replica starting next finds everything accounted for: no run, no count
    assert first.catch_up() == {}
    assert len(sent) == 1 and counted.count(("hb", "missed")) == 7


def test_nothing_to_catch_up_on_a_first_start_or_when_on_time(clock: Clock) -> None:
    (dispatcher,), sent, counted = replicas(clock, 1)
    clock.now = T0 + timedelta(hours=1)
    assert dispatcher.catch_up() == {}  # never fired: nothing recorded, nothing missed
    assert dispatcher.fire("every2", clock.now) == "enqueued"
    clock.now += timedelta(seconds=1)
    assert dispatcher.catch_up() == {}
    assert len(sent) == 1 and not [c for c in counted if c[1] == "missed"]


def test_the_shipped_table_catches_up_the_jobs_that_cover_everything_since_their_last_run() -> None:
    import tasks.audit
    import tasks.canary
    import tasks.drift
    import tasks.impressions
    import tasks.secrets  # noqa: F401
    from schedules.table import default_schedule_file

    table = parse_schedules(default_schedule_file().read_text(), "fleet.yaml", JOBS)
    once = {s.job for s in table if s.catch_up == "once"}
    assert once == {"impressions.aggregate", "audit.ship", "drift.detect"}
