"""``canary.analyze``: judge configuration canaries against their baseline, then promote or
roll back on their own.

Every minute, each active deployment whose interval has passed (one analysis per deployment
at a time: a Redis lock) is analyzed: canary and baseline series from Prometheus over the
window, each metric judged (:mod:`tasks.canary.judge`), the verdict fed to the state machine
(:mod:`tasks.canary.machine`). ``canary start`` gives the candidate to the canary subset
(:mod:`tasks.canary.apply`); a promotion makes it the scope's active configuration and
takes the subset's overrides away, a rollback takes them away, each only when nobody else
changed those rows meanwhile (``conflict`` otherwise), every write as the platform's
configuration manager makes it (history, audit, cache invalidation, change event). An error
in analyzing one deployment is an ``error`` analysis, counted as inconclusive; past its
``max_duration`` a deployment is rolled back.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tasks.canary import apply
from tasks.canary.judge import JudgeConfig, MetricSpec, Verdict, judge_metric, score
from tasks.canary.machine import (
    ACTIVE,
    Limits,
    Progress,
    Step,
    after_analysis,
    after_unreachable,
    expired,
)
from tasks.canary.prometheus import (
    MetricsSource,
    PrometheusSource,
    PrometheusUnavailable,
    QueryError,
)
from tasks.canary.spec import CanarySpec
from workers import audit
from workers.configstore import active_value, version_of
from workers.db.models import CanaryAnalysis, CanaryDeployment
from workers.jobs import RetryPolicy, job, skipped
from workers.locks import job_locks
from workers.logs import get_logger
from workers.runtime import Runtime, runtime

log = get_logger("fleet.canary")
ACTOR = apply.ACTOR
STATES = ("pending", "analyzing", "promoted", "rolled_back", "aborted", "conflict")


class CanaryRefused(ValueError):
    """A deployment that cannot start: said in one line."""


def create_deployment(
    session: Session,
    spec: CanarySpec,
    now: datetime,
    created_by: str,
    notify: redis.Redis | None = None,
) -> CanaryDeployment:
    """Record a deployment and the version it replaces, and give the candidate to the
    canary subset (announced on ``notify`` once the caller commits)."""
    change = spec.change
    if session.scalar(select(CanaryDeployment.id).where(CanaryDeployment.name == spec.name)):
        raise CanaryRefused(f"a canary named {spec.name!r} exists already")
    busy = session.scalars(
        select(CanaryDeployment.name).where(
            CanaryDeployment.key == change.key,
            CanaryDeployment.environment == change.environment,
            CanaryDeployment.state.in_(ACTIVE),
        )
    ).first()
    if busy is not None:
        raise CanaryRefused(
            f"canary {busy} is still judging {change.environment} {change.key}: "
            "one canary per key and environment at a time"
        )
    current = active_value(session, change.key, change.environment, change.scope, change.tenant)
    version = version_of(current)
    deployment = CanaryDeployment(
        name=spec.name,
        key=change.key,
        environment=change.environment,
        scope=change.scope,
        tenant_id=change.tenant,
        new_value=json.dumps(change.value),
        previous_value=current.value if current is not None else None,
        replaces_version=version,
        canary_selector=spec.canary,
        baseline_selector=spec.baseline,
        metrics=[m.model_dump() for m in spec.metrics],
        judge=spec.judge.model_dump(),
        interval_seconds=spec.analysis.interval,
        window_seconds=spec.analysis.window,
        step_seconds=spec.analysis.step,
        passes_required=spec.analysis.passes,
        failure_limit=spec.analysis.failure_limit,
        inconclusive_limit=spec.analysis.inconclusive_limit,
        min_samples=spec.analysis.min_samples,
        prometheus_deadline_seconds=spec.analysis.prometheus_deadline,
        max_duration_seconds=spec.analysis.max_duration,
        subset=spec.subset.model_dump(exclude_none=True) if spec.subset else None,
        state="pending",
        passes=0,
        failures=0,
        inconclusives=0,
        created_by=created_by,
        created_at=now,
    )
    session.add(deployment)
    session.flush()
    deployment.overrides = apply.write_overrides(session, deployment, change.value, now, notify)
    audit.record(
        session,
        "canary_started",
        spec.name,
        now,
        key=change.key,
        environment=change.environment,
        replaces_version=version,
        subset=deployment.subset,
    )
    return deployment


def _progress(row: CanaryDeployment) -> Progress:
    return Progress(
        row.state, row.passes, row.failures, row.inconclusives, row.prometheus_down_since
    )


def _limits(row: CanaryDeployment) -> Limits:
    return Limits(
        row.passes_required,
        row.failure_limit,
        row.inconclusive_limit,
        timedelta(seconds=row.prometheus_deadline_seconds),
    )


def judge_sides(
    metrics: list[dict[str, Any]],
    judge: dict[str, Any],
    min_samples: int,
    selectors: tuple[str, str],
    window: tuple[datetime, datetime, float],
    source: MetricsSource,
) -> Verdict:
    """Each metric's query with ``$selector`` made the first side's matchers (the one
    judged), then the second's (the one it is judged against), over ``window`` (start,
    end, step); the scored verdict. Canaries and flag rollouts judge this way."""
    config = JudgeConfig(
        min_samples=min_samples,
        **{k: v for k, v in judge.items() if k in JudgeConfig.__dataclass_fields__},
    )
    start, end, step = window
    results = []
    for raw in metrics:
        spec = MetricSpec.from_dict(raw)
        judged, against = (
            source.range_samples(spec.query.replace("$selector", side), start, end, step)
            for side in selectors
        )
        results.append(judge_metric(spec, judged, against, config))
    return score(results, config)


def judge_deployment(row: CanaryDeployment, source: MetricsSource, now: datetime) -> Verdict:
    start = now - timedelta(seconds=row.window_seconds)
    return judge_sides(
        row.metrics,
        row.judge,
        row.min_samples,
        (row.canary_selector, row.baseline_selector),
        (start, now, row.step_seconds),
        source,
    )


def apply_decision(
    session: Session,
    row: CanaryDeployment,
    step: Step,
    now: datetime,
    notify: redis.Redis | None = None,
) -> None:
    """Write the step's state; promote or roll back when decided, or stop in ``conflict``
    when someone else changed what the deployment would write over."""
    progress = step.progress
    row.state, row.passes, row.failures = progress.state, progress.passes, progress.failures
    row.inconclusives = progress.inconclusives
    row.prometheus_down_since = progress.prometheus_down_since
    if step.decision is None:
        return
    reason = step.reason or ""
    row.decided_at, row.decision_reason = now, reason
    promoting = step.decision == "promote"
    found = apply.conflicts(session, row, promoting=promoting)
    if found:
        row.state, row.conflict = "conflict", found
        changed = "; ".join(
            f"{c['scope']}{'/' + c['tenant_id'] if c['tenant_id'] else ''} is "
            f"{c['found_version'] or 'deleted'} (by {c['changed_by'] or 'unknown'}), "
            f"not {c['expected_version'] or 'unset'}"
            for c in found
        )
        row.decision_reason = f"would {step.decision} ({reason}), but {changed}: nothing written"
        audit.record(
            session,
            "canary_conflict",
            row.name,
            now,
            reason=row.decision_reason,
            key=row.key,
            wanted=step.decision,
            found=found,
        )
        return
    if promoting:
        apply.promote(session, row, now, reason, notify)
        audit.record(session, "canary_promoted", row.name, now, reason=reason, key=row.key)
    else:
        apply.remove_overrides(session, row, now, "CANARY_ROLLBACK", reason, notify)
        audit.record(
            session,
            f"canary_{progress.state}",
            row.name,
            now,
            reason=reason,
            key=row.key,
            overrides_removed=len(row.overrides or []),
        )


def analyze_one(
    rt: Runtime, deployment_id: int, source: MetricsSource, now: datetime
) -> dict[str, Any]:
    # Resolved by reading back: if this commit's answer is lost, record_failure finds the
    # analysis (or the decision) committed and leaves it; a start, promotion or rollback is
    # never written twice.
    with rt.sessions.begin() as session:
        row = session.get(CanaryDeployment, deployment_id, with_for_update=True)
        if row is None or row.state not in ACTIVE:
            return {"skipped": True}
        verdict: Verdict | None = None
        reason = None
        if now - row.created_at > timedelta(seconds=row.max_duration_seconds):
            step = expired(_progress(row), row.max_duration_seconds)
            classification = "expired"
        else:
            try:
                verdict = judge_deployment(row, source, now)
                step = after_analysis(_progress(row), verdict.classification, _limits(row))
                classification, reason = verdict.classification, verdict.reason
            except PrometheusUnavailable as exc:
                step = after_unreachable(_progress(row), now, _limits(row))
                classification, reason = "error", str(exc)
            except QueryError as exc:
                step = after_analysis(_progress(row), "nodata", _limits(row))
                classification, reason = "nodata", str(exc)
            except Exception as exc:  # anything else: an error, never a stuck deployment
                step = after_analysis(_progress(row), "error", _limits(row))
                classification, reason = "error", _failure(exc)
            session.add(
                CanaryAnalysis(
                    deployment_id=row.id,
                    at=now,
                    verdict=classification,
                    score=verdict.score if verdict else None,
                    results=[m.as_dict() for m in verdict.metrics] if verdict else [],
                    reason=_joined(reason, step.reason),
                )
            )
        row.last_analysis_at = now
        apply_decision(session, row, step, now, rt.redis)
        outcome = _outcome(row, classification, verdict, step, reason)
    _count(classification, outcome)
    return outcome


def _failure(exc: BaseException) -> str:
    return f"analysis failed: {type(exc).__name__}: {exc}".splitlines()[0][:500]


def _outcome(
    row: CanaryDeployment,
    classification: str,
    verdict: Verdict | None,
    step: Step,
    reason: str | None,
) -> dict[str, Any]:
    return {
        "deployment": row.name,
        "verdict": classification,
        "score": verdict.score if verdict else None,
        "state": row.state,
        "decision": "conflict" if row.state == "conflict" else step.decision,
        "reason": row.decision_reason if row.state == "conflict" else _joined(reason, step.reason),
    }


def _count(classification: str, outcome: dict[str, Any]) -> None:
    from monitoring import metrics

    if classification != "expired":
        metrics.CANARY_ANALYSES.labels(classification).inc()
    if outcome["decision"]:
        metrics.CANARY_DECISIONS.labels(outcome["decision"]).inc()
        log.warning("canary_decided", **outcome)
    else:
        log.info("canary_analyzed", **outcome)


def record_failure(
    rt: Runtime, deployment_id: int, now: datetime, exc: BaseException
) -> dict[str, Any]:
    """An analysis that failed outside the judging (a database error in its transaction):
    recorded in a transaction of its own as an ``error`` analysis, counted as inconclusive."""
    reason = _failure(exc)
    log.error("canary_analysis_failed", deployment_id=deployment_id, error=reason)
    with rt.sessions.begin() as session:
        row = session.get(CanaryDeployment, deployment_id, with_for_update=True)
        # Resolved by reading back: an analysis at this very time that committed (its
        # answer lost) is left as it is, and so is a deployment it decided.
        if row is None or row.state not in ACTIVE or row.last_analysis_at == now:
            return {"skipped": True, "reason": reason}
        step = after_analysis(_progress(row), "error", _limits(row))
        session.add(
            CanaryAnalysis(
                deployment_id=row.id,
                at=now,
                verdict="error",
                score=None,
                results=[],
                reason=_joined(reason, step.reason),
            )
        )
        row.last_analysis_at = now
        apply_decision(session, row, step, now, rt.redis)
        outcome = _outcome(row, "error", None, step, reason)
    _count("error", outcome)
    return outcome


def _joined(*reasons: str | None) -> str | None:
    return "; ".join(r for r in reasons if r) or None


def record_states(rt: Runtime) -> dict[str, int]:
    """Deployments by state, for the run's summary (fleet exporter reads them at scrape
    time for the metrics)."""
    with rt.sessions() as session:
        counts = Counter(
            dict(
                session.execute(
                    select(CanaryDeployment.state, func.count()).group_by(CanaryDeployment.state)
                ).all()
            )
        )
    return {state: counts.get(state, 0) for state in STATES}


def due(rt: Runtime, now: datetime) -> list[int]:
    with rt.sessions() as session:
        rows = session.scalars(select(CanaryDeployment).where(CanaryDeployment.state.in_(ACTIVE)))
        return [
            r.id
            for r in rows
            if r.last_analysis_at is None
            or now - r.last_analysis_at >= timedelta(seconds=r.interval_seconds)
        ]


def analyze(
    rt: Runtime, source: MetricsSource | None = None, now: datetime | None = None
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    if source is None:
        if rt.settings.prometheus_url is None:
            record_states(rt)
            return skipped("canary analysis needs Prometheus: FLEET_PROMETHEUS_URL is not set")
        source = PrometheusSource(rt.settings.prometheus_url)
    analyses = []
    for deployment_id in due(rt, now):
        with job_locks(rt.redis, [f"canary:{deployment_id}"], ttl=60) as busy:
            if busy is not None:
                continue
            try:
                analyses.append(analyze_one(rt, deployment_id, source, now))
            except Exception as exc:  # one deployment's fault never stops the others
                try:
                    analyses.append(record_failure(rt, deployment_id, now, exc))
                except Exception as again:
                    log.error(
                        "canary_analysis_not_recorded",
                        deployment_id=deployment_id,
                        error=_failure(again),
                    )
                    analyses.append(
                        {
                            "deployment_id": deployment_id,
                            "verdict": "error",
                            "reason": _failure(exc),
                            "recorded": False,
                        }
                    )
    return {"analyses": analyses, "deployments": record_states(rt)}


@job(
    "canary.analyze",
    queue="canary",
    soft_time_limit=50,
    time_limit=60,
    retry=RetryPolicy(max_retries=2, backoff_base=2, backoff_cap=10),
)
def analyze_canaries() -> dict[str, Any]:
    """Analyze every active canary deployment that is due; promote or roll back."""
    return analyze(runtime())
