"""Rotation status by tables, with an injected clock: due and notify boundaries, policies
from metadata and from the file, malformed and missing values."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tasks.secrets.model import (
    PolicyError,
    PolicyRule,
    SecretMetadata,
    VersionInfo,
    load_policy_rules,
    policy_for,
    rotation_status,
)
from tasks.secrets.rotate import scram_verifier

CREATED = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = {"rotation_interval_days": "30", "notify_days": "7", "rotator": "postgres"}


def meta(custom: dict[str, str] | None = None, **version: object) -> SecretMetadata:
    info = VersionInfo(
        3,
        created_time=version.get("created", CREATED),  # type: ignore[arg-type]
        deletion_time=version.get("deleted"),  # type: ignore[arg-type]
        destroyed=bool(version.get("destroyed", False)),
    )
    return SecretMetadata("db/app", 3, {3: info}, custom if custom is not None else POLICY)


@pytest.mark.parametrize(
    ("now", "status"),
    [
        (CREATED, "ok"),
        (CREATED + timedelta(days=22, hours=23, minutes=59), "ok"),
        (CREATED + timedelta(days=23), "due_soon"),  # 30 - 7 days: the warning starts
        (CREATED + timedelta(days=29, hours=23, minutes=59, seconds=59), "due_soon"),
        (CREATED + timedelta(days=30), "overdue"),  # due exactly now
        (CREATED + timedelta(days=400), "overdue"),
    ],
)
def test_status_at_the_window_boundaries(now: datetime, status: str) -> None:
    result = rotation_status(meta(), [], now)
    assert result.status == status
    assert result.due_at == CREATED + timedelta(days=30)
    assert result.notify_at == CREATED + timedelta(days=23)
    assert result.age == now - CREATED
    assert (result.version, result.rotator) == (3, "postgres")


@pytest.mark.parametrize(
    ("custom", "reason"),
    [
        ({"rotation_interval_days": "thirty"}, "rotation_interval_days='thirty' is not a whole"),
        ({"rotation_interval_days": "0"}, "rotation_interval_days=0 must be at least 1"),
        (
            {"rotation_interval_days": "30", "notify_days": "-1"},
            "notify_days=-1 must be at least 0",
        ),
        (
            {"rotation_interval_days": "30", "notify_days": "30"},
            "notify_days=30 must be below rotation_interval_days=30",
        ),
        ({"rotation_interval_days": "1.5"}, "is not a whole number of days"),
    ],
)
def test_malformed_policies_are_errors_with_the_reason(custom: dict[str, str], reason: str) -> None:
    result = rotation_status(meta(custom), [], CREATED)
    assert result.status == "error"
    assert result.reason is not None and reason in result.reason


def test_no_policy_anywhere_is_unmanaged() -> None:
    result = rotation_status(meta({"owner": "team-a"}), [], CREATED)
    assert (result.status, result.reason) == ("unmanaged", "no rotation policy")


@pytest.mark.parametrize(
    "version",
    [{"deleted": CREATED}, {"destroyed": True}],
)
def test_a_deleted_current_version_is_an_error(version: dict[str, object]) -> None:
    assert rotation_status(meta(**version), [], CREATED).status == "error"


def test_a_missing_current_version_is_an_error() -> None:
    broken = SecretMetadata("db/app", 4, {3: VersionInfo(3, CREATED)}, POLICY)
    assert rotation_status(broken, [], CREATED).reason == "no current version"
    planned = SecretMetadata("db/app", 0, {}, POLICY)  # metadata written before any version
    assert rotation_status(planned, [], CREATED).reason == "no version (metadata only)"


@pytest.mark.parametrize(
    ("deletion_in", "status", "warned"),
    [
        (timedelta(days=400), "ok", False),  # deleted long after it is due: nothing to say
        (timedelta(days=10), "ok", True),  # deleted before it is due: said in the reason
        (timedelta(seconds=1), "ok", True),
        (timedelta(0), "error", False),  # the deletion time has come: gone
        (-timedelta(days=1), "error", False),
    ],
)
def test_a_version_with_a_deletion_time_is_current_until_then(
    deletion_in: timedelta, status: str, warned: bool
) -> None:
    """KV v2's delete_version_after stamps each new version with a future deletion time."""
    now = CREATED + timedelta(days=1)
    found = rotation_status(meta(POLICY, deleted=now + deletion_in), [], now)
    assert found.status == status
    assert (found.reason is not None and "will be deleted at" in found.reason) == warned


RULES = [
    PolicyRule(
        "db/*",
        {
            "rotation_interval_days": 90,
            "notify_days": 14,
            "rotator": "postgres",
            "owner": "platform",
        },
    ),
    PolicyRule("*", {"rotation_interval_days": 365}),
]


@pytest.mark.parametrize(
    ("path", "custom", "expected"),
    [
        ("db/app", {}, (90, 14, "postgres", "platform")),
        ("db/app", {"rotation_interval_days": "30"}, (30, 14, "postgres", "platform")),
        ("db/app", {"rotator": "manual", "owner": "sre"}, (90, 14, "manual", "sre")),
        ("apis/openai", {}, (365, 7, None, None)),
        ("apis/openai", {"notify_days": "0"}, (365, 0, None, None)),
    ],
)
def test_metadata_first_then_the_first_matching_rule(
    path: str, custom: dict[str, str], expected: tuple[object, ...]
) -> None:
    policy = policy_for(path, custom, RULES)
    assert policy is not None
    assert (policy.interval_days, policy.notify_days, policy.rotator, policy.owner) == expected


def test_policy_file(tmp_path: Path) -> None:
    (tmp_path / "rotation-policies.yaml").write_text(
        "policies:\n  - {path: 'db/*', rotation_interval_days: 30, rotator: postgres}\n"
    )
    (rule,) = load_policy_rules(tmp_path)
    assert rule.pattern == "db/*" and rule.values["rotator"] == "postgres"
    assert load_policy_rules(tmp_path / "nowhere") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("policies: [\n", "cannot be read as YAML"),
        ("- a\n", "expected a mapping with a 'policies' list"),
        ("policies:\n  - {rotation_interval_days: 3}\n", "policy #1 needs a 'path' glob"),
        ("policies:\n  - {path: x, interval: 3}\n", "policy #1: unknown field 'interval'"),
    ],
)
def test_a_bad_policy_file_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "rotation-policies.yaml").write_text(text)
    with pytest.raises(PolicyError, match=message):
        load_policy_rules(tmp_path)


def test_scram_verifier_is_what_postgres_expects() -> None:
    verifier = scram_verifier("correct horse", iterations=4096)
    scheme, rest = verifier.split("$", 1)
    count_salt, keys = rest.split("$")
    count, salt = count_salt.split(":")
    stored, server = keys.split(":")
    assert (scheme, count) == ("SCRAM-SHA-256", "4096")
    salted = hashlib.pbkdf2_hmac("sha256", b"correct horse", base64.b64decode(salt), 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert base64.b64decode(stored) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server) == hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    assert "correct horse" not in verifier
    assert scram_verifier("correct horse") != verifier  # a fresh salt each time
