"""A guarded rollout as an operator writes it (YAML for ``fleet rollout start``).

The metrics and the judge are a canary deployment's (:mod:`tasks.canary.spec`): each
query holds ``$selector``, replaced by the treatment's and then the control's label
matchers (by default ``flag_variant="<variant>"``).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.canary.spec import Judge, Metric, _seconds

DEFAULT_STEPS = (1.0, 5.0, 25.0, 50.0, 100.0)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variant(_Strict):
    """Which of the flag's variants, and the label matchers of its series."""

    variant: str | None = Field(default=None, min_length=1)
    selector: str | None = Field(default=None, min_length=1)


class Analysis(_Strict):
    window: int = 300
    step: int = 15
    min_samples: int = Field(default=10, ge=1)
    inconclusive_limit: int = Field(default=3, ge=1)
    prometheus_deadline: int = 300

    @field_validator("window", "step", "prometheus_deadline", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return _seconds(value)


class RolloutSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    flag: str = Field(min_length=1)
    environment: str = Field(min_length=1)
    steps: list[float] = Field(default_factory=lambda: list(DEFAULT_STEPS), min_length=1)
    min_step: int = Field(default=600, ge=0, description="seconds each step lasts at least")
    min_impressions: int = Field(
        default=1000, ge=0, description="impressions of each variant during a step"
    )
    treatment: Variant = Field(default_factory=Variant)
    control: Variant = Field(default_factory=Variant)
    metrics: list[Metric] = Field(min_length=1)
    analysis: Analysis = Field(default_factory=Analysis)
    judge: Judge = Field(default_factory=Judge)
    on_failure: Literal["zero", "previous_step"] = "zero"

    @field_validator("min_step", mode="before")
    @classmethod
    def _min_step(cls, value: Any) -> Any:
        return _seconds(value)

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError("each step is a percentage above 0 and at most 100")
        if any(b <= a for a, b in pairwise(steps)):
            raise ValueError("steps must increase")
        if steps[-1] != 100:
            raise ValueError("the last step is 100 (the whole population)")
        return steps

    @model_validator(mode="after")
    def _variants_differ(self) -> RolloutSpec:
        named = (self.treatment.variant, self.control.variant)
        if named[0] is not None and named[0] == named[1]:
            raise ValueError("treatment and control are the same variant")
        return self
