"""Impressions on real Redis and databases: exact counts under kills, concurrency, bad
records, retention, distinct users, dead-letter replay."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from sqlalchemy import Engine, func, select, text, update

from tasks.impressions import GROUP_IMPRESSIONS, drain
from tasks.impressions.queue import DEAD, IN_FLIGHT, SOURCE
from tasks.impressions.rollup import fold_minutes
from tasks.impressions.users import DIRTY, PREFIX
from tests.helpers import ROOT, run_fleet
from workers.db.models import (
    FeatureFlag,
    FlagImpressionCount,
    FlagImpressionHourly,
    FlagImpressionUsers,
    ImpressionBatch,
)
from workers.runtime import Runtime, install
from workers.settings import FleetSettings

FLAGS = ("new_ui_enabled", "model_configuration", "checkout_v2")
ENVS = ("production", "staging")
BAD = [
    b"{oops",
    b"[]",
    b'{"flag_key": "x", "environment": "p", "variant": "on"}',
    b'{"flag_key": "", "environment": "p", "variant": "on", "timestamp": "2026-01-01T00:00:00"}',
    b'{"flag_key": "x", "environment": "p", "variant": "on", "timestamp": "soon"}',
]


class Stream:
    """Generated impressions and, independently of the code under test, what they count."""

    def __init__(
        self, count: int, bad_every: int = 100, seed: int = 1, start: datetime | None = None
    ) -> None:
        rng = random.Random(seed)
        start = start or datetime.now(UTC) - timedelta(minutes=30)
        self.payloads: list[bytes] = []
        self.expected: Counter[tuple[Any, ...]] = Counter()
        self.per_flag: Counter[tuple[str, str]] = Counter()
        self.bad = 0
        for i in range(count):
            if bad_every and i % bad_every == bad_every - 1:
                self.payloads.append(BAD[self.bad % len(BAD)])
                self.bad += 1
                continue
            moment = start + timedelta(seconds=rng.randrange(1800))
            flag, env = rng.choice(FLAGS), rng.choice(ENVS)
            variant = rng.choice(("on", "off", "b"))
            tenant = None if rng.random() < 0.1 else f"t{rng.randrange(5)}"
            self.payloads.append(
                orjson.dumps(
                    {
                        "flag_key": flag,
                        "environment": env,
                        "variant": variant,
                        "user_id": f"u{rng.randrange(50)}",
                        "tenant_id": tenant,
                        "timestamp": moment.replace(tzinfo=None).isoformat(),
                        "context": {},
                    }
                )
            )
            bucket = moment.replace(second=0, microsecond=0)
            self.expected[(flag, env, variant, tenant, bucket)] += 1
            self.per_flag[(flag, env)] += 1

    @property
    def good(self) -> int:
        return sum(self.expected.values())

    def push(self, client: redis.Redis) -> None:
        for start in range(0, len(self.payloads), 1000):
            client.lpush(SOURCE, *self.payloads[start : start + 1000])


def settings_for(db_url: str, redis_url: str, home: Path, **extra: Any) -> FleetSettings:
    return FleetSettings(database_url=db_url, redis_url=redis_url, home=home, **extra)


@pytest.fixture
def rt(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    runtime = install(
        Runtime(
            settings_for(db_url, redis_url, tmp_path, impressions_inflight_timeout=timedelta(0))
        )
    )
    yield runtime
    runtime.close()


def stored_counts(engine: Engine) -> Counter[tuple[Any, ...]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                FlagImpressionCount.flag_key,
                FlagImpressionCount.environment,
                FlagImpressionCount.variant,
                FlagImpressionCount.tenant_id,
                FlagImpressionCount.bucket_start,
                FlagImpressionCount.count,
            )
        )
        return Counter({tuple(r[:5]): r[5] for r in rows})


def add_flags(engine: Engine) -> None:
    now = datetime.now(UTC)
    with engine.begin() as connection:
        for flag in FLAGS:
            for env in ENVS:
                connection.execute(
                    FeatureFlag.__table__.insert().values(
                        key=flag,
                        environment=env,
                        name=flag,
                        flag_type="boolean",
                        enabled=True,
                        default_variant="off",
                        variants="[]",
                        targeting_rules="[]",
                        created_at=now,
                        created_by="t",
                        updated_at=now,
                        updated_by="t",
                        rollout_percentage=0.0,
                        impression_count=0,
                    )
                )


def flag_counts(engine: Engine) -> Counter[tuple[str, str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(FeatureFlag.key, FeatureFlag.environment, FeatureFlag.impression_count)
        )
        return Counter({(k, e): n for k, e, n in rows if n})


def assert_exact(rt: Runtime, stream: Stream) -> None:
    assert stored_counts(rt.engine) == stream.expected
    assert flag_counts(rt.engine) == stream.per_flag
    assert rt.redis.llen(DEAD) == stream.bad
    assert rt.redis.llen(SOURCE) == 0
    assert rt.redis.zcard(IN_FLIGHT) == 0
    assert list(rt.redis.scan_iter("fleet:impressions:batch:*")) == []


def test_counts_equal_what_was_pushed(rt: Runtime) -> None:
    add_flags(rt.engine)
    stream = Stream(5_000)
    stream.push(rt.redis)
    summary = drain(rt, batch_size=700, budget_seconds=60)
    assert summary["counted"] == stream.good
    assert summary["dead_lettered"] == stream.bad
    assert_exact(rt, stream)
    with rt.engine.connect() as connection:
        assert (
            connection.execute(select(func.count()).select_from(ImpressionBatch)).scalar_one() == 8
        )
        last = connection.execute(select(func.max(FeatureFlag.last_evaluated))).scalar_one()
    assert last is not None and last <= datetime.now(UTC)


def test_every_kind_of_bad_record_is_dead_lettered_while_good_ones_count(rt: Runtime) -> None:
    good = Stream(20, bad_every=0)
    rt.redis.lpush(SOURCE, *good.payloads[:10], *BAD, *good.payloads[10:])
    summary = drain(rt, batch_size=7, budget_seconds=60)
    assert summary["dead_letters_by_reason"] == {
        "bad_timestamp": 1,
        "empty_field": 1,
        "missing_field": 1,
        "not_an_object": 1,
        "not_json": 1,
    }
    assert stored_counts(rt.engine) == good.expected
    letters = [orjson.loads(raw) for raw in rt.redis.lrange(DEAD, 0, -1)]
    assert {letter["payload"].encode() for letter in letters} == set(BAD)
    assert all(letter["reason"] and letter["detail"] and letter["batch_id"] for letter in letters)


def test_a_blank_tenant_and_no_tenant_are_one_count(rt: Runtime) -> None:
    # One key in the database (coalesce(tenant_id, '')): a batch holding both spellings
    # must still apply, as one row; on PostgreSQL the table leaves room for HOT updates.
    stamp = (datetime.now(UTC) - timedelta(minutes=1)).replace(tzinfo=None).isoformat()
    payloads = [
        orjson.dumps(
            {
                "flag_key": "f",
                "environment": "production",
                "variant": "on",
                "tenant_id": tenant,
                "timestamp": stamp,
            }
        )
        for tenant in ("", None, "", "t1")
    ]
    for _ in range(2):
        rt.redis.lpush(SOURCE, *payloads)
        summary = drain(rt, batch_size=100, budget_seconds=60)
        assert summary["counted"] == 4 and summary["dead_lettered"] == 0
    counts = stored_counts(rt.engine)
    assert sorted(counts.values()) == [2, 6]
    assert {key[3] for key in counts} == {None, "t1"}
    if rt.engine.dialect.name == "postgresql":
        with rt.engine.connect() as connection:
            options = connection.execute(
                text("SELECT reloptions FROM pg_class WHERE relname = 'flag_impression_counts'")
            ).scalar_one()
        assert options == ["fillfactor=50"]


def test_batches_are_taken_oldest_first_and_kept_in_redis_until_finished(
    redis_client: redis.Redis,
) -> None:
    from tasks.impressions.queue import BATCH_PREFIX, ImpressionQueue

    queue = ImpressionQueue(redis_client)
    payloads = [b"impression-%d" % n for n in range(2_500)]
    for payload in payloads[:2_000]:  # one at a time, as the platform's services push
        redis_client.lpush(SOURCE, payload)
    first = queue.take(1_000, time.time())
    redis_client.lpush(SOURCE, *payloads[2_000:])  # producers go on meanwhile
    second, third = queue.take(1_000, time.time()), queue.take(1_000, time.time())
    assert first is not None and second is not None and third is not None
    assert (first.items, second.items, third.items) == (
        payloads[:1_000],
        payloads[1_000:2_000],
        payloads[2_000:],
    )
    assert queue.take(1_000, time.time()) is None
    assert redis_client.exists(SOURCE) == 0
    assert redis_client.zcard(IN_FLIGHT) == 3
    # Each batch is in Redis until finished: a taker-over or a reread sees the same payloads.
    assert redis_client.llen(BATCH_PREFIX + second.id) == 1_000
    reread = queue.reread(second.counted())
    assert reread is not None and reread.items == second.items
    taken_over = queue.take_over(third.id, time.time(), timeout=0)
    assert taken_over is not None and taken_over.items == third.items
    assert queue.finish(second, []) and not queue.finish(second, [])
    assert queue.reread(second) is None and redis_client.zcard(IN_FLIGHT) == 2


def test_a_batch_applied_twice_counts_once(rt: Runtime) -> None:
    """A worker presumed dead finishes after its batch was taken over: no double count."""
    from tasks.impressions import DrainSummary, UserSketches, process
    from tasks.impressions.queue import ImpressionQueue

    add_flags(rt.engine)
    stream = Stream(300, bad_every=50)
    stream.push(rt.redis)
    queue = ImpressionQueue(rt.redis)
    batch = queue.take(1000, time.time())
    assert batch is not None
    taken_over = queue.take_over(batch.id, time.time(), timeout=0)
    assert taken_over is not None and taken_over.items == batch.items
    first, second = DrainSummary(), DrainSummary()
    sketches = UserSketches(rt.redis, rt.engine)
    process(rt, queue, sketches, taken_over, first)
    process(rt, queue, sketches, batch, second)  # the slow original, arriving late
    assert (first.counted, second.counted, second.already_applied) == (stream.good, 0, 1)
    assert_exact(rt, stream)


def test_a_group_commits_its_batches_once_each_and_falls_back_when_one_was_applied(
    rt: Runtime,
) -> None:
    """Batches committed together are each in the ledger; a group holding a batch applied
    before (its worker died after committing) is applied one batch at a time instead."""
    from tasks.impressions import DrainSummary, Tally, UserSketches, commit, count, prepare
    from tasks.impressions.queue import ImpressionQueue
    from tasks.impressions.store import apply_batches

    add_flags(rt.engine)
    stream = Stream(900, bad_every=100)
    stream.push(rt.redis)
    queue = ImpressionQueue(rt.redis)
    batches = [queue.take(300, time.time()) for _ in range(3)]
    assert all(batch is not None for batch in batches)
    tally = Tally()
    # As drain holds them: counted, payloads left in Redis.
    taken = [(batch.counted(), count(rt, tally, batch)) for batch in batches if batch is not None]
    sketches = UserSketches(rt.redis, rt.engine)
    alone, group = DrainSummary(), DrainSummary()
    first = Tally()  # batch 1 applied, its worker died before finishing
    assert batches[0] is not None
    first_counted = count(rt, first, batches[0])
    with rt.engine.begin() as connection:
        now = datetime.now(UTC)
        apply_batches(connection, [(taken[0][0].id, first_counted)], prepare(rt, first), now)
    commit(rt, queue, sketches, taken, group, prepare(rt, tally))  # one at a time instead
    assert (group.batches, group.already_applied) == (3, 1)
    assert group.counted == taken[1][1].impressions + taken[2][1].impressions
    assert_exact(rt, stream)
    with rt.engine.connect() as connection:
        ledger = connection.execute(select(func.count()).select_from(ImpressionBatch)).scalar_one()
    assert ledger == 3
    # And a fresh group: one transaction, three ledger rows, exact counts.
    more = Stream(900, bad_every=100, seed=7)
    more.push(rt.redis)
    batches = [queue.take(300, time.time()) for _ in range(3)]
    tally = Tally()
    taken = [(batch.counted(), count(rt, tally, batch)) for batch in batches if batch]
    commit(rt, queue, sketches, taken, alone, prepare(rt, tally))
    assert (alone.batches, alone.already_applied, alone.counted) == (3, 0, more.good)
    stream.expected.update(more.expected)
    stream.per_flag.update(more.per_flag)
    stream.bad += more.bad
    assert_exact(rt, stream)


def test_a_group_skips_a_batch_another_worker_took_over_and_finished(rt: Runtime) -> None:
    """This worker was presumed dead while its group gathered: another took one batch over
    and finished it. The group falls back to one batch at a time and skips that one."""
    from tasks.impressions import DrainSummary, Tally, UserSketches, commit, count, prepare, process
    from tasks.impressions.queue import ImpressionQueue

    add_flags(rt.engine)
    stream = Stream(900, bad_every=100, seed=11)
    stream.push(rt.redis)
    queue = ImpressionQueue(rt.redis)
    batches = [queue.take(300, time.time()) for _ in range(3)]
    tally = Tally()
    taken = [(batch.counted(), count(rt, tally, batch)) for batch in batches if batch]
    sketches = UserSketches(rt.redis, rt.engine)
    other, mine = DrainSummary(), DrainSummary()
    taken_over = queue.take_over(taken[1][0].id, time.time(), timeout=0)
    assert taken_over is not None
    process(rt, queue, sketches, taken_over, other)
    assert rt.redis.exists(taken[1][0].key) == 0  # finished: its payloads are gone
    commit(rt, queue, sketches, taken, mine, prepare(rt, tally))
    assert (mine.batches, mine.already_applied, other.batches) == (3, 1, 1)
    assert mine.counted + other.counted == stream.good
    assert (mine.impressions, other.impressions) == (900, 300)  # batches each one saw
    assert rt.redis.zcard(IN_FLIGHT) == 0
    assert_exact(rt, stream)


def _impression(user: str, moment: datetime) -> bytes:
    return orjson.dumps(
        {
            "flag_key": "new_ui_enabled",
            "environment": "production",
            "variant": "on",
            "user_id": user,
            "tenant_id": None,
            "timestamp": moment.replace(tzinfo=None).isoformat(),
        }
    )


def _commit_and_die(rt: Runtime, batch: Any) -> None:
    """What a worker does up to its commit, and then it is SIGKILLed: counts and the ledger
    row committed; users not added, dead letters not pushed, the batch not finished."""
    from tasks.impressions import Tally, count, prepare
    from tasks.impressions.store import apply_batches

    tally = Tally()
    counted = count(rt, tally, batch)
    with rt.engine.begin() as connection:
        apply_batches(connection, [(batch.id, counted)], prepare(rt, tally), datetime.now(UTC))


def _recover_at(rt: Runtime, batch_id: str, clock: float) -> Any:
    """Another worker, whose clock reads ``clock``, takes the batch over and applies it."""
    from tasks.impressions import DrainSummary, UserSketches, process
    from tasks.impressions.queue import ImpressionQueue

    queue = ImpressionQueue(rt.redis)
    batch = queue.take_over(batch_id, clock, timeout=0)
    assert batch is not None
    summary = DrainSummary()
    process(rt, queue, UserSketches(rt.redis, rt.engine), batch, summary)
    return summary


def _dead_letters(rt: Runtime) -> list[dict[str, Any]]:
    return [orjson.loads(item) for item in rt.redis.lrange(DEAD, 0, -1)]


@pytest.mark.parametrize(
    ("taker_offset", "stamp_offset", "dead"),
    [
        # The taker's clock is 2 minutes behind: a record 4 minutes ahead of real time is
        # in the future for it (5 minutes of skew allowed), not for the recovering worker.
        (-120.0, 240.0, 1),
        # The taker's clock is 3 minutes ahead: a record 6 minutes ahead of real time is
        # fine for it, in the future for the recovering worker.
        (180.0, 360.0, 0),
    ],
    ids=["taker-behind", "taker-ahead"],
)
def test_a_recovered_batch_is_judged_at_its_take_time_not_the_recovering_workers_clock(
    rt: Runtime, taker_offset: float, stamp_offset: float, dead: int
) -> None:
    """Issue 18: the first worker commits and dies before pushing its dead letters; a
    worker with another clock (two minutes later, or skewed) recovers the batch. The record
    is counted or dead-lettered, exactly as the first worker decided: never neither, never
    both."""
    from tasks.impressions.queue import ImpressionQueue

    real = time.time()
    now = datetime.fromtimestamp(real, UTC)
    edge = _impression("edge-user", now + timedelta(seconds=stamp_offset))
    plain = [_impression(f"user-{i}", now - timedelta(minutes=1)) for i in range(20)]
    rt.redis.lpush(SOURCE, *plain, edge)
    add_flags(rt.engine)
    queue = ImpressionQueue(rt.redis)
    batch = queue.take(100, real + taker_offset)
    assert batch is not None
    _commit_and_die(rt, batch)
    recovered = _recover_at(rt, batch.id, real + 200)  # 3 minutes 20 seconds later
    assert recovered.already_applied == 1 and recovered.counted == 0
    letters = _dead_letters(rt)
    assert len(letters) == dead
    assert [letter["reason"] for letter in letters] == ["future_timestamp"] * dead
    counted = sum(stored_counts(rt.engine).values())
    assert counted + len(letters) == 21  # each record counted or dead-lettered, once
    assert rt.redis.zcard(IN_FLIGHT) == 0 and rt.redis.llen(SOURCE) == 0


def test_recovery_pushes_the_same_dead_letters_byte_for_byte_and_adds_the_users(
    rt: Runtime,
) -> None:
    """Two batches with the same records: one applied straight through, one by a worker
    that died after its commit and was recovered, with a clock moved minutes ahead. The
    recovered one pushes the same dead letters (the same bytes, but its batch id) and adds
    every user, so the day's distinct users count them."""
    from tasks.impressions import DrainSummary, UserSketches, process
    from tasks.impressions.queue import ImpressionQueue
    from tasks.impressions.users import persist_users

    add_flags(rt.engine)
    real = time.time()
    now = datetime.fromtimestamp(real, UTC)
    records = [_impression(f"user-{i}", now - timedelta(minutes=2)) for i in range(200)]
    records += [BAD[0], _impression("late", now + timedelta(minutes=4))]
    queue = ImpressionQueue(rt.redis)
    rt.redis.lpush(SOURCE, *records)
    straight = queue.take(1000, real - 120)  # a clock 2 minutes behind: "late" is dead
    assert straight is not None
    process(rt, queue, UserSketches(rt.redis, rt.engine), straight, DrainSummary())
    expected = [
        {k: v for k, v in letter.items() if k != "batch_id"} for letter in _dead_letters(rt)
    ]
    assert sorted(letter["reason"] for letter in expected) == ["future_timestamp", "not_json"]
    rt.redis.delete(DEAD)
    for key in rt.redis.scan_iter(PREFIX + "*"):
        rt.redis.delete(key)  # the sketches start empty again
    with rt.engine.begin() as connection:
        connection.execute(text("DELETE FROM flag_impression_users"))

    rt.redis.lpush(SOURCE, *records)
    batch = queue.take(1000, real - 120)
    assert batch is not None
    _commit_and_die(rt, batch)
    _recover_at(rt, batch.id, real + 180)
    letters = _dead_letters(rt)
    assert {letter["batch_id"] for letter in letters} == {batch.id}
    assert [{k: v for k, v in x.items() if k != "batch_id"} for x in letters] == expected
    persist_users(rt.redis, rt.engine)
    with rt.engine.connect() as connection:
        (users,) = connection.execute(select(FlagImpressionUsers.users)).one()
    assert 200 * 0.97 <= users <= 200 * 1.03  # HyperLogLog: within 3%


