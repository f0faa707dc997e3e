"""How a deployment's metrics are judged: Kayenta's classifier and scorer
(:mod:`tasks.canary.kayenta`), with the fleet's stricter additions as explicit options.

Per metric, as Kayenta's ``NetflixACAJudge`` does: NaN removed (or replaced by 0 with
``nan_strategy: replace``), outliers kept unless ``outliers: remove`` (IQR fences at
``outlier_factor``), then ``MannWhitneyClassifier`` at the deployment's ``confidence`` and
``tolerance`` in the metric's ``direction``, with its effect-size and critical thresholds.
Then Kayenta's ``WeightedSumScorer`` over metric groups, and its threshold classifier.

The fleet's additions, each fail-closed by default and said in the result's reason:

- ``min_samples``: a side with fewer values (after NaN and outlier handling) is ``nodata``,
  as an empty side is in Kayenta (``nodata_fail`` with ``must_have_data``). 1 judges as
  Kayenta does.
- ``threshold``: an absolute limit on the canary's median in the bad direction, checked
  before the statistics.
- Infinities count as missing values (NaN), not as observations.
- A metric whose classification raises is ``error`` (Kayenta's "Metric Classification
  Failed"); Kayenta's scorer leaves it out, so a canary whose metrics all erred would score
  100. The fleet scores it as ``Nodata`` (critical if the metric is).
- Kayenta's "50% or more metrics returned NODATA" failure (score 0) is the verdict
  ``nodata``, which counts toward the deployment's ``inconclusive_limit`` rather than its
  ``failure_limit``. It never promotes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from tasks.canary import kayenta

Direction = kayenta.Direction

# Kayenta's labels as the fleet writes them (results, metrics, CLI).
LABELS: dict[kayenta.Label, str] = {
    "Pass": "pass",
    "High": "high",
    "Low": "low",
    "Nodata": "nodata",
    "NodataFailMetric": "nodata_fail",
    "Error": "error",
}
FAILED = frozenset({"high", "low", "nodata_fail"})


@dataclass(frozen=True)
class JudgeConfig:
    confidence: float = 0.98
    tolerance: float = 0.25
    pass_threshold: float = 95.0
    marginal_threshold: float = 75.0
    min_samples: int = 10
    group_weights: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EffectSize:
    """Kayenta's ``effectSize`` of a metric: the measure and its limits (``None``: the
    measure's default, 1.0 for meanRatio and 0.5 for cles, which lets any shift through)."""

    measure: kayenta.Measure = "meanRatio"
    allowed_increase: float | None = None
    allowed_decrease: float | None = None
    critical_increase: float | None = None
    critical_decrease: float | None = None

    def thresholds(self) -> tuple[kayenta.Thresholds, kayenta.Thresholds]:
        default = kayenta.Thresholds.default(self.measure)

        def pick(value: float | None, fallback: float) -> float:
            return fallback if value is None else value

        allowed = kayenta.Thresholds(
            pick(self.allowed_decrease, default.decrease),
            pick(self.allowed_increase, default.increase),
        )
        critical = kayenta.Thresholds(
            pick(self.critical_decrease, default.decrease),
            pick(self.critical_increase, default.increase),
        )
        return allowed, critical


@dataclass(frozen=True)
class MetricSpec:
    name: str
    query: str
    direction: Direction = "increase"
    critical: bool = False
    threshold: float | None = None
    must_have_data: bool = False
    muted: bool = False
    groups: tuple[str, ...] = ("default",)
    nan_strategy: kayenta.NanStrategy = "remove"
    outliers: Literal["keep", "remove"] = "keep"
    outlier_factor: float = 3.0
    effect_size: EffectSize = EffectSize()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> MetricSpec:
        """From a stored deployment's metric (older rows lack the newer keys)."""
        values = dict(raw)
        if "groups" in values:
            values["groups"] = tuple(values["groups"] or ("default",))
        effect = values.pop("effect_size", None)
        if effect is not None:
            values["effect_size"] = EffectSize(**effect)
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class MetricResult:
    name: str
    classification: str  # pass, high, low, nodata, nodata_fail, error
    failed: bool  # high, low or nodata_fail (the directions not asked for are pass)
    critical: bool
    canary_samples: int
    baseline_samples: int
    muted: bool = False
    groups: tuple[str, ...] = ("default",)
    canary_median: float | None = None
    baseline_median: float | None = None
    lower: float | None = None  # the shift's confidence interval, canary minus baseline
    upper: float | None = None
    estimate: float | None = None
    deviation: float | None = None  # canary mean over baseline mean (NaN when either is 0)
    effect_size: float | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["groups"] = list(self.groups)
        for name in ("lower", "upper", "estimate", "deviation", "effect_size"):
            value = out[name]
            if value is not None and not math.isfinite(value):
                out[name] = None  # JSON has no NaN
        return out

    def scored(self) -> kayenta.Scored:
        label = KAYENTA[self.classification]
        if label == "Error":  # fleet: an erring metric is no evidence, never a pass
            label = "Nodata"
        return kayenta.Scored(self.name, label, self.groups, self.critical, self.muted, self.reason)


