"""Pure aggregation by tables: buckets at minute edges, time zones, counts, bad records."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import pytest

from tasks.impressions.records import REASONS, aggregate, parse_timestamp

NOW = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)
SKEW = timedelta(minutes=5)


def imp(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "flag_key": "new_ui_enabled",
        "environment": "production",
        "variant": "on",
        "user_id": "u1",
        "tenant_id": "t1",
        "timestamp": "2026-03-01T12:00:00",
        "context": {"plan": "pro"},
    }
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def minute(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("stamp", "bucket"),
    [
        ("2026-03-01T12:00:00", "2026-03-01T12:00:00"),
        ("2026-03-01T12:00:59.999999", "2026-03-01T12:00:00"),
        ("2026-03-01T12:01:00", "2026-03-01T12:01:00"),
        ("2026-03-01T11:59:59.999999", "2026-03-01T11:59:00"),
        ("2026-03-01T13:00:30+01:00", "2026-03-01T12:00:00"),
        ("2026-03-01T06:30:10-05:30", "2026-03-01T12:00:00"),
        ("2026-03-01T12:00:10Z", "2026-03-01T12:00:00"),
        ("2026-03-01T23:59:59", "2026-03-01T23:59:00"),
    ],
)
def test_minute_buckets_follow_the_impressions_own_timestamp(stamp: str, bucket: str) -> None:
    now = datetime(2026, 3, 2, tzinfo=UTC)
    result = aggregate([imp(timestamp=stamp)], now, SKEW)
    assert list(result.counts) == [("new_ui_enabled", "production", "on", "t1", minute(bucket))]


def test_counts_per_key_and_per_flag() -> None:
    raw = [
        imp(),
        imp(),
        imp(variant="off"),
        imp(tenant_id=None),
        imp(tenant_id=None, user_id=None),
        imp(environment="staging"),
        imp(timestamp="2026-03-01T12:01:05"),
        imp(flag_key="model_configuration", variant="premium"),
    ]
    now = datetime(2026, 3, 1, 12, 2, tzinfo=UTC)
    result = aggregate(raw, now, SKEW)
    m0, m1 = minute("2026-03-01T12:00:00"), minute("2026-03-01T12:01:00")
    assert dict(result.counts) == {
        ("new_ui_enabled", "production", "on", "t1", m0): 2,
        ("new_ui_enabled", "production", "off", "t1", m0): 1,
        ("new_ui_enabled", "production", "on", None, m0): 2,
        ("new_ui_enabled", "staging", "on", "t1", m0): 1,
        ("new_ui_enabled", "production", "on", "t1", m1): 1,
        ("model_configuration", "production", "premium", "t1", m0): 1,
    }
    assert result.flags[("new_ui_enabled", "production")] == [6, minute("2026-03-01T12:01:05")]
    assert result.impressions == 8 and result.dead == []
    assert result.users[("new_ui_enabled", "production", "on", date(2026, 3, 1))] == {"u1"}


def test_users_are_per_day_and_anonymous_ones_are_not_users() -> None:
    raw = [
        imp(user_id="a"),
        imp(user_id="b"),
        imp(user_id=None),
        imp(user_id="a", timestamp="2026-03-02T00:00:01"),
        imp(user_id=7),
    ]
    result = aggregate(raw, datetime(2026, 3, 2, 1, tzinfo=UTC), SKEW)
    key = ("new_ui_enabled", "production", "on")
    assert result.users[(*key, date(2026, 3, 1))] == {"a", "b", "7"}
    assert result.users[(*key, date(2026, 3, 2))] == {"a"}


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        (b"{not json", "not_json", "unexpected character"),
        (b"", "not_json", "Input is a zero-length"),
        (b"[1, 2]", "not_an_object", "a JSON list"),
        (b'"text"', "not_an_object", "a JSON str"),
        (imp(flag_key=...), "missing_field", "flag_key is missing"),
        (imp(environment=None), "missing_field", "environment is missing"),
        (imp(variant=...), "missing_field", "variant is missing"),
        (imp(timestamp=...), "missing_field", "timestamp is missing"),
        (imp(flag_key=""), "empty_field", "flag_key is empty"),
        (imp(variant="   "), "empty_field", "variant is empty"),
        (imp(flag_key={"a": 1}), "bad_field_type", "flag_key is a dict, not text"),
        (imp(tenant_id=["t"]), "bad_field_type", "tenant_id is a list, not text"),
        (imp(variant=True), "bad_field_type", "variant is a bool, not text"),
        (imp(timestamp="yesterday"), "bad_timestamp", "timestamp 'yesterday' is not ISO 8601"),
        (imp(timestamp="2026-13-01T00:00:00"), "bad_timestamp", "is not ISO 8601"),
        (imp(timestamp="2026-03-01T12:06:00"), "future_timestamp", "is ahead of"),
    ],
)
def test_bad_records_become_dead_letters_with_their_reason(
    payload: bytes, reason: str, detail: str
) -> None:
    result = aggregate([imp(), payload, imp()], NOW, SKEW)
    assert result.impressions == 2 and sum(result.counts.values()) == 2
    (letter,) = result.dead
    assert letter.reason == reason and reason in REASONS
    assert detail in letter.detail
    assert letter.payload == payload.decode(errors="replace")


def test_within_the_skew_is_not_the_future() -> None:
    result = aggregate([imp(timestamp="2026-03-01T12:05:30")], NOW, SKEW)
    assert result.impressions == 1


def test_dead_letters_keep_the_payload_and_say_why() -> None:
    result = aggregate([b"nope"], NOW, SKEW)
    encoded = orjson.loads(result.dead[0].encode("b1", NOW))
    assert encoded == {
        "reason": "not_json",
        "detail": result.dead[0].detail,
        "payload": "nope",
        "batch_id": "b1",
        "dead_lettered_at": NOW.isoformat(),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01T12:00:00", datetime(2026, 3, 1, 12, tzinfo=UTC)),
        ("2026-03-01T12:00:00+02:00", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01 12:00:00.5", datetime(2026, 3, 1, 12, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_parse_timestamp(text: str, expected: datetime) -> None:
    assert parse_timestamp(text) == expected


def _random_batch(seed: int, shuffled: bool) -> list[bytes]:
    import random

    rng = random.Random(seed)
    base = datetime(2026, 3, 1, 11, 58, 0)
    stamps = sorted(base + timedelta(seconds=rng.uniform(0, 150)) for _ in range(400))
    if shuffled:
        rng.shuffle(stamps)
    out = []
    for moment in stamps:
        text = moment.isoformat()
        out.append(
            imp(
                flag_key=rng.choice(["a", "b", "c"]),
                environment=rng.choice(["production", "staging"]),
                variant=rng.choice(["on", "off"]),
                tenant_id=rng.choice(["t1", "t2", None]),
                user_id=rng.choice(["u1", "u2", "u3", None]),
                timestamp=text if rng.random() < 0.8 else text.replace("T", " "),
            )
        )
    return out


@pytest.mark.parametrize(
    ("seed", "shuffled", "extra"),
    [
        (1, False, None),
        (2, True, None),
        (3, False, imp(timestamp="2026-03-01T12:00:05+00:00")),  # one aware stamp
        (4, True, imp(flag_key="  ")),  # a blank name
        (5, False, imp(timestamp="2026-03-01T12:30:00")),  # one in the future
        (6, False, imp(timestamp="20260301T120000")),  # basic ISO format
        (7, True, imp(user_id=7, tenant_id=8)),  # ids as numbers
        (8, False, b"not json"),
    ],
)
def test_the_whole_batch_path_counts_as_the_record_by_record_path(
    seed: int, shuffled: bool, extra: bytes | None
) -> None:
    from tasks.impressions import records

    raw = _random_batch(seed, shuffled) + ([extra] if extra is not None else [])
    latest = (NOW + SKEW).replace(tzinfo=None)
    one_by_one = records._by_record(records._decoded(raw), latest, NOW)
    result = aggregate(raw, NOW, SKEW)
    assert result.counts == one_by_one.counts
    assert result.flags == one_by_one.flags
    assert result.users == one_by_one.users
    assert result.impressions == one_by_one.impressions
    assert [(d.reason, d.payload) for d in result.dead] == [
        (d.reason, d.payload) for d in one_by_one.dead
    ]
    whole = records.Tally()._add_whole(records._decoded(raw).records or [], latest)
    assert whole == (extra is None)  # the common batch takes the fast path


def test_a_blank_tenant_is_no_tenant() -> None:
    # The database keys a count on coalesce(tenant_id, ''): the two must be one key here
    # too, or one upsert would touch a row twice and the batch could never be applied.
    result = aggregate([imp(tenant_id=""), imp(tenant_id=None), imp(tenant_id="t1")], NOW, SKEW)
    assert result.counts == {
        ("new_ui_enabled", "production", "on", None, minute("2026-03-01T12:00:00")): 2,
        ("new_ui_enabled", "production", "on", "t1", minute("2026-03-01T12:00:00")): 1,
    }


def test_a_tally_of_batches_counts_as_their_aggregates_added_up() -> None:
    from tasks.impressions.records import Tally, merge

    batches = [
        _random_batch(11, False),
        [*_random_batch(12, True), b"not json", imp(timestamp="2026-03-01T12:30:00")],
        _random_batch(13, False),
    ]
    tally = Tally()
    counted = [tally.add(batch, NOW, SKEW) for batch in batches]
    separately = [aggregate(batch, NOW, SKEW) for batch in batches]
    total, expected = tally.total(), merge(separately)
    assert (total.counts, total.flags, total.users) == (
        expected.counts,
        expected.flags,
        expected.users,
    )
    assert total.impressions == sum(c.impressions for c in counted) == 1200
    assert [c.dead_by_reason for c in counted] == [
        {},
        {"not_json": 1, "future_timestamp": 1},
        {},
    ]


def test_a_drain_collects_the_young_generation_less_often_and_restores_the_process_setting() -> (
    None
):
    import contextlib
    import gc

    from tasks.impressions import YOUNG_COLLECTION_EVERY, few_collections

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with pytest.raises(RuntimeError), few_collections():
            assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, 10, 10)
            raise RuntimeError("the drain failed")
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(500_000, 5, 5)  # a process that asked for fewer keeps its own
        with few_collections():
            assert gc.get_threshold() == (500_000, 5, 5)
        assert gc.get_threshold() == (500_000, 5, 5)
        gc.set_threshold(0)  # collection turned off stays off
        with few_collections():
            assert gc.get_threshold()[0] == 0
        assert gc.get_threshold()[0] == 0
        # Drains overlapping in threads, ending in any order: the setting comes back once
        # the last one ends, not when the first does nor to the raised value.
        gc.set_threshold(700, 10, 10)
        with contextlib.ExitStack() as second:
            with few_collections():
                second.enter_context(few_collections())
            assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, 10, 10)
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*before)
