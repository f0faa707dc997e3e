"""Vault's own rotation of database passwords: the static roles of its database secrets
engine, checked the way the fleet checks its own secrets.

Vault (or OpenBao) rotates a static role's password itself, every ``rotation_period`` or
at each fire of ``rotation_schedule``. When it cannot (the database is down, its admin lost
its rights or its password), nothing fails loudly: the role's ``last_vault_rotation`` just
stops moving. ``secrets.check_rotation`` lists the static roles of each mount in
``FLEET_VAULT_DATABASE_MOUNTS`` and reports each one as a secret at
``MOUNT/static-roles/NAME``: its age (since ``last_vault_rotation``), its due date and
``ok | due_soon | overdue | error``, stored, audited and exported like any other.

:func:`static_role_status` is the pure core; :func:`static_role_statuses` reads Vault.
Neither reads ``static-creds`` (the only place the password is): a static role's
definition carries none, and no message here quotes what Vault answered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from schedules.table import cron_trigger
from tasks.secrets.model import Status
from tasks.secrets.stores import vault_time
from workers.errors import FleetError

# Vault rotates a role when its rotation queue next ticks (every 5 s) and retries a failed
# rotation 10 s later: a minute after the rotation was due, it is late ("due_soon").
LATE_AFTER = timedelta(minutes=1)
# How late it may be before it is "overdue": 5% of the interval, but at least the fleet's
# check interval (every 15 minutes). A role's exported due date moves only when a check
# runs, while Vault rotates right at the rotation time: with a shorter grace, a rotation
# Vault made on time just after a check would leave the exported due date to pass before
# the next check saw it, and FleetSecretRotationOverdue would fire for a role that is fine.
GRACE_FLOOR = timedelta(minutes=15)
GRACE_SHARE = 0.05

_SECOND = timedelta(seconds=1)
_LONGEST_SECONDS = 100 * 366 * 86400


class StaticRolesUnreadable(FleetError):
    """Vault refused or could not answer; the message names the path and the HTTP status,
    never Vault's own text."""


@dataclass(frozen=True)
class _Timing:
    scheduled: datetime  # when Vault should rotate next
    grace: timedelta


def role_path(mount: str, name: str) -> str:
    return f"{mount}/static-roles/{name}"


