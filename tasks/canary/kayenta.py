"""Kayenta's canary judge (``NetflixACAJudge``), ported to Python for the fleet.

Read from spinnaker/kayenta at commit a69573be (``kayenta-mannwhitney`` and
``kayenta-judge``) and checked against that repository's own test suites
(``tests/data/kayenta_vectors.json``, run by ``tests/unit/test_kayenta_vectors.py``). What
is here, in Kayenta's order:

- :func:`mann_whitney`: the location shift of experiment minus control and its confidence
  interval, as R's ``wilcox.test(conf.int=TRUE, exact=FALSE, correct=TRUE)`` computes them
  (normal approximation with tie and continuity corrections), roots found with R's
  ``zeroin`` (:func:`_zeroin`) at Kayenta's absolute tolerance of 1e-4. The z statistic is
  a step function of the shift, so the interval is only as fine as that tolerance, and with
  many ties its ends can even come out crossed: Kayenta keeps them as found, and so do we.
- :func:`classify`: ``MannWhitneyClassifier``: no data, identical data, a single value,
  then ``High`` when the interval's lower end is above ``tolerance * |estimate|`` and the
  effect size reaches the allowed increase (``Low`` symmetrically), in the directions asked
  for; a critical metric's ``High``/``Low`` past the critical thresholds is critical.
- :func:`mean_ratio`, :func:`cles`: the effect sizes (commons-math's two-pass mean).
- :func:`percentile` (R-7) and :func:`outlier_fences` (``IQRDetector`` with reduced
  sensitivity, as the judge builds it) for the optional outlier removal.
- :func:`score`: ``WeightedSumScorer`` and ``ScoringHelper``: muted metrics left out;
  per group, passes over pass + high + low + nodata-fail (``Nodata`` and ``Error`` left
  out); a critical metric that is not ``Pass`` scores 0; half or more ``Nodata`` scores 0;
  otherwise the weighted sum of group scores (unweighted groups share what the configured
  weights leave, a group with no scored metric counts 100), rounded half up to 2 places.

Labels keep Kayenta's spelling. Nothing here knows about the fleet: see
:mod:`tasks.canary.judge` for how a deployment's metrics are judged with it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

Label = Literal["Pass", "High", "Low", "Nodata", "NodataFailMetric", "Error"]
Direction = Literal["increase", "decrease", "either"]
NanStrategy = Literal["remove", "replace"]
Measure = Literal["meanRatio", "cles"]

TOLERANCE = 1e-4  # zeroin's absolute tolerance in Kayenta's MannWhitney
_EPS = 2.220446049250313e-16
_MAX_ITERATIONS = 1000
TOO_MUCH_NODATA = "Canary Failed: 50% or more metrics returned NODATA"


# Mann-Whitney ---------------------------------------------------------------------------


class AllTied(ValueError):
    """Every observation is the same value: no interval can be computed."""


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks from 1, NaN ranked as +inf (commons-math's MAXIMAL strategy)."""
    ranked: np.ndarray = rankdata(np.where(np.isnan(values), np.inf, values), method="average")
    return ranked


def wilcoxon_diff(shift: float, quantile: float, x: np.ndarray, y: np.ndarray) -> float:
    """The continuity-corrected normal statistic of ``x - shift`` against ``y``, minus
    ``quantile``: the function whose roots are the interval's ends and the estimate."""
    nx, ny = float(x.size), float(y.size)
    ranks = _ranks(np.concatenate((x - shift, y)))
    dz = float(ranks[: x.size].sum()) - nx * (nx + 1) / 2 - nx * ny / 2
    correction = (0.0 if dz == 0 else math.copysign(1.0, dz)) * 0.5
    _, ties = np.unique(ranks, return_counts=True)
    tied = float(np.sum(ties.astype(float) ** 3 - ties))
    n = nx + ny
    sigma = math.sqrt((nx * ny / 12) * ((n + 1) - tied / (n * (n - 1))))
    if sigma == 0:
        raise AllTied("cannot compute confidence interval when all observations are tied")
    return (dz - correction) / sigma - quantile


def _is_zero(value: float) -> bool:
    """commons-math ``Precision.equals(value, 0.0)``: within one ulp of zero."""
    return abs(value) <= 5e-324


