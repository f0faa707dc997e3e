"""The fleet's port of Kayenta's judge against Kayenta's own test cases.

``tests/data/kayenta_vectors.json`` holds the inputs, parameters and expected results of
spinnaker/kayenta's MannWhitneySuite, ClassifierSuite, StatisticSuite, TransformSuite,
DetectorSuite and ScorerSuite, transcribed as data (commit in the file). Every vector runs
here, except those for code the judge does not use, listed in :data:`NOT_PORTED` with the
reason; a test checks that no vector is silently left out.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.special import ndtri

from tasks.canary import kayenta
from tasks.canary.kayenta import Classifier, Sample, Scored, Thresholds

VECTORS_FILE = Path(__file__).parent.parent / "data" / "kayenta_vectors.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text())["vectors"]

# (op, detector or classifier) -> why the fleet has no port of it.
NOT_PORTED = {
    ("classify", "MeanInequalityClassifier"): "a classifier the judge does not use",
    ("removeOutliers", "KSigma"): "a detector the judge does not use (it uses IQR)",
    ("detectOutliers", "KSigma"): "a detector the judge does not use (it uses IQR)",
    ("cohenD", None): "an effect size the judge does not offer",
    ("summary", None): "summary statistics: metadata in Kayenta's result, not a decision",
    ("meanRatioFromSummaryStats", None): "the mean ratio from summary statistics (metadata)",
    ("addGaussianNoise", None): "java.util.Random's seeded sequence; only mean and spread are "
    "asserted upstream",
}


def _key(vector: dict[str, Any]) -> tuple[str, str | None]:
    params = vector["params"]
    return vector["op"], params.get("detector") or params.get("classifier")


def _ported(vector: dict[str, Any]) -> bool:
    op, kind = _key(vector)
    return (op, kind) not in NOT_PORTED and (op, None) not in NOT_PORTED


def _number(value: Any) -> float:
    return math.nan if value == "NaN" else float(value)


def _values(raw: list[Any]) -> list[float]:
    return [_number(v) for v in raw]


def _close(actual: float, expected: Any, tolerance: float) -> bool:
    wanted = _number(expected)
    if math.isnan(wanted):
        return math.isnan(actual)
    return abs(actual - wanted) <= tolerance


def _vectors(*ops: str) -> list[Any]:
    chosen = [v for v in VECTORS if v["op"] in ops and _ported(v)]
    return [pytest.param(v, id=f"{v['suite']}: {v['name']}") for v in chosen]


def test_every_vector_is_run_or_said_to_be_left_out() -> None:
    handled = {
        "wilcoxonDiff",
        "normalInverseCdf",
        "mannWhitneyUTest",
        "intermediates",
        "percentile",
        "meanRatio",
        "cles",
        "removeNaNs",
        "replaceNaNs",
        "removeOutliers",
        "detectOutliers",
        "classify",
        "weightedSumScore",
    }
    left = [v["name"] for v in VECTORS if _ported(v) and v["op"] not in handled]
    assert left == []
    assert len(VECTORS) == 87
    assert sum(map(_ported, VECTORS)) == 75


@pytest.mark.parametrize("vector", _vectors("wilcoxonDiff"))
def test_wilcoxon_diff(vector: dict[str, Any]) -> None:
    x = np.array(_values(vector["inputs"]["x"]))
    y = np.array(_values(vector["inputs"]["y"]))
    expected = vector["expected"]
    for case, wanted in zip(vector["params"]["cases"], expected["values"], strict=True):
        got = kayenta.wilcoxon_diff(case["mu"], case["quantile"], x, y)
        assert _close(got, wanted, expected["abs_tol"]), (case, got, wanted)


@pytest.mark.parametrize("vector", _vectors("normalInverseCdf"))
def test_normal_quantile(vector: dict[str, Any]) -> None:
    got = float(ndtri(0.02 / 2))  # the suite's own p, computed as it computes it
    assert _close(got, vector["expected"]["value"], vector["expected"]["abs_tol"])


@pytest.mark.parametrize("vector", _vectors("mannWhitneyUTest"))
def test_mann_whitney_interval_and_estimate(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    shift = kayenta.mann_whitney(
        _values(vector["inputs"]["x"]),
        _values(vector["inputs"]["y"]),
        vector["params"]["confidenceLevel"],
    )
    assert _close(shift.lower, expected["ciLower"], expected["ci_abs_tol"]), shift
    assert _close(shift.upper, expected["ciUpper"], expected["ci_abs_tol"]), shift
    assert _close(shift.estimate, expected["estimate"], expected["estimate_abs_tol"]), shift


@pytest.mark.parametrize("vector", _vectors("intermediates"))
def test_mann_whitney_intermediate_values(vector: dict[str, Any]) -> None:
    """The bracket, the quantiles, the function at the bracket's ends and the three roots
    found straight from the bracket (the suite calls the solver directly)."""
    x = np.array(_values(vector["inputs"]["x"]))
    y = np.array(_values(vector["inputs"]["y"]))
    expected, tolerance = vector["expected"], vector["expected"]["abs_tol"]
    low, high = float(x.min() - y.max()), float(x.max() - y.min())
    upper_q = float(ndtri((1.0 - vector["params"]["confidenceLevel"]) / 2))
    got: dict[str, float] = {"muMin": low, "muMax": high, "zqLower": -upper_q, "zqUpper": upper_q}
    for n, q in ((1, -upper_q), (2, upper_q)):
        got[f"fLower{n}"] = kayenta.wilcoxon_diff(low, q, x, y)
        got[f"fUpper{n}"] = kayenta.wilcoxon_diff(high, q, x, y)
    for name, q, n in (("ciLower", -upper_q, 1), ("ciUpper", upper_q, 2), ("estimate", 0.0, 0)):
        f_low = got[f"fLower{n}"] if n else kayenta.wilcoxon_diff(low, 0.0, x, y)
        f_high = got[f"fUpper{n}"] if n else kayenta.wilcoxon_diff(high, 0.0, x, y)
        got[name] = kayenta._zeroin(
            low, high, f_low, f_high, lambda d, q=q: kayenta.wilcoxon_diff(d, q, x, y)
        )
    for name, wanted in expected.items():
        if name != "abs_tol":
            assert _close(got[name], wanted, tolerance), (name, got[name], wanted)


@pytest.mark.parametrize("vector", _vectors("percentile"))
def test_percentile(vector: dict[str, Any]) -> None:
    values = _values(vector["inputs"]["values"])
    expected = vector["expected"]
    for p, wanted, tolerance in zip(
        vector["params"]["p"], expected["values"], expected["abs_tol"], strict=True
    ):
        assert _close(kayenta.percentile(values, p), wanted, tolerance), p


@pytest.mark.parametrize("vector", _vectors("meanRatio", "cles"))
def test_effect_sizes(vector: dict[str, Any]) -> None:
    function = kayenta.mean_ratio if vector["op"] == "meanRatio" else kayenta.cles
    got = function(_values(vector["inputs"]["control"]), _values(vector["inputs"]["experiment"]))
    assert _close(got, vector["expected"]["value"], vector["expected"]["abs_tol"]), got


@pytest.mark.parametrize("vector", _vectors("removeNaNs", "replaceNaNs"))
def test_nan_strategies(vector: dict[str, Any]) -> None:
    strategy = "remove" if vector["op"] == "removeNaNs" else "replace"
    got = kayenta.transform(_values(vector["inputs"]["values"]), strategy, False, 3.0)
    assert got == _values(vector["expected"]["values"])


@pytest.mark.parametrize("vector", _vectors("removeOutliers", "detectOutliers"))
def test_iqr_outliers(vector: dict[str, Any]) -> None:
    values = _values(vector["inputs"]["values"])
    params = vector["params"]
    lower, upper = kayenta.outlier_fences(values, params["factor"], params["reduceSensitivity"])
    flags = [v > upper or v < lower for v in values]
    if vector["op"] == "detectOutliers":
        assert flags == vector["expected"]["flags"]
    else:
        kept = [v for v, out in zip(values, flags, strict=True) if not out]
        assert kept == _values(vector["expected"]["values"])


def test_the_judges_outlier_removal_uses_reduced_sensitivity() -> None:
    """As the judge builds its detector: fences no narrower than the 1st/99th percentiles."""
    values = [*map(float, range(1, 11)), 24.0, 25.0]
    assert kayenta.outlier_fences(values, 1.0, reduce_sensitivity=False) == (-1.75, 14.75)
    lower, upper = kayenta.outlier_fences(values, 1.0)
    assert lower == -1.75 and upper == pytest.approx(24.89)
    assert kayenta.remove_outliers(values, 1.0) == values[:-1]  # 24 kept, 25 out


@pytest.mark.parametrize("vector", _vectors("classify"))
def test_classifier(vector: dict[str, Any]) -> None:
    params, expected = vector["params"], vector["expected"]
    classifier = Classifier(
        tolerance=params["tolerance"],
        confidence=params["confLevel"],
        allowed=Thresholds(*params["effectSizeThresholds"]),
        critical=Thresholds(*params["criticalThresholds"]),
        measure=params["effectSizeMeasure"],
    )
    control = Sample(
        params["controlName"], _values(vector["inputs"]["control"]), params["controlLabel"]
    )
    experiment = Sample(
        params["experimentName"],
        _values(vector["inputs"]["experiment"]),
        params["experimentLabel"],
    )
    # Kayenta's noise for two constant sides is unseeded; any seed must give its label.
    for seed in range(1 if vector.get("reproducible", True) else 5):
        got = kayenta.classify(
            control,
            experiment,
            classifier,
            direction=params["direction"],
            nan_strategy=params["nanStrategy"],
            critical=params["isCriticalMetric"],
            must_have_data=params["isDataRequired"],
            rng=random.Random(seed),
        )
        if "classification" in expected:
            assert got.label == expected["classification"], got
        if "critical" in expected:
            assert got.critical is expected["critical"], got
        if "deviation" in expected:
            assert _close(got.deviation, expected["deviation"], 0.0), got
        if expected.get("reason_nonempty"):
            assert got.reason, got


@pytest.mark.parametrize("vector", _vectors("weightedSumScore"))
def test_scorer(vector: dict[str, Any]) -> None:
    results = [
        Scored(r["name"], r["classification"], r["groups"], r["critical"])
        for r in vector["inputs"]["results"]
    ]
    got = kayenta.score(results, vector["params"]["groupWeights"])
    expected = vector["expected"]
    assert got.value == expected["summaryScore"]
    if "numGroupScores" in expected:
        assert len(got.groups) == expected["numGroupScores"]
    if "groupScores" in expected:
        assert {g.name: g.score for g in got.groups} == expected["groupScores"]
    if "sortedGroupScores" in expected:
        assert sorted(g.score for g in got.groups) == expected["sortedGroupScores"]


@pytest.mark.parametrize(
    ("score", "label"),
    [(95.0, "Pass"), (94.99, "Marginal"), (75.0, "Marginal"), (74.99, "Fail"), (0.0, "Fail")],
)
def test_summary_classification(score: float, label: str) -> None:
    assert kayenta.summary_classification(score, 95.0, 75.0) == label


def test_muted_metrics_are_left_out_and_a_critical_failure_names_its_reason() -> None:
    results = [
        Scored("a", "Pass", ["g"]),
        Scored("b", "High", ["g"], muted=True),
        Scored("c", "Nodata", ["g"], critical=True, reason="Missing data for c"),
    ]
    got = kayenta.score(results[:2])
    assert got.value == 100.0
    failed = kayenta.score(results)
    assert (failed.value, failed.reason) == (0.0, "Canary Failed: Missing data for c")