def test_a_database_outage_fails_the_run_and_loses_nothing(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Nothing listens where the database should be: the run fails with the database's
    error, every batch it took stays in flight (dead letters too, unpushed), and the next
    run, with the database back, takes them over and counts them once."""
    from sqlalchemy.exc import OperationalError

    nowhere = "postgresql+psycopg://postgres@127.0.0.1:9/test?connect_timeout=2"
    down = install(Runtime(settings_for(nowhere, redis_url, tmp_path)))
    stream = Stream(3_000, bad_every=100, seed=21)
    stream.push(down.redis)
    with pytest.raises(OperationalError):
        drain(down, 500, 60)
    assert (down.redis.llen(SOURCE), down.redis.zcard(IN_FLIGHT)) == (0, 6)
    assert down.redis.llen(DEAD) == 0
    down.close()
    rt = install(
        Runtime(
            settings_for(
                postgres_url, redis_url, tmp_path, impressions_inflight_timeout=timedelta(0)
            )
        )
    )
    add_flags(rt.engine)
    summary = drain(rt, 500, 60)
    assert (summary["recovered_batches"], summary["counted"]) == (6, stream.good)
    assert_exact(rt, stream)
    rt.close()


def test_sigkill_at_every_step_loses_and_doubles_nothing(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    from tests.impression_drainer import POINTS

    env = drainer_env(postgres_url, redis_url, tmp_path)
    rt = install(
        Runtime(
            settings_for(
                postgres_url, redis_url, tmp_path, impressions_inflight_timeout=timedelta(0)
            )
        )
    )
    add_flags(rt.engine)
    total = Stream(0)
    for seed, point in enumerate(POINTS):
        stream = Stream(1_500, bad_every=75, seed=seed + 10)
        stream.push(rt.redis)
        total.expected.update(stream.expected)
        total.per_flag.update(stream.per_flag)
        total.bad += stream.bad
        crashed = run_drainer(env, "--crash-at", point, "--on-batch", "3", "--batch-size", "200")
        assert crashed.returncode == -signal.SIGKILL, (point, crashed.stderr[-2000:])
        # In flight at most: a group committing and one gathering (batches of 200 here).
        assert rt.redis.zcard(IN_FLIGHT) <= 2 * (GROUP_IMPRESSIONS // 200), point
        drain(rt, 200, 60)  # another worker: recovers the orphan, drains the rest
        assert stored_counts(rt.engine) == total.expected, point
        assert_exact(rt, total)
    rt.close()


def test_random_sigkills_over_many_trials(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = drainer_env(postgres_url, redis_url, tmp_path)
    rt = install(
        Runtime(
            settings_for(
                postgres_url, redis_url, tmp_path, impressions_inflight_timeout=timedelta(0)
            )
        )
    )
    add_flags(rt.engine)
    rng = random.Random(5)
    total = Stream(0)
    interrupted = 0
    for trial in range(5):
        stream = Stream(30_000, bad_every=500, seed=100 + trial)
        stream.push(rt.redis)
        total.expected.update(stream.expected)
        total.per_flag.update(stream.per_flag)
        total.bad += stream.bad
        drainer = subprocess.Popen(
            [sys.executable, "-m", "tests.impression_drainer", "--batch-size", "300"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Kill it once it is draining, at a random moment.
        deadline = time.monotonic() + 60
        while rt.redis.llen(SOURCE) == len(stream.payloads) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.25))  # draining 30,000 takes about half a second
        drainer.send_signal(signal.SIGKILL)
        drainer.wait(30)
        if rt.redis.llen(SOURCE) or rt.redis.zcard(IN_FLIGHT):
            interrupted += 1  # killed with work left: the case this test is about
        drain(rt, 500, 120)
        assert_exact(rt, total)
    assert interrupted >= 3, f"only {interrupted} of 5 kills hit a drainer mid-work"
    rt.close()


@pytest.mark.parametrize("drainers", [2, 4])
def test_concurrent_drainers_count_exactly(
    postgres_url: str, redis_url: str, tmp_path: Path, drainers: int
) -> None:
    env = drainer_env(postgres_url, redis_url, tmp_path)
    rt = install(Runtime(settings_for(postgres_url, redis_url, tmp_path)))
    add_flags(rt.engine)
    stream = Stream(30_000, bad_every=1000, seed=drainers)
    stream.push(rt.redis)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.impression_drainer", "--batch-size", "250"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(drainers)
    ]
    for process in processes:
        _, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-2000:]
    assert_exact(rt, stream)
    with rt.engine.connect() as connection:
        batches = connection.execute(select(func.count()).select_from(ImpressionBatch)).scalar_one()
    assert batches == len(stream.payloads) // 250
    rt.close()


def run_drainer(env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    """One drainer process to its end (or its chosen SIGKILL), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "tests.impression_drainer", *options],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def drainer_env(db_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_DATABASE_URL=db_url,
        FLEET_REDIS_URL=redis_url,
        FLEET_HOME=str(tmp_path / "home"),
        PYTHONPATH=str(ROOT),
    )
    return env


