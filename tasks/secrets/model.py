"""Secrets as the rotation checks see them, and the pure status computation.

A secret's policy comes from its ``custom_metadata`` (``rotation_interval_days``,
``notify_days``, ``rotator``, ``owner``), each field falling back to the first matching
entry of ``rotation-policies.yaml``. No policy from either: ``unmanaged``. A malformed
value: ``error``, with the reason.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from workers.yamlio import load_yaml

STATUSES = ("ok", "due_soon", "overdue", "unmanaged", "error")
DEFAULT_NOTIFY_DAYS = 7
POLICY_FIELDS = ("rotation_interval_days", "notify_days", "rotator", "owner")


@dataclass(frozen=True)
class VersionInfo:
    version: int
    created_time: datetime
    deletion_time: datetime | None = None
    destroyed: bool = False


@dataclass(frozen=True)
class SecretMetadata:
    """What KV v2 (or the embedded store) knows about a secret, values aside."""

    path: str
    current_version: int
    versions: Mapping[int, VersionInfo]
    custom_metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def current(self) -> VersionInfo | None:
        return self.versions.get(self.current_version)


@dataclass(frozen=True)
class Policy:
    interval_days: int
    notify_days: int
    rotator: str | None = None
    owner: str | None = None


class PolicyError(Exception):
    """A policy value that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class PolicyRule:
    pattern: str
    values: Mapping[str, Any]


def load_policy_rules(config_dir: Path) -> list[PolicyRule]:
    """``rotation-policies.yaml``: ``policies: [{path: GLOB, rotation_interval_days: N, ...}]``.

    Raises PolicyError (one line) when the file cannot be used."""
    path = config_dir / "rotation-policies.yaml"
    if not path.exists():
        return []
    try:
        document = load_yaml(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: cannot be read as YAML ({type(exc).__name__})") from None
    entries = document.get("policies") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise PolicyError(f"{path}: expected a mapping with a 'policies' list")
    rules = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise PolicyError(f"{path}: policy #{index + 1} needs a 'path' glob")
        unknown = set(entry) - {"path", *POLICY_FIELDS}
        if unknown:
            raise PolicyError(f"{path}: policy #{index + 1}: unknown field {sorted(unknown)[0]!r}")
        rules.append(PolicyRule(entry["path"], {k: v for k, v in entry.items() if k != "path"}))
    return rules


def _days(name: str, value: Any, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise PolicyError(f"{name}={value!r} is not a whole number of days") from None
    if number < minimum:
        raise PolicyError(f"{name}={number} must be at least {minimum}")
    return number


def policy_for(path: str, custom: Mapping[str, str], rules: Sequence[PolicyRule]) -> Policy | None:
    """The secret's policy, or None when nothing manages it. Raises PolicyError."""
    fallback: Mapping[str, Any] = next(
        (rule.values for rule in rules if fnmatch.fnmatchcase(path, rule.pattern)), {}
    )
    merged = {k: custom[k] if k in custom else fallback.get(k) for k in POLICY_FIELDS}
    if merged["rotation_interval_days"] is None:
        return None
    interval = _days("rotation_interval_days", merged["rotation_interval_days"], 1)
    notify_value = merged["notify_days"]
    notify = DEFAULT_NOTIFY_DAYS if notify_value is None else _days("notify_days", notify_value, 0)
    if notify >= interval:
        raise PolicyError(f"notify_days={notify} must be below rotation_interval_days={interval}")
    rotator = merged["rotator"]
    return Policy(
        interval_days=interval,
        notify_days=notify,
        rotator=str(rotator).strip() or None if rotator is not None else None,
        owner=str(merged["owner"]) if merged["owner"] is not None else None,
    )


@dataclass(frozen=True)
class Status:
    path: str
    status: str
    reason: str | None = None
    version: int | None = None
    version_created: datetime | None = None
    age: timedelta | None = None
    due_at: datetime | None = None
    notify_at: datetime | None = None
    rotator: str | None = None
    owner: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "reason": self.reason,
            "version": self.version,
            "age_days": round(self.age.total_seconds() / 86400, 2) if self.age else None,
            "due_at": self.due_at.isoformat() if self.due_at else None,
            "rotator": self.rotator,
            "owner": self.owner,
        }


def rotation_status(meta: SecretMetadata, rules: Sequence[PolicyRule], now: datetime) -> Status:
    """Age, due date and status of the secret's current version. Never raises."""
    current = meta.current
    if meta.current_version == 0 or current is None:
        reason = "no version (metadata only)" if meta.current_version == 0 else "no current version"
        return Status(meta.path, "error", reason=reason, version=meta.current_version)
    # KV v2's delete_version_after gives every version a deletion time in the future: the
    # version is current and readable until then.
    if current.destroyed or (current.deletion_time is not None and current.deletion_time <= now):
        return Status(
            meta.path,
            "error",
            reason="the current version is deleted or destroyed",
            version=meta.current_version,
        )
    age = now - current.created_time
    try:
        policy = policy_for(meta.path, meta.custom_metadata, rules)
    except PolicyError as exc:
        return Status(
            meta.path,
            "error",
            reason=str(exc),
            version=current.version,
            version_created=current.created_time,
            age=age,
        )
    if policy is None:
        return Status(
            meta.path,
            "unmanaged",
            reason="no rotation policy",
            version=current.version,
            version_created=current.created_time,
            age=age,
        )
    due = current.created_time + timedelta(days=policy.interval_days)
    notify = due - timedelta(days=policy.notify_days)
    status = "overdue" if now >= due else "due_soon" if now >= notify else "ok"
    deleted = current.deletion_time
    return Status(
        meta.path,
        status,
        reason=(
            f"the current version will be deleted at {deleted.isoformat()} "
            f"(delete_version_after), before its rotation is due at {due.isoformat()}"
            if deleted is not None and deleted < due
            else None
        ),
        version=current.version,
        version_created=current.created_time,
        age=age,
        due_at=due,
        notify_at=notify,
        rotator=policy.rotator,
        owner=policy.owner,
    )
