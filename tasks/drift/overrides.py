"""Overrides of a multi-tenant platform: live rows at ``service`` and ``tenant`` scope.

The platform layers configuration (reference ``ConfigurationScope`` and its fallback
chain): a tenant's reader gets its tenant row, else the service row, else the environment's,
else the global one. Each override is checked here as the layer it is:

- against the schema of its key, with the layers under it (the environment's live values,
  and for a tenant the service overrides): ``schema_violation`` at ``key@scope[/tenant]``;
- ``orphan_override``: an override of a key the environment's desired file no longer
  declares (only where the environment has a desired file);
- ``redundant_override``: an override equal to the value it overrides (the next layer down
  that holds the key), ``info``.

Values are never shown for a sensitive key; tenants appear in findings (the key), never in
metric labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from tasks.drift.sources import SourceProblem

SCOPES = ("service", "tenant")
_UNREADABLE = object()


@dataclass(frozen=True)
class Override:
    row_id: int
    environment: str
    scope: str
    tenant_id: str | None
    key: str
    value: Any  # parsed JSON; None when encrypted
    sensitive: bool
    checksum: str | None = None  # an encrypted row's, from its metadata

    @property
    def where(self) -> str:
        tenant = f"/{self.tenant_id}" if self.tenant_id else ""
        return f"{self.key}@{self.scope}{tenant}"


@dataclass
class Layers:
    """What one environment holds above and below its environment-wide rows."""

    overrides: list[Override] = field(default_factory=list)
    globals: dict[str, Any] = field(default_factory=dict)  # key -> value (or checksum holder)
    global_checksums: dict[str, str] = field(default_factory=dict)


def read_layers(
    rows: Iterable[tuple[Any, ...]],
) -> tuple[dict[str, Layers], list[SourceProblem]]:
    """Rows ``(id, environment, scope, tenant_id, key, value, sensitive, encrypted,
    meta)`` at service, tenant and global scope, parsed; nothing raises."""
    layers: dict[str, Layers] = {}
    problems: list[SourceProblem] = []
    for row_id, environment, scope, tenant_id, key, value, sensitive, encrypted, meta in rows:
        held = layers.setdefault(environment, Layers())
        checksum = None
        parsed: Any = None
        if encrypted:
            checksum = _checksum(meta)
            if checksum is None:
                problems.append(
                    SourceProblem(
                        environment,
                        f"configurations id={row_id}",
                        "encrypted value without a checksum in its metadata",
                        key=key,
                    )
                )
                continue
        else:
            try:
                parsed = orjson.loads(value) if value is not None else None
            except orjson.JSONDecodeError as exc:
                problems.append(
                    SourceProblem(
                        environment,
                        f"configurations id={row_id}",
                        f"value is not valid JSON ({exc})",
                        key=f"{key}@{scope}" + (f"/{tenant_id}" if tenant_id else ""),
                    )
                )
                continue
        if scope == "global":
            held.globals[key] = parsed
            if checksum is not None:
                held.global_checksums[key] = checksum
            continue
        held.overrides.append(
            Override(
                row_id,
                environment,
                scope,
                tenant_id,
                key,
                parsed,
                bool(sensitive or encrypted),
                checksum,
            )
        )
    return layers, problems


def _checksum(meta: str | None) -> str | None:
    try:
        document = orjson.loads(meta or "null")
    except orjson.JSONDecodeError:
        return None
    checksum = document.get("checksum") if isinstance(document, dict) else None
    return checksum if isinstance(checksum, str) else None


def by_layer(overrides: Iterable[Override]) -> dict[tuple[str, str | None], list[Override]]:
    """Overrides grouped by (scope, tenant): services first, then each tenant."""
    groups: dict[tuple[str, str | None], list[Override]] = {}
    for override in sorted(overrides, key=lambda o: (o.scope != "service", o.tenant_id or "")):
        groups.setdefault((override.scope, override.tenant_id), []).append(override)
    return groups


def service_values(overrides: Iterable[Override]) -> Mapping[str, Override]:
    return {o.key: o for o in overrides if o.scope == "service"}
