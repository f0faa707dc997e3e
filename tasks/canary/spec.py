"""A canary deployment as an operator writes it (YAML for ``fleet canary start``)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_DURATION = re.compile(r"(\d+)\s*([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(value: Any) -> Any:
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            return int(match.group(1)) * _UNITS[match.group(2)]
    if isinstance(value, timedelta):
        return int(value.total_seconds())
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Change(_Strict):
    key: str = Field(min_length=1)
    environment: str = Field(min_length=1)
    scope: str = "environment"
    tenant: str | None = None
    value: Any


class Metric(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    query: str = Field(min_length=1)
    direction: Literal["increase", "decrease", "either"] = "increase"
    critical: bool = False
    threshold: float | None = None

    @field_validator("query")
    @classmethod
    def _has_selector(cls, value: str) -> str:
        if "$selector" not in value:
            raise ValueError(
                "the query must contain $selector (replaced by the canary's and "
                "the baseline's label matchers)"
            )
        return value


class Analysis(_Strict):
    interval: int = 60
    window: int = 300
    step: int = 15
    passes: int = Field(default=3, ge=1)
    failure_limit: int = Field(default=2, ge=1)
    inconclusive_limit: int = Field(default=3, ge=1)
    min_samples: int = Field(default=10, ge=3)
    prometheus_deadline: int = 300

    @field_validator("interval", "window", "step", "prometheus_deadline", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return _seconds(value)


class Judge(_Strict):
    confidence: float = Field(default=0.98, gt=0.5, lt=1)
    tolerance: float = Field(default=0.25, ge=0)
    iqr_factor: float = Field(default=3.0, gt=0)
    pass_threshold: float = Field(default=95.0, ge=0, le=100)
    marginal_threshold: float = Field(default=75.0, ge=0, le=100)


class CanarySpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    change: Change
    canary: str = Field(min_length=1, description='label matchers, e.g. instance="canary"')
    baseline: str = Field(min_length=1)
    metrics: list[Metric] = Field(min_length=1)
    analysis: Analysis = Field(default_factory=Analysis)
    judge: Judge = Field(default_factory=Judge)