def _seconds(name: str, value: Any) -> timedelta:
    """A number of seconds as Vault writes it (``3600`` or ``3600.0``). Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} is not a number of seconds")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} is not a number of seconds") from None  # no echo: any text
    if not seconds > 0:
        raise ValueError(f"{name}={seconds:g} must be positive")
    if seconds > _LONGEST_SECONDS:
        raise ValueError(f"{name}={seconds:g} is out of range")
    return timedelta(seconds=seconds)


def _schedule_timing(schedule: str, window: Any, last: datetime) -> _Timing:
    """Vault's cron (five fields, UTC): its next fire after a rotation is the first one
    strictly after that rotation's whole second (robfig/cron's ``Next``); APScheduler's
    is the first at or after the time it is given, hence the second added."""
    try:
        trigger = cron_trigger(schedule)
    except ValueError as exc:
        raise ValueError(f"rotation_schedule {schedule!r} cannot be read: {exc}") from None
    scheduled = trigger.get_next_fire_time(None, last.replace(microsecond=0) + _SECOND)
    if scheduled is None:
        raise ValueError(f"rotation_schedule {schedule!r} never fires")
    following = trigger.get_next_fire_time(None, scheduled + _SECOND)
    interval = following - scheduled if following is not None else timedelta(0)
    # Past its window Vault gives up until the next fire: the window is its own deadline.
    allowed = _seconds("rotation_window", window) if window else timedelta(0)
    return _Timing(scheduled.astimezone(UTC), max(GRACE_FLOOR, interval * GRACE_SHARE, allowed))


def _timing(role_data: Mapping[str, Any], last: datetime) -> _Timing:
    """When Vault should rotate next, and how late it may be. Raises ValueError."""
    schedule = role_data.get("rotation_schedule")
    if schedule:
        return _schedule_timing(str(schedule), role_data.get("rotation_window"), last)
    period = role_data.get("rotation_period")
    if period is None:
        raise ValueError("the role has neither rotation_period nor rotation_schedule")
    interval = _seconds("rotation_period", period)
    return _Timing(last + interval, max(GRACE_FLOOR, interval * GRACE_SHARE))


def static_role_status(
    mount: str, name: str, role_data: Mapping[str, Any], now: datetime
) -> Status:
    """The status of one static role from its definition (``GET MOUNT/static-roles/NAME``,
    its ``data``). Never raises.

    Due date (``due_at``, exported as the rotation due timestamp): when Vault should have
    rotated it (last rotation + ``rotation_period``, or the first fire of
    ``rotation_schedule`` after the last rotation) plus a grace (:data:`GRACE_FLOOR`,
    5% of the interval, or the schedule's ``rotation_window`` if longer). ``due_soon``
    from :data:`LATE_AFTER` past the rotation time: Vault is late. ``overdue`` from the
    due date: Vault's rotation has stalled. Unlike the fleet's own secrets, nothing warns
    before the rotation time: Vault rotates them, nobody has anything to do then.
    """
    path = role_path(mount, name)
    raw = role_data.get("last_vault_rotation")
    last = vault_time(raw)
    if last is None:
        reason = (
            "no last_vault_rotation: Vault has never rotated it"
            if not raw
            else "last_vault_rotation is not an RFC 3339 time"
        )
        return Status(path, "error", reason=reason)
    age = now - last
    try:
        timing = _timing(role_data, last)
    except (ValueError, OverflowError) as exc:  # OverflowError: a date past year 9999
        return Status(path, "error", reason=str(exc), version_created=last, age=age)
    due = timing.scheduled + timing.grace
    notify = timing.scheduled + LATE_AFTER
    status = "overdue" if now >= due else "due_soon" if now >= notify else "ok"
    late = (
        f"Vault has not rotated it since {last.isoformat()}; "
        f"its rotation was due at {timing.scheduled.isoformat()}"
    )
    return Status(
        path,
        status,
        reason=None if status == "ok" else late,
        version_created=last,
        age=age,
        due_at=due,
        notify_at=notify,
    )


# Reading Vault ---------------------------------------------------------------------------


@contextlib.contextmanager
def _refusals(what: str) -> Iterator[None]:
    """hvac's and the network's errors as StaticRolesUnreadable, naming only a status
    (a 404 is the caller's to read: it means different things to a list and a read)."""
    import hvac.exceptions as vault_errors
    import requests

    try:
        yield
    except vault_errors.Forbidden:
        raise StaticRolesUnreadable(f"vault: {what}: permission denied (403)") from None
    except vault_errors.VaultDown:
        raise StaticRolesUnreadable(f"vault: {what}: Vault is sealed (503)") from None
    except vault_errors.InvalidRequest:
        raise StaticRolesUnreadable(f"vault: {what}: invalid request (400)") from None
    except (vault_errors.VaultError, requests.RequestException) as exc:
        raise StaticRolesUnreadable(f"vault: {what}: {type(exc).__name__}") from None


def _data(response: Any, what: str) -> Any:
    data = response.get("data") if isinstance(response, Mapping) else None
    if not isinstance(data, Mapping):
        raise StaticRolesUnreadable(f"vault: {what}: an answer without data")
    return data


def list_static_roles(client: Any, mount: str) -> list[str]:
    """The static roles' names. Raises StaticRolesUnreadable, also when ``mount`` is no
    database engine: Vault answers 404 both to that and to a mount with no static role, the
    first with an error message ("no handler for route"), the second with none."""
    import hvac.exceptions as vault_errors

    what = f"list {mount}/static-roles"
    with _refusals(what):
        try:
            response = client.secrets.database.list_static_roles(mount_point=mount)
        except vault_errors.InvalidPath as exc:
            if exc.errors:
                raise StaticRolesUnreadable(
                    f"vault: {what}: no database secrets engine at {mount}/ (404)"
                ) from None
            return []
    keys = _data(response, what).get("keys")
    if not isinstance(keys, list):
        raise StaticRolesUnreadable(f"vault: {what}: an answer without keys")
    return sorted(str(key) for key in keys)


def read_static_role(client: Any, mount: str, name: str) -> Mapping[str, Any] | None:
    """The role's definition (no password in it), or None if it was deleted since listed.
    Raises StaticRolesUnreadable."""
    import hvac.exceptions as vault_errors

    what = f"read {role_path(mount, name)}"
    with _refusals(what):
        try:
            response = client.secrets.database.read_static_role(name, mount_point=mount)
        except vault_errors.InvalidPath:
            return None
    data: Mapping[str, Any] = _data(response, what)
    return data


def static_role_statuses(client: Any, mounts: Sequence[str], now: datetime) -> list[Status]:
    """Every static role of every mount, by path. A mount that cannot be listed is one
    ``error`` at ``MOUNT/static-roles``, a role that cannot be read one at its path; the
    others are checked all the same."""
    found: list[Status] = []
    for mount in mounts:
        try:
            names = list_static_roles(client, mount)
        except StaticRolesUnreadable as exc:
            found.append(Status(f"{mount}/static-roles", "error", reason=str(exc)))
            continue
        for name in names:
            try:
                data = read_static_role(client, mount, name)
            except StaticRolesUnreadable as exc:
                found.append(Status(role_path(mount, name), "error", reason=str(exc)))
                continue
            if data is not None:
                found.append(static_role_status(mount, name, data, now))
    return sorted(found, key=lambda status: status.path)
