"""The canary judge and the deployment state machine, by tables."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from tasks.canary import judge as judge_module
from tasks.canary.judge import (
    EffectSize,
    JudgeConfig,
    MetricResult,
    MetricSpec,
    judge_metric,
    score,
)
from tasks.canary.machine import Limits, Progress, abort, after_analysis, after_unreachable

CONFIG = JudgeConfig(min_samples=10)


def noisy(center: float, n: int = 60, spread: float = 0.05, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-spread, spread)) for _ in range(n)]


def gaussian(center: float, n: int = 60, sd: float = 0.05, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(center, sd * center) for _ in range(n)]


def spec(direction: str = "increase", **extra: object) -> MetricSpec:
    return MetricSpec("latency", "m{$selector}", direction, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("canary", "baseline", "direction", "classification", "failed"),
    [
        (noisy(100, seed=1), noisy(100, seed=2), "increase", "pass", False),
        (noisy(200, seed=1), noisy(100, seed=2), "increase", "high", True),
        (noisy(200, seed=1), noisy(100, seed=2), "decrease", "pass", False),  # up is fine here
        (noisy(50, seed=1), noisy(100, seed=2), "increase", "pass", False),  # down is fine here
        (noisy(50, seed=1), noisy(100, seed=2), "decrease", "low", True),
        (noisy(50, seed=1), noisy(100, seed=2), "either", "low", True),
        (noisy(110, seed=1), noisy(100, seed=2), "increase", "high", True),  # 10 %, clear
        ([5.0] * 30, [5.0] * 30, "increase", "pass", False),  # all ties
    ],
)
def test_metric_classification(
    canary: list[float], baseline: list[float], direction: str, classification: str, failed: bool
) -> None:
    result = judge_metric(spec(direction), canary, baseline, CONFIG)
    assert (result.classification, result.failed) == (classification, failed)


@pytest.mark.parametrize("regression", [1.10, 1.15, 1.20])
def test_a_ten_to_twenty_percent_regression_with_five_percent_noise_fails(
    regression: float,
) -> None:
    """The judge before Kayenta's rule asked for a shift beyond 25 % of the baseline's
    median and passed every one of these; Kayenta's interval rule fails them all."""
    for seed in range(20):
        canary = gaussian(100 * regression, seed=seed)
        baseline = gaussian(100, seed=1000 + seed)
        result = judge_metric(spec(), canary, baseline, CONFIG)
        assert result.classification == "high", (seed, result)
        assert result.lower is not None and result.estimate is not None
        assert result.lower > 0.25 * abs(result.estimate)


def test_a_healthy_canary_passes_at_the_confidence_asked_for() -> None:
    highs = sum(
        judge_metric(
            spec(), gaussian(100, seed=s), gaussian(100, seed=500 + s), CONFIG
        ).classification
        == "high"
        for s in range(50)
    )
    assert highs <= 2  # one-sided false alarms at 98 % confidence: about 1 in 100


def test_too_few_samples_is_nodata_not_a_pass() -> None:
    result = judge_metric(spec(), noisy(100, n=9), noisy(100), CONFIG)
    assert (result.classification, result.failed) == ("nodata", False)
    assert result.reason == "9 canary and 60 baseline samples; at least 10 each are needed"
    strict = judge_metric(spec(must_have_data=True), noisy(100, n=9), noisy(100), CONFIG)
    assert (strict.classification, strict.failed) == ("nodata_fail", True)
    # min_samples 1 judges as Kayenta does
    one = judge_metric(spec(), noisy(100, n=9), noisy(100), JudgeConfig(min_samples=1))
    assert one.classification == "pass"