def test_retention_folds_minutes_into_hours_without_losing_a_count(rt: Runtime) -> None:
    old = datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
    stream = Stream(3_000, bad_every=0, start=old)  # 30 minutes from 09:00
    late = Stream(500, bad_every=0, seed=9, start=old + timedelta(hours=2))
    stream.push(rt.redis)
    late.push(rt.redis)
    now = datetime.now(UTC)
    drain(rt, 1000, 60)
    before = sum(stored_counts(rt.engine).values())
    result = fold_minutes(rt.engine, old + timedelta(hours=1), now)  # folds 09:xx only
    assert result["minute_rows_folded"] == len(stream.expected)
    with rt.engine.connect() as connection:
        hourly = Counter(
            {
                tuple(r[:5]): r[5]
                for r in connection.execute(
                    select(
                        FlagImpressionHourly.flag_key,
                        FlagImpressionHourly.environment,
                        FlagImpressionHourly.variant,
                        FlagImpressionHourly.tenant_id,
                        FlagImpressionHourly.bucket_start,
                        FlagImpressionHourly.count,
                    )
                )
            }
        )
    expected_hourly: Counter[tuple[Any, ...]] = Counter()
    for (flag, env, variant, tenant, _minute), n in stream.expected.items():
        expected_hourly[(flag, env, variant, tenant, old)] += n
    assert hourly == expected_hourly
    assert stored_counts(rt.engine) == late.expected  # the 11:xx minutes stay
    assert sum(hourly.values()) + sum(stored_counts(rt.engine).values()) == before
    # A late impression for a folded hour folds in additively next time.
    Stream(10, bad_every=0, seed=3, start=old).push(rt.redis)
    drain(rt, 100, 10)
    fold_minutes(rt.engine, old + timedelta(hours=1), now)
    with rt.engine.connect() as connection:
        folded = connection.execute(select(func.sum(FlagImpressionHourly.count))).scalar_one()
    assert folded == stream.good + 10
    assert fold_minutes(rt.engine, old + timedelta(hours=1), now)["minute_rows_folded"] == 0