KAYENTA: dict[str, kayenta.Label] = {fleet: label for label, fleet in LABELS.items()}


@dataclass(frozen=True)
class Verdict:
    classification: str  # pass, marginal, fail, nodata
    score: float | None
    metrics: tuple[MetricResult, ...]
    reason: str | None = None
    groups: dict[str, float | None] = field(default_factory=dict)


def _finite_or_nan(values: Sequence[float]) -> list[float]:
    return [float(v) if math.isfinite(v) else math.nan for v in values]


def judge_metric(
    spec: MetricSpec,
    canary: Sequence[float],
    baseline: Sequence[float],
    config: JudgeConfig,
    rng: random.Random | None = None,
) -> MetricResult:
    try:
        return _judge_metric(spec, canary, baseline, config, rng)
    except Exception as exc:  # Kayenta: "Metric Classification Failed"
        return MetricResult(
            spec.name,
            "error",
            failed=False,
            critical=spec.critical,
            canary_samples=len(canary),
            baseline_samples=len(baseline),
            muted=spec.muted,
            groups=spec.groups,
            reason=f"Metric Classification Failed: {type(exc).__name__}: {exc}",
        )


def _judge_metric(
    spec: MetricSpec,
    canary: Sequence[float],
    baseline: Sequence[float],
    config: JudgeConfig,
    rng: random.Random | None,
) -> MetricResult:
    outliers = spec.outliers == "remove"
    c = kayenta.transform(_finite_or_nan(canary), spec.nan_strategy, outliers, spec.outlier_factor)
    b = kayenta.transform(
        _finite_or_nan(baseline), spec.nan_strategy, outliers, spec.outlier_factor
    )
    base = MetricResult(
        spec.name,
        "pass",
        failed=False,
        critical=spec.critical,
        canary_samples=len(c),
        baseline_samples=len(b),
        muted=spec.muted,
        groups=spec.groups,
        canary_median=float(np.median(c)) if c else None,
        baseline_median=float(np.median(b)) if b else None,
    )
    if c and b and (len(c) < config.min_samples or len(b) < config.min_samples):
        label = "nodata_fail" if spec.must_have_data and not spec.critical else "nodata"
        return _with(
            base,
            label,
            f"{len(c)} canary and {len(b)} baseline samples; "
            f"at least {config.min_samples} each are needed",
        )
    if spec.threshold is not None and base.canary_median is not None:
        upward = spec.direction != "decrease"
        median = base.canary_median
        if median > spec.threshold if upward else median < spec.threshold:
            return _with(
                base,
                "high" if upward else "low",
                f"canary median {median:g} beyond the threshold {spec.threshold:g}",
            )
    allowed, critical = spec.effect_size.thresholds()
    classifier = kayenta.Classifier(
        tolerance=config.tolerance,
        confidence=config.confidence,
        allowed=allowed,
        critical=critical,
        measure=spec.effect_size.measure,
    )
    decided = kayenta.classify(
        kayenta.Sample(spec.name, b, "control"),
        kayenta.Sample(spec.name, c, "experiment"),
        classifier,
        direction=spec.direction,
        nan_strategy=spec.nan_strategy,
        critical=spec.critical,
        must_have_data=spec.must_have_data,
        rng=rng,
    )
    label = LABELS[decided.label]
    shift = decided.shift
    return MetricResult(
        **{
            **asdict(base),
            "groups": spec.groups,
            "classification": label,
            "failed": label in FAILED,
            "critical": spec.critical,
            "lower": shift.lower if shift else None,
            "upper": shift.upper if shift else None,
            "estimate": shift.estimate if shift else None,
            "deviation": decided.deviation,
            "effect_size": decided.effect_size,
            "reason": decided.reason,
        }
    )


def _with(base: MetricResult, label: str, reason: str) -> MetricResult:
    values = asdict(base)
    values.update(groups=base.groups, classification=label, failed=label in FAILED, reason=reason)
    return MetricResult(**values)


def score(results: Sequence[MetricResult], config: JudgeConfig) -> Verdict:
    """Kayenta's scorer and summary classification, but ``nodata`` where Kayenta fails the
    canary for lack of data (and when there is nothing to judge)."""
    unmuted = [r for r in results if not r.muted]
    if not unmuted:
        return Verdict("nodata", None, tuple(results), "no metric to judge (all muted)")
    scored = kayenta.score([r.scored() for r in results], config.group_weights)
    groups = {g.name: (None if g.no_data else g.score) for g in scored.groups}
    if scored.reason == kayenta.TOO_MUCH_NODATA:
        return Verdict("nodata", scored.value, tuple(results), scored.reason, groups)
    classification = kayenta.summary_classification(
        scored.value, config.pass_threshold, config.marginal_threshold
    ).lower()
    return Verdict(classification, scored.value, tuple(results), scored.reason, groups)
