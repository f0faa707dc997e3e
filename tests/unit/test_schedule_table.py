from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

import tasks.heartbeat  # noqa: F401 - declares fleet.heartbeat
from schedules.table import (
    ScheduleError,
    cron_trigger,
    crontab_weekdays,
    default_schedule_file,
    load_schedules,
    parse_schedules,
)
from workers.jobs import JOBS

GOOD = """
schedules:
  - name: heartbeat
    job: fleet.heartbeat
    cron: "*/5 * * * *"
    kwargs: {hold_seconds: 1}
    misfire_grace_seconds: 30
  - name: fast
    job: fleet.heartbeat
    cron: "*/10 * * * * *"
    queue: secrets
    enabled: false
"""


def test_a_good_table_parses() -> None:
    first, second = parse_schedules(GOOD, "fleet.yaml", JOBS)
    assert (first.name, first.job, first.queue) == ("heartbeat", "fleet.heartbeat", "default")
    assert first.kwargs == {"hold_seconds": 1.0}
    assert first.misfire_grace_seconds == 30 and first.enabled
    assert (second.queue, second.enabled) == ("secrets", False)


def test_the_shipped_tables_are_valid() -> None:
    from workers.celery_app import JOB_MODULES, load_jobs

    load_jobs(JOB_MODULES)  # every job the tables may name, whatever ran before
    shipped = load_schedules(default_schedule_file(), JOBS)
    assert {s.job for s in shipped} <= set(JOBS)
    demo = load_schedules(default_schedule_file().with_name("demo.yaml"), JOBS)
    assert demo


def _entry(**fields: object) -> str:
    base: dict[str, object] = {"name": "s1", "job": "fleet.heartbeat", "cron": '"* * * * *"'}
    base.update(fields)
    lines = "\n".join(f"    {k}: {v}" for k, v in base.items() if v is not None)
    return "schedules:\n  -\n" + lines + "\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_entry(cron='"61 * * * *"'), "schedule 's1': bad cron '61 * * * *':"),
        (_entry(cron='"* * *"'), "schedule 's1': bad cron '* * *': 3 fields; expected 5"),
        (_entry(cron='"* * * * 9"'), "schedule 's1': bad cron '* * * * 9': weekday 9 is outside"),
        (_entry(job="fleet.nope"), "schedule 's1': unknown job 'fleet.nope' (known:"),
        (_entry(queue="bulk"), "schedule 's1': unknown queue 'bulk'"),
        (_entry(kwargs="{hold: 1}"), "schedule 's1': fleet.heartbeat: unknown argument 'hold'"),
        (_entry(kwargs="{hold_seconds: x}"), "schedule 's1': fleet.heartbeat: argument hold_sec"),
        (_entry(colour="red"), "schedule 's1': unknown field 'colour'"),
        (_entry(job=None), "schedule 's1': missing field 'job'"),
        (_entry(timezone="Mars/Base"), "schedule 's1': bad cron '* * * * *': unknown time zone"),
        (_entry(misfire_grace_seconds=0), "schedule 's1': field misfire_grace_seconds=0"),
        (_entry() + _entry().removeprefix("schedules:\n"), "schedule 's1': the name is used twice"),
        ("schedules:\n  - 5\n", "schedule #1: expected a mapping, got int"),
        ("schedules: [\n", "fleet.yaml line 2:"),
        ("- just a list\n", "fleet.yaml: expected a mapping with a 'schedules' list"),
        ("", "fleet.yaml: expected a mapping with a 'schedules' list"),
    ],
)
def test_faults_are_one_line_naming_the_schedule(text: str, expected: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedules(text, "fleet.yaml", JOBS)
    message = str(caught.value)
    assert expected in message, message
    assert message.startswith("fleet.yaml")
    assert "\n" not in message


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match=r"missing\.yaml: cannot read"):
        load_schedules(tmp_path / "missing.yaml", JOBS)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("*", "*"),
        ("0", "sun"),
        ("7", "sun"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("mon-fri", "mon,tue,wed,thu,fri"),
        ("5-7", "fri,sat,sun"),
        ("0,6", "sat,sun"),
        ("*/2", "tue,thu,sat,sun"),
        ("1/3", "mon,thu"),
        ("SUN", "sun"),
    ],
)
def test_crontab_weekdays_count_from_sunday(field: str, expected: str) -> None:
    assert crontab_weekdays(field) == expected


