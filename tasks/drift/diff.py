"""The pure core of drift detection: flat configurations in, typed and ranked findings out.

No I/O and no clock of its own: ``now`` decides which declared rules have expired. Built
for size (three environments of 100,000 keys compare in well under a second): set
arithmetic finds what is missing on either side, and values are compared only for keys
both sides have, in clear, with types respected (``true`` is not ``1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import compress, repeat
from operator import is_, is_not, methodcaller, ne, or_
from typing import Any

import orjson

from tasks.drift.cache import CacheEntry
from tasks.drift.model import CROSS, Finding, show
from tasks.drift.overrides import Layers, Override, by_layer, service_values
from tasks.drift.rules import Rules
from tasks.drift.schema import cross_field_problems, schema_problems
from tasks.drift.sources import Flat, LiveState, SourceProblem, unflatten
from workers.configstore import platform_checksum as checksum

_JSON_TYPES: dict[type, str] = {
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
    list: "array",
    dict: "object",
}
_CROSS_KINDS = ("missing_in_environment", "type_mismatch")
_SCHEMA_SECTIONS = ("database.", "services.", "external_apis.", "security.")


def json_type(value: Any) -> str:
    found = _JSON_TYPES.get(type(value))
    if found is not None:
        return found
    return "object" if isinstance(value, Mapping) else "string"


def same(a: Any, b: Any) -> bool:
    """JSON equality: numbers compare by value (1 == 1.0), but no type crosses another
    (``True`` is not ``1``, ``"1"`` is not ``1``), however deeply nested."""
    return a == b and _types_agree(a, b)


def _types_agree(a: Any, b: Any) -> bool:
    kind = type(a)
    if kind is type(b):
        if kind is list:
            return all(map(_types_agree, a, b))
        if kind is dict:
            return all(_types_agree(value, b[key]) for key, value in a.items())
        return True
    return json_type(a) == json_type(b) not in ("array", "object")


@dataclass
class DriftInput:
    """Everything one run compares. ``desired`` holds the environments whose file could
    be read; ``problems`` the sources that could not (files, rows, the rules)."""

    desired: dict[str, Flat]
    live: LiveState
    rules: Rules
    environments: list[str]
    cross: bool = True
    problems: list[SourceProblem] = field(default_factory=list)
    cache: list[CacheEntry] = field(default_factory=list)
    layers: dict[str, Layers] = field(default_factory=dict)


class _Builder:
    """Turns raw differences into findings with their severity, rule and masking."""

    def __init__(self, rules: Rules, now: datetime) -> None:
        self.rules = rules
        self.now = now
        self.findings: list[Finding] = []

    def add(
        self,
        kind: str,
        environment: str,
        key: str,
        message: str,
        *,
        environments: tuple[str, ...] | None = None,
        scope: str | None = None,
        before: str | None = None,
        after: str | None = None,
        source: str = "desired",
        severity: str | None = None,
    ) -> None:
        involved = environments or (environment,)
        # Comparisons between environments warn; everything about one critical
        # environment (its desired vs live, its schema, its unreadable sources) is critical.
        if severity is None:
            critical = kind not in _CROSS_KINDS and environment in self.rules.critical_environments
            severity = "critical" if critical else "warning"
        severity = self.rules.override(kind, key, involved) or severity
        rule = self.rules.expectation(kind, key, involved, self.now)
        self.findings.append(
            Finding(
                kind=kind,
                environment=environment,
                environments=involved,
                key=key,
                severity="info" if rule is not None else severity,
                message=message,
                scope=scope or f"env:{environment}",
                before=before,
                after=after,
                source=source,
                expected=rule is not None,
                reason=rule.reason if rule is not None else None,
            )
        )


def detect(data: DriftInput, now: datetime) -> list[Finding]:
    """Every finding for the environments in ``data``, sorted for reading."""
    out = _Builder(data.rules, now)
    for problem in data.problems:
        _source_problem(out, problem)
    for environment in data.environments:
        desired = data.desired.get(environment)
        live = data.live.values.get(environment, {})
        if desired is not None:
            _desired_vs_live(out, environment, desired, live, data.live)
            _schema(out, environment, desired, "desired")
        if live:
            _schema(out, environment, live, "live")
        layers = data.layers.get(environment)
        if layers is not None and layers.overrides:
            checksums = data.live.checksums.get(environment, {})
            _overrides(out, environment, layers, desired, live, checksums)
    _stale_cache(out, [e for e in data.cache if e.environment in data.environments])
    if data.cross:
        readable = {env: flat for env, flat in data.desired.items() if env in data.environments}
        _cross_environment(out, readable)
        held = data.live.values
        live = {env: held[env] for env in data.environments if held.get(env)}
        _type_mismatches(out, live, "live")
    order = {"critical": 0, "warning": 1, "info": 2}
    return sorted(out.findings, key=lambda f: (order[f.severity], f.environment, f.kind, f.key))


def _source_problem(out: _Builder, problem: SourceProblem) -> None:
    scope = "rules" if problem.environment == "" else f"env:{problem.environment}"
    out.add(
        "invalid_source",
        problem.environment or "all",
        problem.key or problem.where,
        f"{problem.where}: {problem.reason}",
        scope=scope,
        source="live" if problem.key else "desired",
    )


def _desired_vs_live(
    out: _Builder, environment: str, desired: Flat, live: Flat, state: LiveState
) -> None:
    unreadable = state.unreadable.get(environment, set())
    marked = state.sensitive.get(environment, set())
    checksums = state.checksums.get(environment, {})
    desired_keys, live_keys = desired.keys(), live.keys()

    def hidden(key: str) -> bool:
        return key in marked or out.rules.is_sensitive(key)

    for key in desired_keys - live_keys - unreadable:
        out.add(
            "missing_in_live",
            environment,
            key,
            "declared, not live",
            before=show(desired[key], hidden(key)),
            source="live",
        )
    for key in live_keys - desired_keys:
        out.add(
            "unexpected_in_live",
            environment,
            key,
            "live, not declared",
            after=show(live[key], hidden(key)),
            source="live",
        )
    for key in changed_keys(desired, live, desired_keys & live_keys, checksums):
        secret = hidden(key) or key in checksums
        out.add(
            "value_changed",
            environment,
            key,
            "live value differs from declared",
            before=show(desired[key], secret),
            after=show(live[key], secret),
            source="live",
        )


def changed_keys(
    desired: Flat, live: Flat, common: set[str], checksums: Mapping[str, str]
) -> list[str]:
    """Keys of ``common`` whose live value is not the declared one.

    Passes in C: Python's ``!=`` and the values' types. Values that are equal with the
    same type are the same value, except containers, whose ``==`` takes ``True`` for ``1``
    inside them: equal containers are compared by their JSON text. Only the rest (a few
    percent) are looked at one by one, where ``1`` and ``1.0``, or the same mapping in
    another key order, still count as the same.
    """
    changed = [k for k in common.intersection(checksums) if checksum(desired[k]) != checksums[k]]
    keys = list(common.difference(checksums)) if checksums else list(common)
    wanted = list(map(desired.__getitem__, keys))
    actual = list(map(live.__getitem__, keys))
    types = list(map(type, wanted))
    suspect = map(
        or_, map(ne, wanted, actual), map(is_not, types, map(type, actual))
    )  # differ, or equal across types (True == 1)
    suspects = set(compress(range(len(keys)), suspect))
    dumps = orjson.dumps
    for index in compress(range(len(keys)), map(_is_container, types)):
        if index not in suspects and dumps(wanted[index]) != dumps(actual[index]):
            suspects.add(index)
    changed.extend(keys[i] for i in sorted(suspects) if not same(wanted[i], actual[i]))
    return changed


_CONTAINERS = frozenset({list, dict})


def _is_container(kind: type) -> bool:
    return kind in _CONTAINERS


def _schema(out: _Builder, environment: str, flat: Flat, source: str) -> None:
    in_sections = filter(methodcaller("startswith", _SCHEMA_SECTIONS), flat)  # a C loop
    sections = {key: flat[key] for key in in_sections}
    if not sections:
        return
    tree = unflatten(sections)
    critical = environment in out.rules.critical_environments
    problems = list(schema_problems(tree)) + list(cross_field_problems(tree, critical))
    for key, message in problems:
        out.add("schema_violation", environment, key, message, source=source)


def _cross_environment(out: _Builder, desired: Mapping[str, Flat]) -> None:
    names = sorted(desired)
    if len(names) < 2:
        return
    key_sets = [desired[name].keys() for name in names]
    everywhere = set(key_sets[0]).intersection(*key_sets[1:])
    anywhere = set().union(*key_sets)
    involved = tuple(names)
    for key in anywhere - everywhere:
        present = [name for name in names if key in desired[name]]
        for name in names:
            if key not in desired[name]:
                out.add(
                    "missing_in_environment",
                    name,
                    key,
                    f"present in {', '.join(present)}, absent here",
                    environments=involved,
                    scope="cross",
                )
    _type_mismatches(out, desired, "desired")


def _type_mismatches(out: _Builder, flats_by_name: Mapping[str, Flat], source: str) -> None:
    """``type_mismatch`` for every key whose JSON type differs between any two of the
    environments that hold it (``source``: their desired files, or their live values)."""
    names = sorted(flats_by_name)
    if len(names) < 2:
        return
    flats = [flats_by_name[name] for name in names]
    key_sets = [flat.keys() for flat in flats]
    everywhere = set(key_sets[0]).intersection(*key_sets[1:])
    # Keys every environment holds (nearly all): each environment's keys grouped by Python
    # type in C (no lookup per key), then set differences: a key is a suspect when the
    # first environment's type for it is not another's. Suspects are judged by JSON type
    # below (an int beside a float is still one JSON type).
    grouped = [_keys_by_type(flat) for flat in flats]
    found: set[str] = set()
    for other in grouped[1:]:
        for kind, held in grouped[0].items():
            found |= held - other.get(kind, _NONE)
    suspects = [(key, names) for key in found & everywhere]
    # Keys only some hold (few): compared among those that hold them.
    for key in set().union(*key_sets) - everywhere:
        holders = [name for name in names if key in flats_by_name[name]]
        if len(holders) >= 2:
            suspects.append((key, holders))
    for key, holders in suspects:
        kinds = {name: json_type(flats_by_name[name][key]) for name in holders}
        if len(set(kinds.values())) == 1:
            continue
        shown = ", ".join(f"{name}={kind_name}" for name, kind_name in kinds.items())
        where = "" if source == "desired" else f" ({source} values)"
        out.add(
            "type_mismatch",
            CROSS,
            key,
            f"JSON types differ{where}: {shown}",
            environments=tuple(holders),
            scope="cross",
            source=source,
        )


_NONE: frozenset[str] = frozenset()


def _keys_by_type(flat: Flat) -> dict[type, set[str]]:
    keys, types = list(flat), list(map(type, flat.values()))
    return {kind: set(compress(keys, map(is_, types, repeat(kind)))) for kind in set(types)}


def _stale_cache(out: _Builder, entries: list[CacheEntry]) -> None:
    """Cached values that are not the database's: never shown for a sensitive key."""
    for entry in entries:
        if not entry.stale():
            continue
        hidden = entry.sensitive or out.rules.is_sensitive(entry.key)
        if not entry.live_present:
            message, before = "cached, but no active row at this scope", None
        elif entry.unreadable:
            message, before = "cached value is not JSON", show(entry.live, hidden)
        else:
            message = "cached value differs from the active row"
            before = show(entry.live, hidden or entry.checksum is not None)
        out.add(
            "stale_cache",
            entry.environment,
            entry.where,
            f"{message} ({entry.cache_key})",
            before=before,
            after=None if entry.unreadable else show(entry.cached, hidden),
            source="cache",
        )