def _zeroin(  # noqa: C901 - R's zeroin, step for step
    ax: float, bx: float, fa: float, fb: float, f: Callable[[float], float]
) -> float:
    """R's ``zeroin`` (Brent's method) as Kayenta runs it: absolute tolerance
    :data:`TOLERANCE`, at most 1,001 steps, the last approximation when they run out."""
    a, b, c, fc = ax, bx, ax, fa
    if _is_zero(fa):
        return a
    if _is_zero(fb):
        return b
    for _ in range(_MAX_ITERATIONS + 1):
        previous_step = b - a
        if abs(fc) < abs(fb):  # b: the best approximation so far
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        tolerance = 2 * _EPS * abs(b) + TOLERANCE / 2
        step = (c - b) / 2
        if abs(step) <= tolerance or _is_zero(fb):
            return b
        if abs(previous_step) >= tolerance and abs(fa) > abs(fb):
            cb = c - b
            if a == c:  # two points: secant
                t1 = fb / fa
                p = cb * t1
                q = 1.0 - t1
            else:  # three points: inverse quadratic interpolation
                q = fa / fc
                t1 = fb / fc
                t2 = fb / fa
                p = t2 * (cb * q * (q - t1) - (b - a) * (t1 - 1.0))
                q = (q - 1.0) * (t1 - 1.0) * (t2 - 1.0)
            if p > 0:
                q = -q
            else:
                p = -p
            if p < (0.75 * cb * q - abs(tolerance * q) / 2) and p < abs(previous_step * q / 2):
                step = p / q
        if abs(step) < tolerance:
            step = tolerance if step > 0 else -tolerance
        a, fa = b, fb
        b = b + step
        fb = f(b)
        if (fb > 0 and fc > 0) or (fb < 0 and fc < 0):
            c, fc = a, fa
    return b


@dataclass(frozen=True)
class Shift:
    lower: float
    upper: float
    estimate: float


def mann_whitney(
    experiment: Sequence[float] | np.ndarray,
    control: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
) -> Shift:
    """The shift of ``experiment`` over ``control`` with its ``confidence`` interval."""
    x, y = np.asarray(experiment, dtype=float), np.asarray(control, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples need at least one value")
    quantile = float(ndtri((1.0 - confidence) / 2))  # negative
    lowest = float(x.min() - y.max())
    highest = float(x.max() - y.min())

    def root(q: float) -> float:
        def f(shift: float) -> float:
            return wilcoxon_diff(shift, q, x, y)

        f_low, f_high = f(lowest), f(highest)
        if f_low <= 0:
            return lowest
        if f_high >= 0:
            return highest
        return _zeroin(lowest, highest, f_low, f_high, f)

    lower, upper = root(-quantile), root(quantile)

    def centre(shift: float) -> float:
        return wilcoxon_diff(shift, 0.0, x, y)

    # No shortcut at the ends here, as in Kayenta.
    estimate = _zeroin(lowest, highest, centre(lowest), centre(highest), centre)
    return Shift(lower, upper, estimate)


# Effect sizes and statistics -------------------------------------------------------------


def mean(values: Sequence[float] | np.ndarray) -> float:
    """commons-math's two-pass corrected mean; NaN when empty."""
    data = [float(v) for v in values]
    if not data:
        return math.nan
    total = 0.0
    for v in data:
        total += v
    first = total / len(data)
    correction = 0.0
    for v in data:
        correction += v - first
    return first + correction / len(data)


def mean_ratio(
    control: Sequence[float] | np.ndarray, experiment: Sequence[float] | np.ndarray
) -> float:
    """Experiment mean over control mean; NaN when either mean is 0 (or a side is empty)."""
    control_mean, experiment_mean = mean(control), mean(experiment)
    if control_mean == 0.0 or experiment_mean == 0.0:
        return math.nan
    return experiment_mean / control_mean


def cles(control: Sequence[float] | np.ndarray, experiment: Sequence[float] | np.ndarray) -> float:
    """Common-language effect size: P(experiment > control) + P(tie) / 2."""
    m, n = len(experiment), len(control)
    if m == 0 or n == 0:
        return math.nan
    ranks = _ranks(np.concatenate((np.asarray(experiment, float), np.asarray(control, float))))
    first = 0.0
    for r in ranks[:m]:
        first += float(r)
    return (2 * first - m * (m + 1)) / (2 * n * m)


def percentile(values: Sequence[float] | np.ndarray, p: float) -> float:
    """commons-math ``Percentile`` with R's type 7 estimate, NaN values removed."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is outside (0, 100]")
    data = [float(v) for v in values]
    if not data:
        return math.nan
    if len(data) == 1:
        return data[0]
    work = sorted(v for v in data if not math.isnan(v))
    if not work:
        return math.nan
    n, q = len(work), p / 100.0
    position = n if q == 1.0 else 1 + (n - 1) * q
    if position < 1:
        return work[0]
    if position >= n:
        return work[n - 1]
    k = math.floor(position)
    fraction = position - k
    lower, upper = work[k - 1], work[k]
    return lower + fraction * (upper - lower)


def outlier_fences(
    values: Sequence[float] | np.ndarray, factor: float, reduce_sensitivity: bool = True
) -> tuple[float, float]:
    """``IQRDetector``: Tukey's fences at ``factor`` interquartile ranges, widened (with
    reduced sensitivity, as the judge uses it) to the 1st and 99th percentiles."""
    if factor <= 0:
        raise ValueError("the outlier factor must be above 0")
    p25, p75 = percentile(values, 25), percentile(values, 75)
    spread = p75 - p25
    lower, upper = p25 - factor * spread, p75 + factor * spread
    if reduce_sensitivity:
        lower = _nan_min(percentile(values, 1), lower)
        upper = _nan_max(percentile(values, 99), upper)
    return lower, upper


def _nan_min(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


def _nan_max(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def remove_outliers(values: Sequence[float] | np.ndarray, factor: float) -> list[float]:
    """The values inside the judge's fences, in order (nothing flagged when they are NaN)."""
    data = [float(v) for v in values]
    lower, upper = outlier_fences(data, factor)
    return [v for v in data if not (v > upper or v < lower)]


