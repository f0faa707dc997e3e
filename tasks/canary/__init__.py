"""``canary.analyze``: judge configuration canaries against their baseline, then promote or
roll back on their own.

Every minute, each active deployment whose interval has passed (one analysis per deployment
at a time: a Redis lock) is analyzed: canary and baseline series from Prometheus over the
window, each metric judged (:mod:`tasks.canary.judge`), the verdict fed to the state machine
(:mod:`tasks.canary.machine`). A promotion makes the new value the scope's active
configuration as the platform's configuration manager does (previous row archived, audit
event); a rollback restores the version the canary replaced, with its audit event.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tasks.canary.judge import JudgeConfig, MetricSpec, Verdict, judge_metric, score
from tasks.canary.machine import ACTIVE, Limits, Progress, Step, after_analysis, after_unreachable
from tasks.canary.prometheus import (
    MetricsSource,
    PrometheusSource,
    PrometheusUnavailable,
    QueryError,
)
from tasks.canary.spec import CanarySpec
from workers import audit
from workers.configstore import active_value, set_configuration
from workers.db.models import CanaryAnalysis, CanaryDeployment
from workers.jobs import RetryPolicy, job, skipped
from workers.locks import job_locks
from workers.logs import get_logger
from workers.runtime import Runtime, runtime

log = get_logger("fleet.canary")
ACTOR = "config-fleet-canary"
STATES = ("pending", "analyzing", "promoted", "rolled_back", "aborted")


def create_deployment(
    session: Session, spec: CanarySpec, now: datetime, created_by: str
) -> CanaryDeployment:
    """Record a deployment and the version it replaces (for a rollback to restore)."""
    change = spec.change
    current = active_value(session, change.key, change.environment, change.scope, change.tenant)
    version = None
    if current is not None and current.meta:
        try:
            version = json.loads(current.meta).get("version")
        except ValueError:
            version = None
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
        state="pending",
        passes=0,
        failures=0,
        inconclusives=0,
        created_by=created_by,
        created_at=now,
    )
    session.add(deployment)
    session.flush()
    audit.record(
        session,
        "canary_started",
        spec.name,
        now,
        key=change.key,
        environment=change.environment,
        replaces_version=version,
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


def judge_deployment(row: CanaryDeployment, source: MetricsSource, now: datetime) -> Verdict:
    config = JudgeConfig(
        min_samples=row.min_samples,
        **{k: v for k, v in row.judge.items() if k in JudgeConfig.__dataclass_fields__},
    )
    start = now - timedelta(seconds=row.window_seconds)
    results = []
    for raw in row.metrics:
        spec = MetricSpec.from_dict(raw)
        canary = source.range_samples(
            spec.query.replace("$selector", row.canary_selector), start, now, row.step_seconds
        )
        baseline = source.range_samples(
            spec.query.replace("$selector", row.baseline_selector), start, now, row.step_seconds
        )
        results.append(judge_metric(spec, canary, baseline, config))
    return score(results, config)


def apply_decision(session: Session, row: CanaryDeployment, step: Step, now: datetime) -> None:
    """Write the step's state; promote or roll back the configuration when decided."""
    progress = step.progress
    row.state, row.passes, row.failures = progress.state, progress.passes, progress.failures
    row.inconclusives = progress.inconclusives
    row.prometheus_down_since = progress.prometheus_down_since
    if step.decision is None:
        return
    row.decided_at, row.decision_reason = now, step.reason
    if step.decision == "promote":
        set_configuration(
            session,
            key=row.key,
            value=json.loads(row.new_value),
            environment=row.environment,
            scope=row.scope,
            tenant_id=row.tenant_id,
            user_id=ACTOR,
            now=now,
            action="CANARY_PROMOTE",
            description=f"canary {row.name} promoted: {step.reason}",
            audit_metadata={"canary": row.name},
        )
        audit.record(session, "canary_promoted", row.name, now, reason=step.reason, key=row.key)
    else:
        _restore(session, row, now, step.reason or "")
        audit.record(
            session,
            f"canary_{progress.state}",
            row.name,
            now,
            reason=step.reason,
            key=row.key,
            restored_version=row.replaces_version,
        )


def _restore(session: Session, row: CanaryDeployment, now: datetime, reason: str) -> None:
    """The version the canary replaced is written back as the active one (a new version
    with the old value, the current row archived), with its audit event."""
    if row.previous_value is None:
        return  # the key did not exist before: nothing to restore
    set_configuration(
        session,
        key=row.key,
        value=json.loads(row.previous_value),
        environment=row.environment,
        scope=row.scope,
        tenant_id=row.tenant_id,
        user_id=ACTOR,
        now=now,
        action="CANARY_ROLLBACK",
        description=f"canary {row.name} rolled back: {reason}",
        audit_metadata={"canary": row.name, "restored_version": row.replaces_version},
    )


def analyze_one(
    rt: Runtime, deployment_id: int, source: MetricsSource, now: datetime
) -> dict[str, Any]:
    from monitoring import metrics

    with rt.sessions.begin() as session:
        row = session.get(CanaryDeployment, deployment_id, with_for_update=True)
        if row is None or row.state not in ACTIVE:
            return {"skipped": True}
        verdict: Verdict | None = None
        reason = None
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
        apply_decision(session, row, step, now)
        outcome = {
            "deployment": row.name,
            "verdict": classification,
            "score": verdict.score if verdict else None,
            "state": row.state,
            "decision": step.decision,
            "reason": _joined(reason, step.reason),
        }
    metrics.CANARY_ANALYSES.labels(classification).inc()
    if step.decision:
        metrics.CANARY_DECISIONS.labels(step.decision).inc()
        log.warning("canary_decided", **outcome)
    else:
        log.info("canary_analyzed", **outcome)
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
            if busy is None:
                analyses.append(analyze_one(rt, deployment_id, source, now))
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