def _overrides(
    out: _Builder,
    environment: str,
    layers: Layers,
    desired: Flat | None,
    live: Flat,
    checksums: Mapping[str, str],
) -> None:
    """Each service and tenant override: orphaned, redundant, or against the schema."""
    services = service_values(layers.overrides)
    critical = environment in out.rules.critical_environments
    base = _schema_tree(live, {})
    known = set(_problems(base, critical)) if base else set()
    for (scope, tenant), group in by_layer(layers.overrides).items():
        for override in group:
            hidden = override.sensitive or out.rules.is_sensitive(override.key)
            whose = f" for tenant {tenant}" if tenant else ""
            shown = show(override.value, hidden or override.checksum is not None)
            if desired is not None and override.key not in desired:
                out.add(
                    "orphan_override",
                    environment,
                    override.where,
                    f"{scope} override{whose} of a key {environment} does not declare",
                    after=shown,
                    source="live",
                )
            below = _below(override, services, live, checksums, layers)
            if below is not None and _equal(override, below[1], below[2]):
                out.add(
                    "redundant_override",
                    environment,
                    override.where,
                    f"{scope} override{whose} equal to the {below[0]} value it overrides",
                    after=shown,
                    source="live",
                    severity="info",
                )

        # Orphans are findings already; the schema judges what the environment declares.
        def declared(o: Override) -> bool:
            return desired is None or o.key in desired

        layered = {k: o for k, o in services.items() if declared(o)} if scope == "tenant" else {}
        layered.update({o.key: o for o in group if declared(o)})
        tree = _schema_tree(live, layered)
        if not tree:
            continue
        overridden = [o.key for o in group if o.checksum is None and declared(o)]
        for key, message in _problems(tree, critical):
            if (key, message) in known or not _related(key, overridden):
                continue
            suffix = f"@{scope}/{tenant}" if tenant else f"@{scope}"
            out.add("schema_violation", environment, key + suffix, message, source="live")