def transform(
    values: Sequence[float], nan_strategy: NanStrategy, outliers: bool, factor: float
) -> list[float]:
    """NaN handling (remove, or replace by 0), then outlier removal when asked for."""
    if nan_strategy == "replace":
        data = [0.0 if math.isnan(v) else float(v) for v in values]
    else:
        data = [float(v) for v in values if not math.isnan(v)]
    return remove_outliers(data, factor) if outliers else data


# The classifier ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """Effect-size limits: a shift counts as High only at or above ``increase``, as Low
    only at or below ``decrease`` (Kayenta's defaults: 1.0 for meanRatio, 0.5 for cles)."""

    decrease: float
    increase: float

    @classmethod
    def default(cls, measure: Measure) -> Thresholds:
        value = 0.5 if measure == "cles" else 1.0
        return cls(value, value)


@dataclass(frozen=True)
class Classifier:
    """``MannWhitneyClassifier`` with the judge's settings (confidence 0.98, tolerance
    0.25); the class's own defaults are confidence 0.95."""

    tolerance: float = 0.25
    confidence: float = 0.98
    allowed: Thresholds = Thresholds(1.0, 1.0)
    critical: Thresholds = Thresholds(1.0, 1.0)
    measure: Measure = "meanRatio"


@dataclass(frozen=True)
class Classification:
    label: Label
    reason: str | None
    deviation: float  # the mean ratio, experiment over control
    critical: bool
    shift: Shift | None = None
    effect_size: float | None = None


@dataclass(frozen=True)
class Sample:
    """One side of a comparison: its values, the metric's name and the side's label."""

    name: str
    values: Sequence[float]
    label: str


def classify(
    control: Sample,
    experiment: Sample,
    classifier: Classifier,
    *,
    direction: Direction = "either",
    nan_strategy: NanStrategy = "remove",
    critical: bool = False,
    must_have_data: bool = False,
    rng: random.Random | None = None,
) -> Classification:
    """Kayenta's decision for one metric. ``rng``: the noise added when each side is a
    single (different) value, so the interval can be computed (Kayenta's is unseeded)."""
    if not experiment.values or not control.values:
        if nan_strategy == "replace":
            return Classification("Pass", None, 1.0, False)
        reason: str | None = f"Missing data for {experiment.name}"
        if must_have_data and not critical:
            return Classification("NodataFailMetric", reason, 1.0, False)
        return Classification("Nodata", reason, 1.0, critical)
    if sorted(experiment.values) == sorted(control.values):
        reason = f"The {experiment.label} and {control.label} data are identical"
        return Classification("Pass", reason, 1.0, False)
    if len(_distinct([*experiment.values, *control.values])) == 1:
        return Classification("Pass", None, 1.0, False)

    exp_values = np.asarray(experiment.values, dtype=float)
    ctl_values = np.asarray(control.values, dtype=float)
    if len(_distinct(experiment.values)) == 1 and len(_distinct(control.values)) == 1:
        noise = rng or random.Random()
        exp_values = _with_noise(exp_values, noise)
        ctl_values = _with_noise(ctl_values, noise)
    shift = mann_whitney(exp_values, ctl_values, classifier.confidence)
    deviation = mean_ratio(ctl_values, exp_values)
    effect = (
        cles(ctl_values, exp_values)
        if classifier.measure == "cles"
        else mean_ratio(ctl_values, exp_values)
    )
    bound = classifier.tolerance * abs(shift.estimate)
    is_high = (
        direction in ("increase", "either")
        and shift.lower > bound
        and (math.isnan(effect) or effect >= classifier.allowed.increase)
    )
    is_low = (
        direction in ("decrease", "either")
        and shift.upper < -bound
        and (math.isnan(effect) or effect <= classifier.allowed.decrease)
    )
    label: Label = "High" if is_high else "Low" if is_low else "Pass"
    reason = None if label == "Pass" else f"{experiment.name} was classified as {label}"
    if (
        critical
        and label == "High"
        and (math.isnan(effect) or effect >= classifier.critical.increase)
    ):
        reason = f"The metric {experiment.name} was classified as High (Critical)"
        return Classification("High", reason, deviation, True, shift, effect)
    if (
        critical
        and label == "Low"
        and (math.isnan(effect) or effect <= classifier.critical.decrease)
    ):
        reason = f"The metric {experiment.name} was classified as Low (Critical)"
        return Classification("Low", reason, deviation, True, shift, effect)
    return Classification(label, reason, deviation, False, shift, effect)


def _distinct(values: Sequence[float]) -> set[float] | list[float]:
    """Distinct values as Scala's ``distinct`` finds them: 0.0 and -0.0 one, each NaN its
    own."""
    kept = {v for v in values if not math.isnan(v)}
    nans = [v for v in values if math.isnan(v)]
    return [*kept, *nans] if nans else kept


def _with_noise(values: np.ndarray, rng: random.Random) -> np.ndarray:
    """Gaussian noise at 1e-5 of the (single) value, as Kayenta adds to a constant side."""
    scale = float(values[0]) * 1e-5
    return np.array([v + rng.gauss(0.0, 1.0) * scale for v in values])


# Scoring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """What the scorer takes from each metric's result."""

    name: str
    label: Label
    groups: Sequence[str] = ()
    critical: bool = False
    muted: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class GroupScore:
    name: str
    score: float
    no_data: bool


@dataclass(frozen=True)
class Score:
    value: float
    groups: list[GroupScore] = field(default_factory=list)
    reason: str | None = None


def score(results: Sequence[Scored], weights: Mapping[str, float] | None = None) -> Score:
    """``WeightedSumScorer`` over the results that are not muted."""
    weights = dict(weights or {})
    scored = [r for r in results if not r.muted]
    groups = _group_scores(scored)
    critical = next((r for r in scored if r.critical and r.label != "Pass"), None)
    if critical is not None:
        return Score(0.0, groups, f"Canary Failed: {critical.reason}")
    if scored and sum(r.label == "Nodata" for r in scored) / len(scored) * 100 >= 50:
        return Score(0.0, groups, TOO_MUCH_NODATA)
    configured = sum(weights.values())
    unweighted = {g.name for g in groups} - set(weights)
    fallback = (100 - configured) / len(unweighted) if unweighted else 0.0
    total = 0.0
    for group in groups:
        effective = 100.0 if group.no_data else group.score
        total += effective * (weights.get(group.name, fallback) / 100)
    return Score(_round2(total), groups)


def _group_scores(results: Sequence[Scored]) -> list[GroupScore]:
    counts: dict[str, list[int]] = {}  # group -> [pass, high, low, nodata-fail]
    order = {"Pass": 0, "High": 1, "Low": 2, "NodataFailMetric": 3}
    for result in results:
        for group in result.groups:
            tally = counts.setdefault(group, [0, 0, 0, 0])
            if result.label in order:
                tally[order[result.label]] += 1
    out = []
    for name, (passed, high, low, failed) in counts.items():
        total = passed + high + low + failed
        out.append(
            GroupScore(name, 0.0 if total == 0 else passed / total * 100, no_data=total == 0)
        )
    return out


def _round2(value: float) -> float:
    """commons-math ``Precision.round(value, 2)``: half up, from the shortest decimal."""
    if math.isnan(value) or math.isinf(value):
        return value
    return float(Decimal(repr(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def summary_classification(value: float, pass_at: float, marginal_at: float) -> str:
    """``ThresholdScoreClassifier``: Pass, Marginal or Fail."""
    if value >= pass_at:
        return "Pass"
    if value >= marginal_at:
        return "Marginal"
    return "Fail"
