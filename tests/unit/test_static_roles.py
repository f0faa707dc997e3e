"""Vault's static roles by tables, with an injected clock and no Vault: due dates from a
period or a cron schedule, the late ("due_soon") and stalled ("overdue") boundaries,
unreadable definitions; and the FLEET_VAULT_DATABASE_MOUNTS setting."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tasks.secrets.vault_database import GRACE_FLOOR, LATE_AFTER, static_role_status
from workers.settings import SettingsError, load_settings

# Vault writes nanoseconds; Python keeps microseconds. A Monday.
LAST_TEXT = "2026-03-02T10:00:00.123456789Z"
LAST = datetime(2026, 3, 2, 10, 0, 0, 123456, tzinfo=UTC)
HOUR, DAY = timedelta(hours=1), timedelta(days=1)


def role(**fields: Any) -> dict[str, Any]:
    """A static role's definition as Vault reads it back (never with a password)."""
    return {
        "credential_type": "password",
        "db_name": "app",
        "username": "app",
        "rotation_statements": [],
        "last_vault_rotation": LAST_TEXT,
        **fields,
    }


HOURLY = role(rotation_period=3600)
HOURLY_DUE = LAST + HOUR + GRACE_FLOOR  # 5% of an hour is below the floor


@pytest.mark.parametrize(
    ("data", "now", "status", "due", "notify"),
    [
        # A period: due at the rotation time plus the grace; late a minute after it.
        (HOURLY, LAST + timedelta(minutes=10), "ok", HOURLY_DUE, LAST + HOUR + LATE_AFTER),
        (HOURLY, LAST + HOUR + timedelta(seconds=59), "ok", HOURLY_DUE, None),
        (HOURLY, LAST + HOUR + LATE_AFTER, "due_soon", HOURLY_DUE, None),
        (HOURLY, HOURLY_DUE - timedelta(microseconds=1), "due_soon", HOURLY_DUE, None),
        (HOURLY, HOURLY_DUE, "overdue", HOURLY_DUE, None),
        (HOURLY, LAST - timedelta(minutes=5), "ok", HOURLY_DUE, None),  # clocks apart
        # Vault writes its seconds as a float too.
        (role(rotation_period=3600.0), LAST, "ok", HOURLY_DUE, None),
        # OpenBao's shortest period: the floor, not 5% of 5 s.
        (
            role(rotation_period=5),
            LAST + timedelta(seconds=30),
            "ok",
            LAST + timedelta(seconds=5) + GRACE_FLOOR,
            None,
        ),
        # A long period: 5% of it (36 h of 30 days), far above the floor.
        (
            role(rotation_period=30 * 86400),
            LAST + 30 * DAY,
            "ok",
            LAST + 31 * DAY + 12 * HOUR,
            LAST + 30 * DAY + LATE_AFTER,
        ),
        (
            role(rotation_period=30 * 86400),
            LAST + 31 * DAY + 12 * HOUR,
            "overdue",
            LAST + 31 * DAY + 12 * HOUR,
            None,
        ),
        # A time with the server's own offset (Vault writes Go's local time).
        (
            role(last_vault_rotation="2026-03-02T18:00:00.5+08:00", rotation_period=3600),
            LAST,
            "ok",
            datetime(2026, 3, 2, 11, 15, 0, 500000, tzinfo=UTC),
            None,
        ),
        # A schedule: the first fire after the last rotation; 5% of a day is 72 minutes.
        (
            role(rotation_schedule="0 3 * * *"),
            LAST + 17 * HOUR,
            "ok",
            datetime(2026, 3, 3, 4, 12, tzinfo=UTC),
            datetime(2026, 3, 3, 3, 1, tzinfo=UTC),
        ),
        (
            role(rotation_schedule="0 3 * * *"),
            datetime(2026, 3, 3, 3, 1, tzinfo=UTC),
            "due_soon",
            None,
            None,
        ),
        (
            role(rotation_schedule="0 3 * * *"),
            datetime(2026, 3, 3, 4, 12, tzinfo=UTC),
            "overdue",
            None,
            None,
        ),
        # A window longer than that: Vault's own deadline.
        (
            role(rotation_schedule="0 3 * * *", rotation_window=7200),
            datetime(2026, 3, 3, 4, 30, tzinfo=UTC),
            "due_soon",
            datetime(2026, 3, 3, 5, 0, tzinfo=UTC),
            None,
        ),
        # Crontab weekdays (Sunday 0) as Vault reads them, not APScheduler's (Monday 0).
        (
            role(rotation_schedule="0 0 * * 0"),
            LAST,
            "ok",
            datetime(2026, 3, 8, 0, 0, tzinfo=UTC) + timedelta(hours=8, minutes=24),
            None,
        ),
        # Rotated right at a fire: the next fire is the following one, not that one.
        (
            role(last_vault_rotation="2026-03-03T03:00:00Z", rotation_schedule="0 3 * * *"),
            datetime(2026, 3, 3, 3, 30, tzinfo=UTC),
            "ok",
            datetime(2026, 3, 4, 4, 12, tzinfo=UTC),
            None,
        ),
    ],
)
def test_status_from_period_or_schedule(
    data: dict[str, Any],
    now: datetime,
    status: str,
    due: datetime | None,
    notify: datetime | None,
) -> None:
    found = static_role_status("database", "app", data, now)
    assert (found.path, found.status) == ("database/static-roles/app", status), found.reason
    if due is not None:
        assert found.due_at == due
    if notify is not None:
        assert found.notify_at == notify
    assert found.rotator is None  # Vault rotates it: never sent to secrets.rotate
    assert found.version is None and found.version_created is not None
    assert found.age == now - found.version_created
    if status == "ok":
        assert found.reason is None
    else:
        assert found.reason is not None and found.reason.startswith("Vault has not rotated it")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (role(last_vault_rotation=None, rotation_period=3600), "no last_vault_rotation"),
        ({"rotation_period": 3600, "username": "app"}, "no last_vault_rotation"),
        (role(last_vault_rotation="", rotation_period=3600), "no last_vault_rotation"),
        (role(last_vault_rotation="yesterday", rotation_period=3600), "not an RFC 3339 time"),
        (role(last_vault_rotation=1772445600, rotation_period=3600), "not an RFC 3339 time"),
        (role(last_vault_rotation="2026-02-30T10:00:00Z", rotation_period=3600), "RFC 3339"),
        (role(), "neither rotation_period nor rotation_schedule"),
        (role(rotation_period=0), "rotation_period=0 must be positive"),
        (role(rotation_period="soon"), "rotation_period is not a number of seconds"),
        (role(rotation_period=[3600]), "rotation_period is not a number of seconds"),
        (role(rotation_period=1e15), "out of range"),
        (role(rotation_schedule="every day"), "rotation_schedule 'every day' cannot be read"),
        (role(rotation_schedule="61 * * * *"), "cannot be read"),
        (role(rotation_schedule="0 0 30 2 *"), "rotation_schedule '0 0 30 2 *' never fires"),
        (role(rotation_schedule="0 3 * * *", rotation_window=-1), "rotation_window=-1 must be"),
    ],
)
def test_an_unusable_definition_is_an_error_with_its_reason(
    data: dict[str, Any], reason: str
) -> None:
    found = static_role_status("team/db", "app", data, LAST)
    assert (found.path, found.status) == ("team/db/static-roles/app", "error")
    assert found.reason is not None and reason in found.reason
    assert found.due_at is None and found.rotator is None