def test_distinct_users_survive_redis_losing_its_sketches(rt: Runtime) -> None:
    stamp = datetime.now(UTC).replace(tzinfo=None).isoformat()

    def push(users: range) -> None:
        rt.redis.lpush(
            SOURCE,
            *[
                orjson.dumps(
                    {
                        "flag_key": "f",
                        "environment": "production",
                        "variant": "b",
                        "user_id": f"user-{u}",
                        "tenant_id": None,
                        "timestamp": stamp,
                    }
                )
                for u in users
            ],
        )

    push(range(0, 1000))
    drain(rt, 300, 30)
    for key in rt.redis.scan_iter(PREFIX + "*"):
        if key != DIRTY.encode():
            rt.redis.delete(key)  # Redis restarted: nothing on disk
    push(range(500, 1500))
    drain(rt, 300, 30)
    with rt.engine.connect() as connection:
        (users,) = connection.execute(select(FlagImpressionUsers.users)).one()
    assert 1500 * 0.97 <= users <= 1500 * 1.03  # HyperLogLog: within 3%
    if rt.engine.dialect.name == "postgresql":  # stored with lz4 where the server has it
        with rt.engine.connect() as connection:
            lz4 = connection.execute(
                text(
                    "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                    "WHERE name = 'default_toast_compression'"
                )
            ).scalar()
            if lz4:  # PostgreSQL 14 and later, built with lz4
                method = connection.execute(
                    text("SELECT pg_column_compression(sketch) FROM flag_impression_users")
                ).scalar_one()
                assert method == "lz4"


