"""What a deployment does after each analysis: the state machine, pure, with the clock given.

``pending`` becomes ``analyzing`` at the first analysis. Promotion after ``passes_required``
passing analyses; rollback at ``failure_limit`` failing ones, at ``inconclusive_limit``
inconclusive ones (``nodata``, ``marginal`` or ``error``: missing data never counts as
healthy), when Prometheus has been unreachable for longer than the deadline, or once the
deployment is older than its ``max_duration``. ``promoted``, ``rolled_back``, ``aborted``
and ``conflict`` (set when writing the decision found another hand's change) are final.
Counts are cumulative over the deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

FINAL = ("promoted", "rolled_back", "aborted", "conflict")
ACTIVE = ("pending", "analyzing")


@dataclass(frozen=True)
class Progress:
    state: str = "pending"
    passes: int = 0
    failures: int = 0
    inconclusives: int = 0
    prometheus_down_since: datetime | None = None


@dataclass(frozen=True)
class Limits:
    passes_required: int
    failure_limit: int
    inconclusive_limit: int
    prometheus_deadline: timedelta


@dataclass(frozen=True)
class Step:
    progress: Progress
    decision: str | None  # promote, rollback or None
    reason: str | None = None


def after_analysis(progress: Progress, verdict: str, limits: Limits) -> Step:
    if progress.state in FINAL:
        return Step(progress, None, f"already {progress.state}")
    progress = replace(progress, state="analyzing", prometheus_down_since=None)
    if verdict == "pass":
        progress = replace(progress, passes=progress.passes + 1)
        if progress.passes >= limits.passes_required:
            return Step(
                replace(progress, state="promoted"),
                "promote",
                f"{progress.passes} passing analyses",
            )
    elif verdict == "fail":
        progress = replace(progress, failures=progress.failures + 1)
        if progress.failures >= limits.failure_limit:
            return Step(
                replace(progress, state="rolled_back"),
                "rollback",
                f"{progress.failures} failing analyses (limit {limits.failure_limit})",
            )
    else:  # nodata, marginal or error
        progress = replace(progress, inconclusives=progress.inconclusives + 1)
        if progress.inconclusives >= limits.inconclusive_limit:
            return Step(
                replace(progress, state="rolled_back"),
                "rollback",
                f"{progress.inconclusives} inconclusive analyses "
                f"(limit {limits.inconclusive_limit}); missing data is not health",
            )
    return Step(progress, None)


def after_unreachable(progress: Progress, now: datetime, limits: Limits) -> Step:
    """Prometheus could not be asked. Not a verdict; past the deadline, a rollback."""
    if progress.state in FINAL:
        return Step(progress, None, f"already {progress.state}")
    since = progress.prometheus_down_since or now
    progress = replace(progress, state="analyzing", prometheus_down_since=since)
    if now - since > limits.prometheus_deadline:
        return Step(
            replace(progress, state="rolled_back"),
            "rollback",
            f"Prometheus unreachable since {since.isoformat()} "
            f"(deadline {int(limits.prometheus_deadline.total_seconds())}s)",
        )
    return Step(progress, None, "Prometheus unreachable; waiting for the deadline")


def expired(progress: Progress, max_duration_seconds: int) -> Step:
    """Older than its ``max_duration`` without a decision: rolled back."""
    if progress.state in FINAL:
        return Step(progress, None, f"already {progress.state}")
    return Step(
        replace(progress, state="rolled_back"),
        "rollback",
        f"no decision within max_duration ({max_duration_seconds}s)",
    )


def abort(progress: Progress) -> Step:
    if progress.state in FINAL:
        return Step(progress, None, f"already {progress.state}")
    return Step(replace(progress, state="aborted"), "rollback", "aborted by an operator")