def test_nan_and_infinities_are_missing_values() -> None:
    canary = noisy(100, n=12) + [math.nan] * 20 + [math.inf, -math.inf]
    assert judge_metric(spec(), canary, noisy(100), CONFIG).canary_samples == 12
    empty = judge_metric(spec(), [math.nan] * 30, noisy(100), CONFIG)
    assert (empty.classification, empty.reason) == ("nodata", "Missing data for latency")
    strict = judge_metric(spec(must_have_data=True), [math.nan] * 30, noisy(100), CONFIG)
    assert (strict.classification, strict.failed) == ("nodata_fail", True)
    # replace: NaN is 0, so a canary reporting NaN most of the time is low, not missing
    replaced = judge_metric(
        spec("either", nan_strategy="replace"),
        noisy(100, n=10) + [math.nan] * 40,
        noisy(100),
        CONFIG,
    )
    assert (replaced.canary_samples, replaced.classification) == (50, "low")


def test_outliers_are_kept_unless_asked_and_then_cut_at_the_judges_fences() -> None:
    canary = [*noisy(100, seed=4), 10000.0, 9000.0]
    kept = judge_metric(spec(), canary, noisy(100, seed=5), CONFIG)
    assert (kept.classification, kept.canary_samples) == ("pass", 62)
    cut = judge_metric(spec(outliers="remove"), canary, noisy(100, seed=5), CONFIG)
    # reduced sensitivity: the fence is never inside the 99th percentile (9,390 here)
    assert (cut.classification, cut.canary_samples) == ("pass", 61)


def test_an_absolute_threshold_fails_first() -> None:
    result = judge_metric(spec(threshold=90.0), noisy(100, seed=1), noisy(100, seed=2), CONFIG)
    assert (result.classification, result.failed) == ("high", True)
    assert "beyond the threshold 90" in (result.reason or "")


def test_effect_size_thresholds_let_small_shifts_through() -> None:
    canary, baseline = noisy(110, seed=1), noisy(100, seed=2)
    allowed = spec(effect_size=EffectSize(allowed_increase=1.2))
    assert judge_metric(allowed, canary, baseline, CONFIG).classification == "pass"
    strict = spec(effect_size=EffectSize(allowed_increase=1.05))
    assert judge_metric(strict, canary, baseline, CONFIG).classification == "high"
    cles = spec(effect_size=EffectSize(measure="cles", allowed_increase=0.9))
    judged = judge_metric(cles, canary, baseline, CONFIG)
    assert judged.classification == "high" and (judged.effect_size or 0) > 0.99


def test_a_failing_classification_is_an_error_and_no_evidence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(judge_module.kayenta, "classify", broken)
    result = judge_metric(spec(), noisy(100), noisy(100), CONFIG)
    assert result.classification == "error" and not result.failed
    assert result.reason == (
        "Metric Classification Failed: ZeroDivisionError: float division by zero"
    )
    assert score([result], CONFIG).classification == "nodata"  # Kayenta would say 100


def result(
    classification: str,
    failed: bool = False,
    critical: bool = False,
    groups: tuple[str, ...] = ("default",),
    muted: bool = False,
) -> MetricResult:
    return MetricResult("m", classification, failed, critical, 30, 30, muted, groups)


@pytest.mark.parametrize(
    ("results", "verdict", "value"),
    [
        ([result("pass")] * 4, "pass", 100.0),
        ([result("pass")] * 19 + [result("high", True)], "pass", 95.0),
        ([result("pass")] * 3 + [result("high", True)], "marginal", 75.0),
        ([result("pass"), result("high", True)], "fail", 50.0),
        ([result("pass"), result("nodata_fail", True)], "fail", 50.0),
        ([result("pass")] * 9 + [result("high", True, critical=True)], "fail", 0.0),
        ([result("pass")] * 3 + [result("nodata", critical=True)], "fail", 0.0),
        ([result("pass")] * 3 + [result("nodata")], "pass", 100.0),  # left out
        ([result("pass"), result("nodata")], "nodata", 0.0),  # half without data
        ([result("pass"), result("error")], "nodata", 0.0),
        ([result("high", True, muted=True), result("pass")], "pass", 100.0),
        ([result("high", True, muted=True)], "nodata", None),
        ([], "nodata", None),
    ],
)
def test_scoring_as_kayenta_does(
    results: list[MetricResult], verdict: str, value: float | None
) -> None:
    scored = score(results, CONFIG)
    assert (scored.classification, scored.score) == (verdict, value)


