"""What drift detection finds: kinds, severities and the finding itself."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

KINDS = (
    "missing_in_live",
    "unexpected_in_live",
    "value_changed",
    "missing_in_environment",
    "type_mismatch",
    "schema_violation",
    "invalid_source",
    "stale_cache",
    "orphan_override",
    "redundant_override",
)
SEVERITIES = ("critical", "warning", "info")
# The environment label of findings that compare environments with each other.
CROSS = "cross-environment"
MASK = "***"
_SHOWN_CHARS = 200


@dataclass(frozen=True)
class Finding:
    """One difference. ``environment`` is where it is counted (a metric label);
    ``environments`` every environment involved. ``scope`` says which run owns it:
    ``env:<name>`` for one environment's checks, ``cross`` for comparisons between
    environments, ``rules`` for the rules file itself."""

    kind: str
    environment: str
    key: str
    severity: str
    message: str
    scope: str
    environments: tuple[str, ...] = ()
    before: str | None = None
    after: str | None = None
    source: str = "desired"
    expected: bool = False
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict, compare=False)
    commit: str | None = None  # the desired files' Git commit, when they come from Git

    @property
    def fingerprint(self) -> str:
        """Stable across runs: what differs and where, never the values."""
        identity = "\x1f".join(
            (
                self.kind,
                self.scope,
                self.environment,
                ",".join(self.environments),
                self.source,
                self.key,
            )
        )
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def with_severity(self, severity: str) -> Finding:
        return replace(self, severity=severity)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "kind": self.kind,
            "environment": self.environment,
            "environments": list(self.environments),
            "key": self.key,
            "severity": self.severity,
            "expected": self.expected,
            "reason": self.reason,
            "source": self.source,
            "before": self.before,
            "after": self.after,
            "message": self.message,
            "commit": self.commit,
        }


def show(value: Any, sensitive: bool) -> str:
    """A value as a finding shows it: JSON, shortened; a sensitive one never."""
    if sensitive:
        return MASK
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"