def test_no_password_reaches_a_status() -> None:
    """A definition has no password; were one passed (static-creds' answer), none leaks."""
    planted = "planted-db-pass-4242"
    for data in (
        role(rotation_period=3600, password=planted),
        role(rotation_period=planted, password=planted),
        role(last_vault_rotation=None, password=planted),
    ):
        found = static_role_status("database", "app", data, LAST + 2 * HOUR)
        assert planted not in repr(found) + str(found.as_dict())


# FLEET_VAULT_DATABASE_MOUNTS ---------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    return monkeypatch


def test_mounts_are_a_json_list_of_mount_paths(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("FLEET_VAULT_ADDR", "http://vault:8200")
    assert load_settings().vault_database_mounts == []
    clean_environment.setenv("FLEET_VAULT_DATABASE_MOUNTS", '["database", "/team/db/", "database"]')
    settings = load_settings()
    assert settings.vault_database_mounts == ["database", "team/db"]
    assert settings.describe()["vault_database_mounts"] == "database, team/db"


@pytest.mark.parametrize(
    ("value", "vault", "expected"),
    [
        ("database", True, "FLEET_VAULT_DATABASE_MOUNTS: not valid JSON"),
        ('["data base"]', True, "FLEET_VAULT_DATABASE_MOUNTS: 'data base' is not a mount path"),
        ('["/"]', True, "FLEET_VAULT_DATABASE_MOUNTS: '/' is not a mount path"),
        ('["database"]', False, "FLEET_VAULT_DATABASE_MOUNTS needs FLEET_VAULT_ADDR"),
    ],
)
def test_bad_mounts_stop_with_one_line(
    clean_environment: pytest.MonkeyPatch, value: str, vault: bool, expected: str
) -> None:
    if vault:
        clean_environment.setenv("FLEET_VAULT_ADDR", "http://vault:8200")
    clean_environment.setenv("FLEET_VAULT_DATABASE_MOUNTS", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "\n" not in str(caught.value)