def test_a_sketch_read_earlier_never_overwrites_one_read_later(rt: Runtime) -> None:
    """Two workers persist the same day's sketch: the one that read it first commits last
    (paused between reading and writing). The database keeps the later read, which holds
    every user; with the later one lost, Redis (nothing on disk) would restore fewer."""
    from tasks.impressions.users import (
        DIRTY,
        UserSketches,
        _upsert,
        persist_users,
        read_sketches,
        users_key,
    )

    key = ("f", "production", "on", date(2026, 12, 2))
    name = users_key(key)
    sketches = UserSketches(rt.redis, rt.engine)
    sketches.add({key: {f"u{i}" for i in range(100)}})
    first_read = read_sketches(rt.redis, [name])  # the first worker, then paused
    sketches.add({key: {f"u{i}" for i in range(100, 400)}})  # more users, dirty again
    assert persist_users(rt.redis, rt.engine) == 1  # the second worker
    _upsert(rt.engine, first_read)  # the first one wakes up and writes what it read
    with rt.engine.connect() as connection:
        users, sketch = connection.execute(
            select(FlagImpressionUsers.users, FlagImpressionUsers.sketch)
        ).one()
    assert users == rt.redis.pfcount(name) and 400 * 0.97 <= users <= 400 * 1.03
    assert sketch[16:] == rt.redis.get(name)[16:]  # the registers (a count is cached before)
    assert rt.redis.scard(DIRTY) == 0


