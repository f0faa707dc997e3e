"""A canary deployment as an operator writes it (YAML for ``fleet canary start``)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class Subset(_Strict):
    """The canary subset, at one of the platform's narrower scopes: a service
    (``scope: service``) or tenants (``scope: tenant``, one override per tenant)."""

    service: str | None = Field(default=None, min_length=1)
    tenants: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> Subset:
        if (self.service is None) == (self.tenants is None):
            raise ValueError("name the canary subset as service: NAME or tenants: [IDS]")
        if self.tenants is not None and len(set(self.tenants)) != len(self.tenants):
            raise ValueError("a tenant is named twice")
        return self


class EffectSize(_Strict):
    """Kayenta's ``effectSize``; unset limits take the measure's default."""

    measure: Literal["meanRatio", "cles"] = "meanRatio"
    allowed_increase: float | None = Field(default=None, gt=0)
    allowed_decrease: float | None = Field(default=None, gt=0)
    critical_increase: float | None = Field(default=None, gt=0)
    critical_decrease: float | None = Field(default=None, gt=0)


class Metric(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    query: str = Field(min_length=1)
    direction: Literal["increase", "decrease", "either"] = "increase"
    critical: bool = False
    threshold: float | None = None
    must_have_data: bool = False
    muted: bool = False
    groups: list[str] = Field(default_factory=lambda: ["default"], min_length=1)
    nan_strategy: Literal["remove", "replace"] = "remove"
    outliers: Literal["keep", "remove"] = "keep"
    outlier_factor: float = Field(default=3.0, gt=0)
    effect_size: EffectSize | None = None

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
    min_samples: int = Field(default=10, ge=1)
    prometheus_deadline: int = 300
    max_duration: int = Field(default=7200, ge=1)

    @field_validator(
        "interval", "window", "step", "prometheus_deadline", "max_duration", mode="before"
    )
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return _seconds(value)


class Judge(_Strict):
    confidence: float = Field(default=0.98, gt=0.5, lt=1)
    tolerance: float = Field(default=0.25, ge=0)
    pass_threshold: float = Field(default=95.0, ge=0, le=100)
    marginal_threshold: float = Field(default=75.0, ge=0, le=100)
    group_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("group_weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in value.values()) or sum(value.values()) > 100:
            raise ValueError("group weights are percentages: each at least 0, together at most 100")
        return value


class CanarySpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    change: Change
    canary: str = Field(min_length=1, description='label matchers, e.g. instance="canary"')
    baseline: str = Field(min_length=1)
    subset: Subset | None = None
    metrics: list[Metric] = Field(min_length=1)
    analysis: Analysis = Field(default_factory=Analysis)
    judge: Judge = Field(default_factory=Judge)

    @model_validator(mode="after")
    def _subset_is_narrower(self) -> CanarySpec:
        if self.subset is not None and self.change.scope not in ("environment", "global"):
            raise ValueError(
                "with a canary subset, change.scope is the scope promotion writes: "
                "environment or global"
            )
        return self