@pytest.mark.parametrize("field", ["8", "fri-mon", "x", "*/0"])
def test_bad_weekdays_are_refused(field: str) -> None:
    with pytest.raises(ValueError):
        crontab_weekdays(field)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("cron", "now", "expected"),
    [
        ("* * * * *", "2026-01-01T10:00:30", ["10:01:00", "10:02:00", "10:03:00"]),
        ("* * * * *", "2026-01-01T10:00:00", ["10:01:00", "10:02:00", "10:03:00"]),
        ("*/15 * * * *", "2026-01-01T10:07:00", ["10:15:00", "10:30:00", "10:45:00"]),
        ("*/10 * * * * *", "2026-01-01T10:00:05", ["10:00:10", "10:00:20", "10:00:30"]),
        ("30 2 * * * *", "2026-01-01T10:00:00", ["10:02:30", "11:02:30", "12:02:30"]),
        ("0 0 * * *", "2026-01-01T23:59:59", ["00:00:00", "00:00:00", "00:00:00"]),
    ],
)
def test_next_fires_with_an_injected_clock(cron: str, now: str, expected: list[str]) -> None:
    (schedule,) = parse_schedules(_entry(cron=f'"{cron}"'), "t.yaml", JOBS)
    fires = schedule.next_fires(_at(now), count=3)
    assert [f.strftime("%H:%M:%S") for f in fires] == expected
    assert all(f.tzinfo is not None for f in fires)
    assert fires == sorted(set(fires))


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        # 2026-01-01 is a Thursday. Both day fields restricted: either matches (crontab(5)).
        ("0 0 13 * 5", ["01-02", "01-09", "01-13", "01-16", "01-23"]),
        ("0 0 1,15 * 1", ["01-05", "01-12", "01-15", "01-19", "01-26"]),
        ("0 0 31 * 0", ["01-04", "01-11", "01-18", "01-25", "01-31"]),
        ("0 0 1 * Mon-Wed", ["01-05", "01-06", "01-07", "01-12", "01-13"]),
        # One of them starts with "*": both must match, as crontab does.
        ("0 0 */2 * 1", ["01-05", "01-19", "02-09", "02-23", "03-09"]),
        ("0 0 13 * *", ["01-13", "02-13", "03-13", "04-13", "05-13"]),
        ("0 0 * * 5", ["01-02", "01-09", "01-16", "01-23", "01-30"]),
        ("0 0 * * *", ["01-02", "01-03", "01-04", "01-05", "01-06"]),
    ],
)
def test_day_of_month_and_day_of_week_follow_crontab(cron: str, expected: list[str]) -> None:
    """Expansions as Vixie cron gives them (crontab(5))."""
    (schedule,) = parse_schedules(_entry(cron=f'"{cron}"'), "t.yaml", JOBS)
    fires = schedule.next_fires(_at("2026-01-01T00:00:00"), count=5)
    assert [f.strftime("%m-%d") for f in fires] == expected
    assert all(f.strftime("%H:%M") == "00:00" for f in fires)


def test_sunday_zero_means_sunday() -> None:
    # 2026-01-01 is a Thursday: the next "0 9 * * 0" is Sunday 4 January.
    trigger = cron_trigger("0 9 * * 0")
    upcoming = trigger.get_next_fire_time(None, _at("2026-01-01T00:00:00"))
    assert upcoming == _at("2026-01-04T09:00:00")
    assert upcoming.strftime("%A") == "Sunday"


def test_time_zones_are_honoured() -> None:
    trigger = cron_trigger("0 9 * * *", "Europe/Paris")
    upcoming = trigger.get_next_fire_time(None, _at("2026-07-01T00:00:00"))
    assert upcoming.astimezone(UTC) == _at("2026-07-01T07:00:00")  # CEST is UTC+2
