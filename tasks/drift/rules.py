"""``drift-rules.yaml``: expected differences, sensitive keys, severity overrides."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.drift.model import KINDS, SEVERITIES
from workers.yamlio import load_yaml

DEFAULT_CRITICAL = ("production",)


class _Match(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1)
    environments: list[str] | None = None
    kinds: list[str] | None = None

    @model_validator(mode="after")
    def _known_kinds(self) -> _Match:
        unknown = [k for k in self.kinds or [] if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown kind {unknown[0]!r} (known: {', '.join(KINDS)})")
        return self


class _Expected(_Match):
    reason: str = Field(min_length=1)
    expires: date | None = None


class _Override(_Match):
    severity: str

    @model_validator(mode="after")
    def _known_severity(self) -> _Override:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {', '.join(SEVERITIES)}")
        return self


class _RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    critical_environments: list[str] = Field(default_factory=lambda: list(DEFAULT_CRITICAL))
    expected: list[_Expected] = Field(default_factory=list)
    sensitive: list[str] = Field(default_factory=list)
    severity: list[_Override] = Field(default_factory=list)


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True)
class Rule:
    pattern: str
    environments: frozenset[str] | None
    kinds: frozenset[str] | None
    reason: str = ""
    expires: date | None = None
    severity: str | None = None

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return _glob(self.pattern)

    def matches(self, kind: str, key: str, environments: tuple[str, ...]) -> bool:
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.environments is not None and not set(environments) & self.environments:
            return False
        return self._regex.match(key) is not None

    def active(self, today: date) -> bool:
        return self.expires is None or today <= self.expires


@dataclass(frozen=True)
class Rules:
    critical_environments: frozenset[str] = frozenset(DEFAULT_CRITICAL)
    expected: tuple[Rule, ...] = ()
    sensitive: tuple[str, ...] = ()
    overrides: tuple[Rule, ...] = ()
    _sensitive_regex: re.Pattern[str] | None = field(default=None, compare=False)

    @classmethod
    def hiding_everything(cls) -> Rules:
        """Rules for a run without usable rules: every value is sensitive."""
        return cls(sensitive=("*",), _sensitive_regex=re.compile(".*"))

    def is_sensitive(self, key: str) -> bool:
        return self._sensitive_regex is not None and self._sensitive_regex.match(key) is not None

    def expectation(
        self, kind: str, key: str, environments: tuple[str, ...], now: datetime
    ) -> Rule | None:
        today = now.date()
        for rule in self.expected:
            if rule.matches(kind, key, environments) and rule.active(today):
                return rule
        return None

    def override(self, kind: str, key: str, environments: tuple[str, ...]) -> str | None:
        for rule in self.overrides:
            if rule.matches(kind, key, environments):
                return rule.severity
        return None


def _rule(entry: _Match, **extra: Any) -> Rule:
    return Rule(
        pattern=entry.key,
        environments=frozenset(entry.environments) if entry.environments is not None else None,
        kinds=frozenset(entry.kinds) if entry.kinds is not None else None,
        **extra,
    )


class RulesError(Exception):
    """The rules file cannot be used; ``where`` is the file (and line)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def parse_rules(text: str, source: str) -> Rules:
    try:
        document = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise RulesError(where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if document is None:
        return Rules()
    try:
        parsed = _RulesFile.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "rules"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise RulesError(source, f"{where}: {message}") from None
    sensitive = tuple(parsed.sensitive)
    regex = (
        re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in sensitive))
        if sensitive
        else None
    )
    return Rules(
        critical_environments=frozenset(parsed.critical_environments),
        expected=tuple(_rule(e, reason=e.reason, expires=e.expires) for e in parsed.expected),
        sensitive=sensitive,
        overrides=tuple(_rule(o, severity=o.severity) for o in parsed.severity),
        _sensitive_regex=regex,
    )


def load_rules(config_dir: Path) -> tuple[Rules, str | None]:
    """The rules in ``config_dir/drift-rules.yaml`` and the file's text; no rules (and no
    text) if the file is absent. Raises RulesError when it cannot be read or parsed."""
    path = config_dir / "drift-rules.yaml"
    if not path.exists():
        return Rules(), None
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesError(str(path), f"cannot read: {exc.strerror or exc}") from None
    return parse_rules(text, str(path)), text
