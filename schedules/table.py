"""The schedule table: ``schedules/fleet.yaml`` read, checked and turned into cron triggers.

A schedule is ``name, job, cron, kwargs, queue, misfire_grace_seconds, enabled`` (and an
optional ``timezone`` and ``catch_up``). ``cron`` is a standard crontab line (minute hour day month
weekday, Sunday = 0 or 7) or the same with a leading seconds field, read as crontab reads
it: when both day-of-month and day-of-week are restricted (neither starts with ``*``), a
day matching *either* fires (``0 0 13 * 5``: every Friday and every 13th), as Vixie cron
does; otherwise both must match. Any fault in the file
stops the scheduler at start with one line naming the schedule and the fault.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.errors import FleetError
from workers.jobs import QUEUES, JobArgumentError, JobSpec
from workers.yamlio import load_yaml


class ScheduleError(FleetError):
    """The schedule file is wrong; the message is one line naming where and why."""


_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _weekday_number(token: str) -> int:
    token = token.lower()
    if token.isdigit():
        number = int(token)
        if not 0 <= number <= 7:
            raise ValueError(f"weekday {token} is outside 0-7")
        return number % 7
    if token[:3] in _WEEKDAY_NAMES and len(token) == 3:
        return _WEEKDAY_NAMES.index(token)
    raise ValueError(f"weekday {token!r} is not a number 0-7 or a name like mon")


def crontab_weekdays(field_text: str) -> str:
    """A crontab weekday field (Sunday = 0 or 7) in APScheduler 3's spelling.

    APScheduler 3 counts weekdays from Monday = 0, so ``0`` would silently mean Monday.
    The field is expanded to the set of days it names and written back with day names.
    """
    if field_text == "*":
        return "*"
    days: set[int] = set()
    for part in field_text.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"step {step_text} must be at least 1")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            low, high = span.split("-", 1)
            first, last = _weekday_number(low), _weekday_number(high)
            if high.strip() == "7":
                last = 7
        else:
            first = _weekday_number(span)
            last = 6 if step_text else first
        if last < first:
            raise ValueError(f"weekday range {span} runs backwards")
        days.update(day % 7 for day in range(first, last + 1, step))
    ordered = sorted(days, key=lambda day: (day - 1) % 7)  # Monday first, for reading
    return ",".join(_WEEKDAY_NAMES[day] for day in ordered)


def cron_trigger(expression: str, timezone: str = "UTC") -> BaseTrigger:
    """Build the trigger for a 5-field crontab line or a 6-field one with seconds first."""
    fields = expression.split()
    if len(fields) == 5:
        second, (minute, hour, day, month, weekday) = "0", fields
    elif len(fields) == 6:
        second, minute, hour, day, month, weekday = fields
    else:
        raise ValueError(f"{len(fields)} fields; expected 5, or 6 with seconds first")
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    weekdays = crontab_weekdays(weekday)

    def trigger(day: str, day_of_week: str) -> CronTrigger:
        return CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=day_of_week,
            timezone=zone,
        )

    if day.startswith("*") or weekday.startswith("*"):
        return trigger(day, weekdays)  # one of them unrestricted: both must match
    # Both restricted: crontab fires on a day matching either (APScheduler alone ANDs).
    return OrTrigger([trigger(day, "*"), trigger("*", weekdays)])


class _ScheduleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    job: str
    cron: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: str | None = None
    misfire_grace_seconds: int | None = Field(default=60, ge=1)
    enabled: bool = True
    timezone: str = "UTC"
    catch_up: Literal["none", "once"] | None = None


# Jobs whose run covers everything since the last one: fires missed while every replica was
# down are made up by one run when a replica comes back. Other jobs' missed fires are gone.
CATCH_UP_JOBS = frozenset({"impressions.aggregate", "audit.ship", "drift.detect"})
# Fires looked at when counting what was missed (a per-second schedule down for a day
# would otherwise be 86,400 steps).
MAX_MISSED_COUNTED = 10_000


@dataclass(frozen=True)
class Schedule:
    name: str
    job: str
    cron: str
    kwargs: Mapping[str, Any]
    queue: str
    misfire_grace_seconds: int | None
    enabled: bool
    timezone: str = "UTC"
    trigger: BaseTrigger = field(repr=False, compare=False, default=None)
    catch_up: str = "none"

    def next_fires(self, now: datetime, count: int = 1) -> list[datetime]:
        """The next ``count`` fire times strictly after ``now`` (``now`` must be aware)."""
        fires: list[datetime] = []
        previous = None
        moment = now + timedelta(microseconds=1)
        for _ in range(count):
            upcoming = self.trigger.get_next_fire_time(previous, moment)
            if upcoming is None:
                break
            fires.append(upcoming)
            previous, moment = upcoming, upcoming + timedelta(microseconds=1)
        return fires

    def expiry(self, at: datetime) -> timedelta:
        """How long a fire's message stays worth running: until the next fire, or the
        misfire grace if shorter (a message older than that is dropped as expired)."""
        upcoming = self.next_fires(at)
        period = upcoming[0] - at if upcoming else timedelta(days=1)
        if self.misfire_grace_seconds is None:
            return period
        return min(period, timedelta(seconds=self.misfire_grace_seconds))

    def missed(self, last: datetime, now: datetime) -> tuple[list[datetime], bool]:
        """Fire times after ``last`` and at or before ``now`` (at most MAX_MISSED_COUNTED;
        the flag says whether there were more)."""
        fires: list[datetime] = []
        moment = last
        while len(fires) < MAX_MISSED_COUNTED:
            upcoming = self.next_fires(moment)
            if not upcoming or upcoming[0] > now:
                return fires, False
            fires.append(upcoming[0])
            moment = upcoming[0]
        return fires, True


def _entry_label(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        return f"schedule {raw['name']!r}"
    return f"schedule #{index + 1}"


def _problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown field {where!r}"
    if error["type"] == "missing":
        return f"missing field {where!r}"
    return f"field {where}={error.get('input')!r}: {error['msg']}"


def parse_schedules(text: str, source: str, jobs: Mapping[str, JobSpec]) -> list[Schedule]:
    """Parse and check a schedule file's text. Raises :class:`ScheduleError`."""
    try:
        document = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or "not valid YAML"
        raise ScheduleError(f"{source}{line}: {reason}") from None
    if not isinstance(document, dict) or not isinstance(document.get("schedules"), list):
        raise ScheduleError(f"{source}: expected a mapping with a 'schedules' list")
    schedules: list[Schedule] = []
    seen: set[str] = set()
    for index, raw in enumerate(document["schedules"]):
        label = f"{source}: {_entry_label(raw, index)}"
        schedule = _check_entry(raw, label, jobs)
        if schedule.name in seen:
            raise ScheduleError(f"{label}: the name is used twice")
        seen.add(schedule.name)
        schedules.append(schedule)
    return schedules


