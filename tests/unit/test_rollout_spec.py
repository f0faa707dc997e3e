"""What a rollout spec accepts and refuses, each refusal said in one line."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tasks.rollouts.spec import DEFAULT_STEPS, RolloutSpec

METRIC = {"name": "errors", "query": "rate(app_errors_total{$selector}[1m])"}


def spec(**changes: Any) -> RolloutSpec:
    return RolloutSpec.model_validate(
        {"name": "r", "flag": "f", "environment": "production", "metrics": [METRIC], **changes}
    )


def test_defaults_are_the_issues_steps_and_durations_read_as_seconds() -> None:
    made = spec(min_step="10m", analysis={"window": "5m", "prometheus_deadline": "2m"})
    assert made.steps == list(DEFAULT_STEPS) == [1, 5, 25, 50, 100]
    assert (made.min_step, made.analysis.window, made.analysis.prometheus_deadline) == (
        600,
        300,
        120,
    )
    assert made.on_failure == "zero" and made.min_impressions == 1000


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"steps": [5, 1, 100]}, "steps must increase"),
        ({"steps": [1, 5, 50]}, "the last step is 100"),
        ({"steps": [0, 50, 100]}, "above 0 and at most 100"),
        ({"steps": [1, 5, 150]}, "above 0 and at most 100"),
        ({"steps": []}, "at least 1 item"),
        ({"treatment": {"variant": "a"}, "control": {"variant": "a"}}, "the same variant"),
        ({"metrics": [{"name": "x", "query": "up"}]}, "must contain $selector"),
        ({"on_failure": "half"}, "'zero' or 'previous_step'"),
        ({"name": "Bad Name"}, "should match pattern"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(changes: dict[str, Any], said: str) -> None:
    with pytest.raises(ValidationError, match=said.replace("$", r"\$")):
        spec(**changes)
