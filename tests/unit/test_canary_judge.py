"""The canary judge and the deployment state machine, by tables."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from tasks.canary.judge import JudgeConfig, MetricResult, MetricSpec, clean, judge_metric, score
from tasks.canary.machine import Limits, Progress, abort, after_analysis, after_unreachable

CONFIG = JudgeConfig(min_samples=10)


def noisy(center: float, n: int = 60, spread: float = 0.05, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-spread, spread)) for _ in range(n)]


def spec(direction: str = "increase", **extra: object) -> MetricSpec:
    return MetricSpec("latency", "m{$selector}", direction, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("canary", "baseline", "direction", "classification", "failed"),
    [
        (noisy(100, seed=1), noisy(100, seed=2), "increase", "pass", False),
        (noisy(200, seed=1), noisy(100, seed=2), "increase", "high", True),
        (noisy(200, seed=1), noisy(100, seed=2), "decrease", "high", False),  # up is fine here
        (noisy(50, seed=1), noisy(100, seed=2), "increase", "low", False),  # down is fine here
        (noisy(50, seed=1), noisy(100, seed=2), "decrease", "low", True),
        (noisy(50, seed=1), noisy(100, seed=2), "either", "low", True),
        (noisy(110, seed=1), noisy(100, seed=2), "increase", "pass", False),  # within 25%
        ([5.0] * 30, [5.0] * 30, "increase", "pass", False),  # all ties
    ],
)
def test_metric_classification(
    canary: list[float], baseline: list[float], direction: str, classification: str, failed: bool
) -> None:
    result = judge_metric(spec(direction), canary, baseline, CONFIG)
    assert (result.classification, result.failed) == (classification, failed)


def test_too_few_samples_is_nodata_not_a_pass() -> None:
    result = judge_metric(spec(), noisy(100, n=9), noisy(100), CONFIG)
    assert result.classification == "nodata"
    assert result.reason == "9 canary and 60 baseline samples; at least 10 each are needed"


def test_nan_and_infinities_are_dropped_before_counting() -> None:
    canary = noisy(100, n=12) + [math.nan] * 20 + [math.inf]
    assert clean(canary, 3.0).size == 12
    assert judge_metric(spec(), canary, noisy(100), CONFIG).canary_samples == 12
    assert judge_metric(spec(), [math.nan] * 30, noisy(100), CONFIG).classification == "nodata"


def test_outliers_do_not_fail_a_healthy_canary() -> None:
    canary = [*noisy(100, seed=4), 10000.0, 9000.0]
    result = judge_metric(spec(), canary, noisy(100, seed=5), CONFIG)
    assert result.classification == "pass" and result.canary_samples == 60


def test_an_absolute_threshold_fails_first() -> None:
    result = judge_metric(spec(threshold=90.0), noisy(100, seed=1), noisy(100, seed=2), CONFIG)
    assert (result.classification, result.failed) == ("high", True)
    assert "threshold 90" in (result.reason or "")


def result(classification: str, failed: bool = False, critical: bool = False) -> MetricResult:
    return MetricResult("m", classification, failed, critical, 30, 30)


@pytest.mark.parametrize(
    ("results", "verdict", "value"),
    [
        ([result("pass")] * 4, "pass", 100.0),
        ([result("pass")] * 19 + [result("high", True)], "pass", 95.0),
        ([result("pass")] * 3 + [result("high", True)], "marginal", 75.0),
        ([result("pass"), result("high", True)], "fail", 50.0),
        ([result("pass")] * 9 + [result("high", True, critical=True)], "fail", 0.0),
        ([result("pass"), result("nodata")], "nodata", None),
        ([], "nodata", None),
        ([result("low"), result("pass")], "pass", 100.0),  # low but not in the bad direction
    ],
)
def test_scoring_like_kayenta(
    results: list[MetricResult], verdict: str, value: float | None
) -> None:
    scored = score(results, CONFIG)
    assert (scored.classification, scored.score) == (verdict, value)


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