def _schema_tree(live: Flat, layered: Mapping[str, Override]) -> Flat:
    tree = {k: v for k, v in live.items() if k.startswith(_SCHEMA_SECTIONS)}
    for key, override in layered.items():
        if override.checksum is None and key.startswith(_SCHEMA_SECTIONS):
            tree[key] = override.value
    return tree


def _problems(flat: Flat, critical: bool) -> list[tuple[str, str]]:
    tree = unflatten(flat)
    return list(schema_problems(tree)) + list(cross_field_problems(tree, critical))


def _related(problem: str, keys: list[str]) -> bool:
    return any(
        problem == key or key.startswith(problem + ".") or problem.startswith(key + ".")
        for key in keys
    )


def _below(
    override: Override,
    services: Mapping[str, Override],
    live: Flat,
    checksums: Mapping[str, str],
    layers: Layers,
) -> tuple[str, Any, str | None] | None:
    """The layer an override overrides: (its name, its value, its checksum if encrypted)."""
    key = override.key
    if override.scope == "tenant" and key in services:
        service = services[key]
        return "service", service.value, service.checksum
    if key in live:
        return "environment", live[key], checksums.get(key)
    if key in layers.globals:
        return "global", layers.globals[key], layers.global_checksums.get(key)
    return None


def _equal(override: Override, value: Any, value_checksum: str | None) -> bool:
    if override.checksum is not None or value_checksum is not None:
        mine = override.checksum or checksum(override.value)
        theirs = value_checksum or checksum(value)
        return mine == theirs
    return same(override.value, value)