def test_a_sketch_with_more_users_replaces_one_stamped_later(rt: Runtime) -> None:
    """A clock set back (a Redis failover, or a row stamped by an older version with a
    worker's clock) must not pin a stale row: a read counting more users replaces it."""
    from tasks.impressions.users import UserSketches, persist_users, users_key

    key = ("f", "production", "on", date(2026, 12, 2))
    name = users_key(key)
    sketches = UserSketches(rt.redis, rt.engine)
    sketches.add({key: {f"u{i}" for i in range(100)}})
    assert persist_users(rt.redis, rt.engine) == 1
    with rt.engine.begin() as connection:  # stamped an hour ahead of Redis's clock
        connection.execute(
            update(FlagImpressionUsers).values(updated_at=datetime.now(UTC) + timedelta(hours=1))
        )
    sketches.add({key: {f"u{i}" for i in range(100, 300)}})
    assert persist_users(rt.redis, rt.engine) == 1
    with rt.engine.connect() as connection:
        users = connection.execute(select(FlagImpressionUsers.users)).scalar_one()
    assert users == rt.redis.pfcount(name) and 300 * 0.97 <= users <= 300 * 1.03


def _users_recovered(reason: str) -> float:
    from prometheus_client import REGISTRY

    import monitoring.metrics  # noqa: F401  (the counter registered)

    value = REGISTRY.get_sample_value("fleet_impressions_users_recovered_total", {"reason": reason})
    assert value is not None  # created at 0 when the metrics are loaded
    return value


