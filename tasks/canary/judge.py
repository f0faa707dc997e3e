"""The canary judge, as Kayenta's NetflixACAJudge does it, plus a refusal to judge on too
few samples.

Per metric: drop NaN and infinities, drop outliers (Tukey fences at ``iqr_factor`` times the
interquartile range), then ``nodata`` when either side has fewer than ``min_samples``;
an absolute threshold when given; then a two-sided Mann-Whitney U test at ``confidence``:
no significant difference is ``pass``; a significant one is ``high`` or ``low`` by the sign
of the Hodges-Lehmann estimate of the shift, unless the shift is within ``tolerance`` of the
baseline's median (``pass``). Only the bad direction fails: with ``direction: increase``, a
``low`` canary passes. Score: passes / (passes + high + low) over metrics with data, in
percent; 0 when a critical metric fails. Classification: ``pass`` at ``pass_threshold``,
``marginal`` at ``marginal_threshold``, ``fail`` below; ``nodata`` when any metric lacks data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
from scipy.stats import mannwhitneyu

Direction = Literal["increase", "decrease", "either"]


@dataclass(frozen=True)
class JudgeConfig:
    confidence: float = 0.98
    tolerance: float = 0.25
    iqr_factor: float = 3.0
    pass_threshold: float = 95.0
    marginal_threshold: float = 75.0
    min_samples: int = 10


@dataclass(frozen=True)
class MetricSpec:
    name: str
    query: str
    direction: Direction = "increase"
    critical: bool = False
    threshold: float | None = None


@dataclass(frozen=True)
class MetricResult:
    name: str
    classification: str  # pass, high, low, nodata
    failed: bool  # high or low in the bad direction (or over the threshold)
    critical: bool
    canary_samples: int
    baseline_samples: int
    canary_median: float | None = None
    baseline_median: float | None = None
    p_value: float | None = None
    shift: float | None = None  # Hodges-Lehmann estimate, canary minus baseline
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    classification: str  # pass, marginal, fail, nodata
    score: float | None
    metrics: tuple[MetricResult, ...]


def clean(samples: Sequence[float], iqr_factor: float) -> np.ndarray:
    values: np.ndarray = np.asarray(samples, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < 4:
        return values
    low, high = np.percentile(values, [25, 75])
    spread = high - low
    kept: np.ndarray = values[
        (values >= low - iqr_factor * spread) & (values <= high + iqr_factor * spread)
    ]
    return kept


def hodges_lehmann(canary: np.ndarray, baseline: np.ndarray) -> float:
    return float(np.median(np.subtract.outer(canary, baseline)))


def _bad(classification: str, direction: Direction) -> bool:
    if classification == "high":
        return direction in ("increase", "either")
    if classification == "low":
        return direction in ("decrease", "either")
    return False


def judge_metric(
    spec: MetricSpec, canary: Sequence[float], baseline: Sequence[float], config: JudgeConfig
) -> MetricResult:
    c, b = clean(canary, config.iqr_factor), clean(baseline, config.iqr_factor)
    result = MetricResult(
        spec.name,
        "nodata",
        failed=False,
        critical=spec.critical,
        canary_samples=int(c.size),
        baseline_samples=int(b.size),
    )
    if c.size < config.min_samples or b.size < config.min_samples:
        return replace(
            result,
            reason=f"{c.size} canary and {b.size} baseline samples; "
            f"at least {config.min_samples} each are needed",
        )
    result = replace(result, canary_median=float(np.median(c)), baseline_median=float(np.median(b)))
    assert result.canary_median is not None and result.baseline_median is not None
    if spec.threshold is not None:
        upward = spec.direction != "decrease"
        beyond = (
            result.canary_median > spec.threshold
            if upward
            else result.canary_median < spec.threshold
        )
        if beyond:
            return replace(
                result,
                classification="high" if upward else "low",
                failed=True,
                reason=f"canary median beyond the threshold {spec.threshold:g}",
            )
    if np.all(c == c[0]) and np.all(b == b[0]) and c[0] == b[0]:
        return replace(result, classification="pass", p_value=1.0, shift=0.0)
    p_value = float(mannwhitneyu(c, b, alternative="two-sided").pvalue)
    shift = hodges_lehmann(c, b)
    classification = "pass"
    if p_value < 1 - config.confidence:
        reference = abs(result.baseline_median)
        relative = abs(shift) / reference if reference else math.inf
        if relative > config.tolerance:
            classification = "high" if shift > 0 else "low"
    return replace(
        result,
        classification=classification,
        failed=_bad(classification, spec.direction),
        p_value=p_value,
        shift=shift,
    )


def score(results: Sequence[MetricResult], config: JudgeConfig) -> Verdict:
    """Missing data never counts as healthy: one metric without data makes the whole
    analysis ``nodata`` (inconclusive), whatever the others say."""
    if not results or any(r.classification == "nodata" for r in results):
        return Verdict("nodata", None, tuple(results))
    judged = list(results)
    if any(r.failed and r.critical for r in judged):
        return Verdict("fail", 0.0, tuple(results))
    passed = sum(1 for r in judged if not r.failed)
    value = 100.0 * passed / len(judged)
    if value >= config.pass_threshold:
        classification = "pass"
    elif value >= config.marginal_threshold:
        classification = "marginal"
    else:
        classification = "fail"
    return Verdict(classification, value, tuple(results))