def _check_entry(raw: Any, label: str, jobs: Mapping[str, JobSpec]) -> Schedule:
    if not isinstance(raw, dict):
        raise ScheduleError(f"{label}: expected a mapping, got {type(raw).__name__}")
    try:
        entry = _ScheduleEntry.model_validate(raw)
    except ValidationError as exc:
        raise ScheduleError(f"{label}: {_problem(exc)}") from None
    spec = jobs.get(entry.job)
    if spec is None:
        known = ", ".join(sorted(jobs)) or "none"
        raise ScheduleError(f"{label}: unknown job {entry.job!r} (known: {known})")
    queue = entry.queue or spec.queue
    if queue not in QUEUES:
        raise ScheduleError(f"{label}: unknown queue {queue!r} (known: {', '.join(QUEUES)})")
    try:
        kwargs = spec.validate(entry.kwargs)
    except JobArgumentError as exc:
        raise ScheduleError(f"{label}: {exc}") from None
    try:
        trigger = cron_trigger(entry.cron, entry.timezone)
    except ValueError as exc:
        raise ScheduleError(f"{label}: bad cron {entry.cron!r}: {exc}") from None
    return Schedule(
        name=entry.name,
        job=entry.job,
        cron=entry.cron,
        kwargs=kwargs,
        queue=queue,
        misfire_grace_seconds=entry.misfire_grace_seconds,
        enabled=entry.enabled,
        timezone=entry.timezone,
        trigger=trigger,
        catch_up=entry.catch_up or ("once" if entry.job in CATCH_UP_JOBS else "none"),
    )


def default_schedule_file() -> Path:
    return Path(str(importlib.resources.files("schedules").joinpath("fleet.yaml")))


def load_schedules(path: Path | None, jobs: Mapping[str, JobSpec]) -> list[Schedule]:
    path = path or default_schedule_file()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScheduleError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_schedules(text, str(path), jobs)