def test_takes_left_by_an_older_version_are_given_back_too(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a rolling upgrade, a worker of the previous version (take sets unregistered,
    expiring an hour after the take) dies mid-save: the first save of a new worker registers
    its set as taken when its expiry says, keeps it from expiring, and gives it back once it
    is 5 minutes old, like its own."""
    import tasks.impressions.users as users

    day = date(2026, 12, 7)
    old, young = (users.TAKING + token for token in ("old-version-1", "old-version-2"))
    names: dict[str, list[str]] = {old: [], young: []}
    for taking, ttl, first in ((old, 3600 - 400, 0), (young, 3600 - 10, 10)):
        for i in range(first, first + 10):
            name = users.users_key((f"flag{i}", "production", "on", day))
            rt.redis.pfadd(name, f"u{i}")
            names[taking].append(name)
        rt.redis.sadd(taking, *names[taking])  # as that version took them: no registry
        rt.redis.expire(taking, ttl)  # taken 400 s and 10 s ago
    monkeypatch.setattr(users, "_unlisted_checked", False)
    assert users.persist_users(rt.redis, rt.engine) == 10  # the old one, given back
    assert rt.redis.zcard(users.TAKINGS) == 1 and rt.redis.ttl(young) == -1  # kept
    with rt.engine.connect() as connection:
        saved = connection.execute(select(FlagImpressionUsers.flag_key)).scalars().all()
    assert sorted(saved) == sorted(f"flag{i}" for i in range(10))
    assert users.register_unlisted_takes(rt.redis) == 0  # registered once


def test_a_redis_restart_during_a_run_loses_no_saved_user(rt: Runtime) -> None:
    """Redis restarts while a run is on: the run checked its sketches already, so nothing
    is merged back from the database before new users go in, and Redis's sketch counts
    fewer users than the stored row. The save keeps the stored row, merges it into Redis's
    and saves the union (without that, the row would drop to the users added since)."""
    from tasks.impressions.users import DIRTY, UserSketches, persist_users, users_key

    key = ("f", "production", "on", date(2026, 12, 7))
    name = users_key(key)
    sketches = UserSketches(rt.redis, rt.engine)
    sketches.add({key: {f"u{i}" for i in range(300)}})
    assert persist_users(rt.redis, rt.engine) == 1
    rt.redis.delete(name)  # Redis restarted, nothing on disk
    sketches.add({key: {f"u{i}" for i in range(300, 400)}})
    assert rt.redis.pfcount(name) < 110
    recovered = _users_recovered("kept_stored")
    assert persist_users(rt.redis, rt.engine) == 1
    assert _users_recovered("kept_stored") == recovered + 1
    with rt.engine.connect() as connection:
        users = connection.execute(select(FlagImpressionUsers.users)).scalar_one()
    assert users == rt.redis.pfcount(name) and 400 * 0.97 <= users <= 400 * 1.03
    assert rt.redis.scard(DIRTY) == 0


def test_a_worker_killed_while_saving_sketches_leaves_none_unsaved(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """SIGKILLed after taking the changed sketches' names and reading them, before writing:
    the names are in its own set, not the dirty one. A later save leaves them alone while
    the taker may still be at work, then gives them back and writes every sketch."""
    from tasks.impressions.users import (
        ORPHANED_AFTER,
        TAKING,
        TAKINGS,
        give_back_orphans,
        parse_users_key,
        persist_users,
    )

    env = drainer_env(postgres_url, redis_url, tmp_path)
    rt = install(Runtime(settings_for(postgres_url, redis_url, tmp_path)))
    add_flags(rt.engine)
    Stream(2_000, seed=21).push(rt.redis)
    crashed = run_drainer(env, "--crash-at", "mid_users_save")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert rt.redis.llen(SOURCE) == 0 and rt.redis.scard(DIRTY) == 0  # all taken
    names = {
        key.decode()
        for key in rt.redis.scan_iter(PREFIX + "*")
        if not key.decode().startswith((DIRTY, TAKING, TAKINGS))
    }
    assert len(names) >= len(FLAGS) * len(ENVS) * 3  # every variant seen (a day or two)
    with rt.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(FlagImpressionUsers)) == 0

    assert give_back_orphans(rt.redis) == 0  # young: its taker may still be saving
    assert persist_users(rt.redis, rt.engine) == 0
    for member, score in rt.redis.zrange(TAKINGS, 0, -1, withscores=True):
        rt.redis.zadd(TAKINGS, {member: score - ORPHANED_AFTER})  # five minutes on
    recovered = _users_recovered("orphaned_take")
    assert persist_users(rt.redis, rt.engine) == len(names)
    assert _users_recovered("orphaned_take") == recovered + len(names)
    with rt.engine.connect() as connection:
        saved = connection.execute(
            select(
                FlagImpressionUsers.flag_key,
                FlagImpressionUsers.environment,
                FlagImpressionUsers.variant,
                FlagImpressionUsers.day,
                FlagImpressionUsers.users,
            )
        ).all()
    assert {tuple(row[:4]): row[4] for row in saved} == {
        parse_users_key(name): rt.redis.pfcount(name) for name in names
    }
    assert rt.redis.zcard(TAKINGS) == 0 and not list(rt.redis.scan_iter(TAKING + "*"))
    rt.close()


def test_backlog_ages_the_oldest_readable_impression_and_counts_batches_in_flight(
    rt: Runtime,
) -> None:
    """Issue 18: unreadable impressions at the old end no longer read as age 0; batches in
    flight, and those past the take-over timeout, show at scrape time."""
    from monitoring.metrics import BacklogCollector
    from tasks.impressions.queue import ImpressionQueue
    from workers.backlog import read_backlog

    now = datetime.now(UTC)
    assert read_backlog(rt.redis, now).oldest_impression_age is None
    rt.redis.lpush(SOURCE, b"{oops", b'{"timestamp": "soon"}')  # the oldest two: unreadable
    rt.redis.lpush(SOURCE, _impression("u1", now - timedelta(seconds=90)))
    rt.redis.lpush(SOURCE, _impression("u2", now - timedelta(seconds=10)))
    backlog = read_backlog(rt.redis, now)
    assert backlog.impressions == 4 and backlog.oldest_unparsable == 2
    assert backlog.oldest_impression_age == pytest.approx(90, abs=0.01)

    rt.redis.lpush(SOURCE, *[_impression(f"u{i}", now) for i in range(10)])
    queue = ImpressionQueue(rt.redis)
    assert queue.take(3, now.timestamp() - 300) is not None  # its worker died 5 minutes ago
    assert queue.take(3, now.timestamp() - 60) is not None
    assert queue.take(3, now.timestamp()) is not None
    backlog = read_backlog(rt.redis, now, orphaned_after=120)
    assert (backlog.batches_in_flight, backlog.batches_orphaned) == (3, 1)
    assert backlog.oldest_unparsable == 0  # the unreadable ones were taken first
    assert read_backlog(rt.redis, now, orphaned_after=30).batches_orphaned == 2

    scraped = {
        family.name: family.samples[0].value
        for family in BacklogCollector(lambda: backlog).collect()
        if family.samples and not family.samples[0].labels
    }
    assert scraped["fleet_impressions_inflight_batches"] == 3
    assert scraped["fleet_impressions_orphaned_batches"] == 1
    assert scraped["fleet_impressions_oldest_unparsable"] == 0

    rt.redis.delete(SOURCE)
    rt.redis.lpush(SOURCE, *([b"{oops"] * 70))  # more than the window: age unknown, all counted
    backlog = read_backlog(rt.redis, now)
    assert (backlog.oldest_impression_age, backlog.oldest_unparsable) == (None, 64)


def test_replay_dead_goes_in_bounded_steps_and_looks_at_each_letter_once(rt: Runtime) -> None:
    """Issue 18: replay moves letters in atomic steps of a bounded size; with a reason, the
    others stay dead (each looked at once), in their order; letters dead-lettered while the
    replay runs are left for the next one; a limit is kept."""
    from tasks.impressions.queue import replay_dead_letters

    def letter(n: int, reason: str) -> bytes:
        payload = orjson.dumps({"n": n}).decode()
        return orjson.dumps({"reason": reason, "payload": payload, "batch_id": "b"})

    reasons = ["future_timestamp" if n % 3 == 0 else "not_json" for n in range(2500)]
    rt.redis.lpush(DEAD, *[letter(n, r) for n, r in enumerate(reasons)], b"not a letter")
    steps: list[tuple[int, int, int]] = []

    def progress(looked: int, total: int, moved: int) -> None:
        steps.append((looked, total, moved))
        if len(steps) == 1:  # a drain dead-letters more while the replay runs
            rt.redis.lpush(DEAD, letter(9999, "future_timestamp"))

    moved = replay_dead_letters(rt.redis, 10_000, "future_timestamp", chunk=700, progress=progress)
    wanted = [n for n, r in enumerate(reasons) if r == "future_timestamp"]
    assert moved == len(wanted)
    assert [looked for looked, _, _ in steps] == [700, 1400, 2100, 2501]
    assert {total for _, total, _ in steps} == {2501}
    requeued = [orjson.loads(item)["n"] for item in rt.redis.lrange(SOURCE, 0, -1)]
    assert requeued[::-1] == wanted  # oldest first, as they were
    left = rt.redis.lrange(DEAD, 0, -1)
    kept = [orjson.loads(raw)["payload"] for raw in left if raw != b"not a letter"]
    kept_numbers = [orjson.loads(payload)["n"] for payload in kept]
    assert sorted(kept_numbers) == sorted(
        [n for n, r in enumerate(reasons) if r == "not_json"] + [9999]
    )
    assert b"not a letter" in left
    rt.redis.delete(SOURCE)
    assert replay_dead_letters(rt.redis, 5, None, chunk=2) == 5
    assert rt.redis.llen(SOURCE) == 5


def test_the_report_warns_when_the_platform_still_counts_impressions_itself(
    rt: Runtime,
) -> None:
    """Issue 18: with the platform's per-evaluation UPDATE left on, impression_count grows
    twice as fast as the fleet's counts; the next report says so, for that flag only."""
    from tasks.impressions.doubling import check

    add_flags(rt.engine)
    now = datetime.now(UTC)
    with rt.engine.connect() as connection:
        assert check(connection, rt.redis, now) == []  # the first sample: nothing to compare

    def evaluate(flag: str, times: int, platform_counts: bool) -> None:
        rt.redis.lpush(
            SOURCE,
            *[
                orjson.dumps(
                    {
                        "flag_key": flag,
                        "environment": "production",
                        "variant": "on",
                        "user_id": f"u{i}",
                        "timestamp": now.replace(tzinfo=None).isoformat(),
                    }
                )
                for i in range(times)
            ],
        )
        if platform_counts:  # the reference's track_flag_impression, once per evaluation
            with rt.engine.begin() as connection:
                for _ in range(times):
                    connection.execute(
                        text(
                            "UPDATE feature_flags SET impression_count = impression_count + 1 "
                            "WHERE key = :k AND environment = 'production'"
                        ),
                        {"k": flag},
                    )

    evaluate("new_ui_enabled", 300, platform_counts=True)
    evaluate("checkout_v2", 300, platform_counts=False)
    drain(rt, 1000, 30)
    with rt.engine.connect() as connection:
        assert check(connection, rt.redis, now + timedelta(seconds=30)) == []  # too soon
        (doubled,) = check(connection, rt.redis, now + timedelta(seconds=120))
    assert (doubled.flag_key, doubled.environment) == ("new_ui_enabled", "production")
    assert (doubled.impression_count_grew, doubled.fleet_counted) == (600, 300)
    assert "switch off" in doubled.message
    evaluate("new_ui_enabled", 100, platform_counts=False)  # switched off
    drain(rt, 1000, 30)
    with rt.engine.connect() as connection:
        assert check(connection, rt.redis, now + timedelta(seconds=240)) == []


def test_replay_dead_sends_letters_back_after_a_fix(fleet_env: dict[str, str]) -> None:
    client = redis.Redis.from_url(fleet_env["FLEET_REDIS_URL"])
    future = (datetime.now(UTC) + timedelta(minutes=30)).replace(tzinfo=None).isoformat()
    client.lpush(
        SOURCE,
        orjson.dumps({"flag_key": "f", "environment": "e", "variant": "v", "timestamp": future}),
        b"{garbage",
    )
    done = run_fleet("run", "impressions.aggregate", env=fleet_env)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["dead_letters_by_reason"] == {
        "future_timestamp": 1,
        "not_json": 1,
    }
    replay = run_fleet("impressions", "replay-dead", "--reason", "future_timestamp", env=fleet_env)
    assert replay.returncode == 0, replay.stderr
    assert (
        replay.stdout.strip()
        == "re-queued 1 dead letters; 1 remain in feature_flag_impressions:dead"
    )
    fleet_env["FLEET_IMPRESSIONS_FUTURE_SKEW"] = "1h"  # the fix: clocks are allowed to lead
    again = run_fleet("run", "impressions.aggregate", env=fleet_env)
    assert orjson.loads(again.stdout)["counted"] == 1
    report = run_fleet("impressions", "report", "--json", env=fleet_env)
    assert orjson.loads(report.stdout)["rows"] == [
        {"flag_key": "f", "environment": "e", "variant": "v", "impressions": 1, "users_today": None}
    ]
    bad = run_fleet("impressions", "replay-dead", "--reason", "nonsense", env=fleet_env)
    assert bad.returncode == 2 and "'nonsense' is not one of" in bad.stderr
    client.close()


@pytest.mark.parametrize("nth", [0, 1, 2])
def test_a_counts_commit_whose_answer_is_lost_counts_once(
    postgres_url: str, redis_url: str, tmp_path: Path, nth: int
) -> None:
    """PostgreSQL commits (a group of batches with counts, ledger and users, or a later
    step) but the answer is cut on the way back (a proxy lets ``nth`` COMMITs through, then
    loses the next one's answer): the run fails, its batches still in flight, and the next
    run, taking them over, finds them in the ledger and counts nothing twice."""
    from sqlalchemy.engine import make_url

    from tests.cutting_proxy import cutting_proxy

    url = make_url(postgres_url)
    direct = install(
        Runtime(
            settings_for(
                postgres_url, redis_url, tmp_path, impressions_inflight_timeout=timedelta(0)
            )
        )
    )
    add_flags(direct.engine)
    stream = Stream(4_000, bad_every=100, seed=40 + nth)
    stream.push(direct.redis)
    with cutting_proxy((url.host or "127.0.0.1", url.port or 5432), b"COMMIT", times=0) as proxy:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        proxied = install(
            Runtime(
                settings_for(
                    through, redis_url, tmp_path, impressions_inflight_timeout=timedelta(0)
                )
            )
        )
        proxy.arm(b"COMMIT", after=nth)
        with pytest.raises(Exception):  # noqa: B017 - the cut connection, whatever its class
            drain(proxied, 500, 60)
        assert proxy.cuts == 1
        proxied.close()
    rt = install(direct)
    summary = drain(rt, 500, 60)
    if nth == 0:  # the first commit is a group of counted batches: taken over, not recounted
        assert summary["recovered_batches"] >= 1
    assert_exact(rt, stream)
    rt.close()