def test_groups_are_weighted() -> None:
    results = [
        result("pass", groups=("latency",)),
        result("pass", groups=("latency",)),
        result("pass", groups=("errors",)),
        result("high", True, groups=("errors",)),
    ]
    weighted = score(results, JudgeConfig(group_weights={"latency": 70, "errors": 30}))
    assert (weighted.classification, weighted.score) == ("marginal", 85.0)
    assert weighted.groups == {"latency": 100.0, "errors": 50.0}
    even = score(results, CONFIG)  # unweighted groups share 100
    assert even.score == 75.0


def test_stored_metrics_of_older_deployments_still_load() -> None:
    old = {
        "name": "l",
        "query": "q{$selector}",
        "direction": "increase",
        "critical": False,
        "threshold": None,
    }
    assert MetricSpec.from_dict(old) == MetricSpec("l", "q{$selector}")
    new = {**old, "groups": ["a", "b"], "effect_size": {"measure": "cles"}, "future": 1}
    loaded = MetricSpec.from_dict(new)
    assert loaded.groups == ("a", "b") and loaded.effect_size.measure == "cles"


LIMITS = Limits(
    passes_required=3,
    failure_limit=2,
    inconclusive_limit=2,
    prometheus_deadline=timedelta(minutes=5),
)


def run(verdicts: list[str]) -> tuple[Progress, list[str | None]]:
    progress, decisions = Progress(), []
    for verdict in verdicts:
        step = after_analysis(progress, verdict, LIMITS)
        progress = step.progress
        decisions.append(step.decision)
    return progress, decisions


@pytest.mark.parametrize(
    ("verdicts", "state", "decisions"),
    [
        (["pass", "pass", "pass"], "promoted", [None, None, "promote"]),
        (["pass", "fail", "pass", "pass"], "promoted", [None, None, None, "promote"]),
        (["fail", "pass", "fail"], "rolled_back", [None, None, "rollback"]),
        (["nodata", "nodata"], "rolled_back", [None, "rollback"]),
        (["marginal", "pass", "nodata"], "rolled_back", [None, None, "rollback"]),
        (["pass"], "analyzing", [None]),
        (["pass", "pass", "pass", "fail", "fail"], "promoted", [None, None, "promote", None, None]),
    ],
)
def test_the_state_machine(verdicts: list[str], state: str, decisions: list[str | None]) -> None:
    progress, seen = run(verdicts)
    assert progress.state == state
    assert seen == decisions


def test_prometheus_down_past_the_deadline_rolls_back_never_promotes() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    progress = Progress(state="analyzing", passes=2)
    step = after_unreachable(progress, t0, LIMITS)
    assert step.decision is None and step.progress.prometheus_down_since == t0
    step = after_unreachable(step.progress, t0 + timedelta(minutes=5), LIMITS)
    assert step.decision is None
    step = after_unreachable(step.progress, t0 + timedelta(minutes=5, seconds=1), LIMITS)
    assert (step.decision, step.progress.state) == ("rollback", "rolled_back")


def test_prometheus_back_in_time_clears_the_outage() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    down = after_unreachable(Progress(state="analyzing"), t0, LIMITS).progress
    assert after_analysis(down, "pass", LIMITS).progress.prometheus_down_since is None


def test_abort_and_final_states() -> None:
    step = abort(Progress(state="analyzing"))
    assert (step.progress.state, step.decision) == ("aborted", "rollback")
    for final in ("promoted", "rolled_back", "aborted"):
        assert abort(Progress(state=final)).decision is None
        assert after_analysis(Progress(state=final), "fail", LIMITS).decision is None


def test_the_readmes_deployment_example_is_a_valid_spec() -> None:
    from pathlib import Path

    import yaml

    from tasks.canary.spec import CanarySpec

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("name: pool-size-25")
    example = CanarySpec.model_validate(yaml.safe_load(readme[start : readme.index("```", start)]))
    metric = MetricSpec.from_dict(example.metrics[1].model_dump())
    assert metric.groups == ("latency",) and metric.effect_size.allowed_increase == 1.1
    assert example.judge.group_weights == {"default": 60, "latency": 40}
