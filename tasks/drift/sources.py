"""Reading desired and live configuration into flat ``{dotted.key: value}`` mappings.

Nothing here raises on bad input: a file that is not YAML, or not a mapping, and a live
value that is not JSON each become a :class:`SourceProblem`, and the rest is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import yaml

from workers.yamlio import load_yaml

Flat = dict[str, Any]


@dataclass(frozen=True)
class SourceProblem:
    environment: str
    where: str  # a file and line, or a table row
    reason: str
    key: str = ""  # the configuration key, when the problem is one value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Flat:
    """Nested mappings become dotted keys; lists and scalars are values.

    An empty mapping is kept as a value (``{}``), so that it is compared like any other.
    """
    flat: Flat = {}
    stack: list[tuple[str, Mapping[str, Any]]] = [(prefix, tree)]
    while stack:
        base, node = stack.pop()
        for name, value in node.items():
            key = f"{base}.{name}" if base else str(name)
            if isinstance(value, Mapping) and value:
                stack.append((key, value))
            else:
                flat[key] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return tree


def read_desired(path: Path, environment: str) -> tuple[Flat | None, SourceProblem | None]:
    """One environment's desired file, flattened; or why it cannot be used."""
    try:
        text = path.read_text()
    except OSError as exc:
        return None, SourceProblem(environment, str(path), f"cannot read: {exc.strerror or exc}")
    return parse_desired(text, str(path), environment)


def parse_desired(
    text: str, where: str, environment: str
) -> tuple[Flat | None, SourceProblem | None]:
    """Values come out as JSON would hold them (a YAML date is its ISO string), since
    that is how the platform stores them live."""
    try:
        document = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark is not None else where
        reason = getattr(exc, "problem", None) or "not valid YAML"
        return None, SourceProblem(environment, at, f"not valid YAML: {reason}")
    if not isinstance(document, dict):
        kind = "empty" if document is None else type(document).__name__
        return None, SourceProblem(environment, f"{where}:1", f"expected a mapping, got {kind}")
    flat = orjson.loads(orjson.dumps(flatten(document), default=str))
    return flat, None


def desired_files(config_dir: Path) -> dict[str, Path]:
    directory = config_dir / "environments"
    if not directory.is_dir():
        return {}
    found = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    return {path.stem: path for path in found}


class LiveRow(NamedTuple):
    """An active ``configurations`` row, as drift detection reads it (a plain tuple, so
    that 300,000 of them cost little)."""

    id: int
    environment: str
    key: str
    value: str | None
    sensitive: bool
    encrypted: bool
    meta: str | None  # the row's metadata JSON; its checksum stands in for encrypted values


@dataclass
class LiveState:
    """Live values per environment, and what is needed to compare them safely."""

    values: dict[str, Flat] = field(default_factory=dict)
    sensitive: dict[str, set[str]] = field(default_factory=dict)
    # Checksums standing in for encrypted values, which cannot be compared in clear.
    checksums: dict[str, dict[str, str]] = field(default_factory=dict)
    # Keys whose live value could not be read: reported once, not also as missing.
    unreadable: dict[str, set[str]] = field(default_factory=dict)
    problems: list[SourceProblem] = field(default_factory=list)


def read_live(rows: Iterable[tuple[Any, ...]]) -> LiveState:
    """Rows in :class:`LiveRow` order, parsed; nothing raises on a bad value."""
    state = LiveState()
    loads = orjson.loads
    for row in rows:
        _id, environment, key, value, sensitive, encrypted, _meta = row
        values = state.values.get(environment)
        if values is None:
            values = state.values[environment] = {}
        if sensitive or encrypted:
            state.sensitive.setdefault(environment, set()).add(key)
            if encrypted:
                _encrypted(state, LiveRow(*row), values)
                continue
        try:
            values[key] = loads(value) if value is not None else None
        except orjson.JSONDecodeError as exc:
            _unreadable(state, LiveRow(*row), f"value is not valid JSON ({exc})")
    return state


def _encrypted(state: LiveState, row: LiveRow, values: Flat) -> None:
    try:
        meta = orjson.loads(row.meta or "null")
    except orjson.JSONDecodeError:
        meta = None
    checksum = meta.get("checksum") if isinstance(meta, dict) else None
    if not isinstance(checksum, str):
        _unreadable(state, row, "encrypted value without a checksum in its metadata")
        return
    state.checksums.setdefault(row.environment, {})[row.key] = checksum
    values[row.key] = None


def _unreadable(state: LiveState, row: LiveRow, reason: str) -> None:
    state.unreadable.setdefault(row.environment, set()).add(row.key)
    where = f"configurations id={row.id}"
    state.problems.append(SourceProblem(row.environment, where, reason, key=row.key))
