"""``rollouts.advance``: guarded feature-flag rollouts, moved step by step by the canary
judge.

A rollout raises a flag's ``rollout_percentage`` through its steps (default 1, 5, 25, 50,
100). Every minute, each active rollout (one writer at a time: a Redis lock, then the rows
locked) is looked at, in this order:

1. **Conflict.** The flag is not as the rollout last wrote it (another percentage, another
   ``updated_at``: a human or another tool changed it): the rollout stops in ``conflict``
   and writes nothing, ever, until an operator resumes it.
2. **Time and traffic.** The step has lasted ``min_step`` seconds and both the treatment
   and the control variant have ``min_impressions`` impressions counted since the step
   began (the fleet's own ``flag_impression_counts``, minutes from the step's first):
   otherwise it waits.
3. **The judge.** Each metric's query is run with ``$selector`` made the treatment's label
   matchers, then the control's, over the last ``window`` seconds, and judged as a canary
   analysis is (:mod:`tasks.canary.judge`, Kayenta's method). ``pass`` moves the flag to
   the next step (at 100 the rollout is ``completed``); ``fail`` rolls it back to 0 (or to
   the step before, ``on_failure: previous_step``) and stops it; ``nodata``, ``marginal``
   and ``error`` wait, and at ``inconclusive_limit`` of them roll back (missing data is
   never health). Prometheus unreachable waits, and past its deadline rolls back.

Every change of the flag is written as the platform's flag service writes it
(:mod:`workers.flagstore`), in the same transaction as the rollout's own state, so the
two are never seen apart; the ``flag_cache_invalidation`` message goes out once it has
committed. A lost answer to that commit is resolved on the next look, which reads both
back: whichever way it went, flag and rollout agree.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tasks.canary import judge_sides
from tasks.canary.judge import Verdict
from tasks.canary.prometheus import (
    MetricsSource,
    PrometheusSource,
    PrometheusUnavailable,
    QueryError,
)
from tasks.rollouts.spec import RolloutSpec
from workers import audit
from workers.db.models import FeatureFlag, FlagImpressionCount, FlagRollout, FlagRolloutStep
from workers.flagstore import treatment_of, update_flag
from workers.jobs import RetryPolicy, job, skipped
from workers.locks import job_locks
from workers.logs import get_logger
from workers.runtime import Runtime, runtime

log = get_logger("fleet.rollouts")
ACTOR = "config-fleet-rollout"
ACTIVE = "active"
STATES = ("active", "paused", "completed", "rolled_back", "aborted", "conflict")
FINAL = ("completed", "rolled_back", "aborted")
INCONCLUSIVE = ("nodata", "marginal", "error")
# A human's update_feature_flag sets updated_at to its own utcnow(): two writes are the
# same one when their times agree to the millisecond (SQLite keeps microseconds as text).
_SAME_WRITE = timedelta(milliseconds=1)


class RolloutRefused(ValueError):
    """A rollout that cannot start or change state: said in one line."""


def percentage(row: FlagRollout) -> float:
    return float(row.steps[row.step_index])


def _changed(flag: FeatureFlag | None, row: FlagRollout) -> dict[str, Any] | None:
    """What another hand changed, or None when the flag is as the rollout left it."""
    if flag is None:
        return {"found": "the flag is gone"}
    if (
        flag.rollout_percentage == row.written_percentage
        and abs(flag.updated_at - row.written_at) <= _SAME_WRITE
    ):
        return None
    return {
        "expected_percentage": row.written_percentage,
        "found_percentage": flag.rollout_percentage,
        "changed_by": flag.updated_by,
        "changed_at": flag.updated_at.isoformat(),
        "enabled": flag.enabled,
    }


def _write(
    session: Session,
    row: FlagRollout,
    flag: FeatureFlag,
    value: float,
    now: datetime,
    reason: str,
    notify: redis.Redis | None,
) -> None:
    flag.rollout_percentage = value
    update_flag(
        session, flag, user_id=ACTOR, now=now, notify=notify, rollout=row.name, reason=reason
    )
    row.written_percentage, row.written_at = value, now


def _locked_flag(session: Session, key: str, environment: str) -> FeatureFlag | None:
    return session.get(FeatureFlag, (key, environment), with_for_update=True)


def start_rollout(
    session: Session,
    spec: RolloutSpec,
    now: datetime,
    created_by: str,
    notify: redis.Redis | None = None,
) -> FlagRollout:
    """Record the rollout and move the flag to its first step (published once the caller
    commits)."""
    if session.scalar(select(FlagRollout.id).where(FlagRollout.name == spec.name)):
        raise RolloutRefused(f"a rollout named {spec.name!r} exists already")
    flag = _locked_flag(session, spec.flag, spec.environment)
    if flag is None:
        raise RolloutRefused(f"no feature flag {spec.flag!r} in {spec.environment}")
    if not flag.enabled:
        raise RolloutRefused(
            f"flag {spec.flag} is disabled in {spec.environment}: it serves nobody, so no "
            "step could ever be judged; enable it first"
        )
    busy = session.scalar(
        select(FlagRollout.name).where(
            FlagRollout.flag_key == spec.flag,
            FlagRollout.environment == spec.environment,
            FlagRollout.state.not_in(FINAL),
        )
    )
    if busy is not None:
        raise RolloutRefused(
            f"rollout {busy} still holds {spec.environment} {spec.flag}: "
            "one rollout per flag and environment at a time"
        )
    if flag.rollout_percentage > spec.steps[0]:
        raise RolloutRefused(
            f"flag {spec.flag} is at {flag.rollout_percentage:g}% already, above the first "
            f"step ({spec.steps[0]:g}%): give steps that start above it"
        )
    treatment = spec.treatment.variant or treatment_of(flag)
    control = spec.control.variant or flag.default_variant
    if treatment is None:
        raise RolloutRefused(
            f"flag {spec.flag} has no variant besides its default ({flag.default_variant}): "
            "a percentage rollout has nothing to give"
        )
    row = FlagRollout(
        name=spec.name,
        flag_key=spec.flag,
        environment=spec.environment,
        steps=spec.steps,
        step_index=0,
        step_started_at=now,
        min_step_seconds=spec.min_step,
        min_impressions=spec.min_impressions,
        treatment_before=0,
        control_before=0,
        treatment_variant=treatment,
        control_variant=control,
        treatment_selector=spec.treatment.selector or f'flag_variant="{treatment}"',
        control_selector=spec.control.selector or f'flag_variant="{control}"',
        metrics=[m.model_dump() for m in spec.metrics],
        judge=spec.judge.model_dump(),
        window_seconds=spec.analysis.window,
        query_step_seconds=spec.analysis.step,
        min_samples=spec.analysis.min_samples,
        inconclusive_limit=spec.analysis.inconclusive_limit,
        prometheus_deadline_seconds=spec.analysis.prometheus_deadline,
        on_failure=spec.on_failure,
        original_percentage=flag.rollout_percentage,
        written_percentage=flag.rollout_percentage,
        written_at=flag.updated_at,
        state=ACTIVE,
        inconclusives=0,
        created_by=created_by,
        created_at=now,
    )
    session.add(row)
    begin_step(session, row, now)
    _write(session, row, flag, spec.steps[0], now, "rollout started", notify)
    audit.record(
        session,
        "rollout_started",
        spec.name,
        now,
        flag=spec.flag,
        environment=spec.environment,
        steps=spec.steps,
        treatment=treatment,
        control=control,
    )
    session.flush()
    return row


def _counted_from(session: Session, row: FlagRollout, since: datetime) -> tuple[int, int]:
    """Treatment and control impressions counted in the minutes from ``since``'s."""
    counts = dict(
        session.execute(
            select(FlagImpressionCount.variant, func.sum(FlagImpressionCount.count))
            .where(
                FlagImpressionCount.flag_key == row.flag_key,
                FlagImpressionCount.environment == row.environment,
                FlagImpressionCount.variant.in_((row.treatment_variant, row.control_variant)),
                FlagImpressionCount.bucket_start >= since.replace(second=0, microsecond=0),
            )
            .group_by(FlagImpressionCount.variant)
        ).all()
    )
    return int(counts.get(row.treatment_variant) or 0), int(counts.get(row.control_variant) or 0)


def begin_step(session: Session, row: FlagRollout, now: datetime) -> None:
    """The step starts now: what its first minute already holds is not its own."""
    row.step_started_at = now
    row.treatment_before, row.control_before = _counted_from(session, row, now)


def impressions_since(session: Session, row: FlagRollout) -> tuple[int, int]:
    """Treatment and control impressions counted since the step began. Counts are per
    minute, so the step's first minute is taken less what it held when the step began;
    impressions evaluated before the step but counted after it began are the step's too
    (the aggregation runs every few seconds, so they are few)."""
    treatment, control = _counted_from(session, row, row.step_started_at)
    return max(0, treatment - row.treatment_before), max(0, control - row.control_before)


def judge_rollout(row: FlagRollout, source: MetricsSource, now: datetime) -> Verdict:
    start = now - timedelta(seconds=row.window_seconds)
    return judge_sides(
        row.metrics,
        row.judge,
        row.min_samples,
        (row.treatment_selector, row.control_selector),
        (start, now, row.query_step_seconds),
        source,
    )


def rollback_to(row: FlagRollout) -> float:
    if row.on_failure == "previous_step" and row.step_index > 0:
        return float(row.steps[row.step_index - 1])
    return 0.0


def _end(
    session: Session,
    row: FlagRollout,
    flag: FeatureFlag,
    state: str,
    now: datetime,
    reason: str,
    notify: redis.Redis | None,
) -> float:
    """Roll the flag back and stop; returns the percentage written."""
    value = rollback_to(row)
    _write(session, row, flag, value, now, reason, notify)
    row.state, row.decided_at, row.reason = state, now, reason
    audit.record(
        session,
        f"rollout_{state}",
        row.name,
        now,
        flag=row.flag_key,
        environment=row.environment,
        reason=reason,
        percentage=value,
    )
    return value


def look(
    session: Session,
    row: FlagRollout,
    source: MetricsSource,
    now: datetime,
    notify: redis.Redis | None,
) -> dict[str, Any]:
    """One look at an active rollout (its row locked by the caller): what it decided."""
    flag = _locked_flag(session, row.flag_key, row.environment)
    at = percentage(row)
    outcome: dict[str, Any] = {"rollout": row.name, "flag": row.flag_key, "percentage": at}
    changed = _changed(flag, row)
    if flag is None or changed is not None:
        return _conflict(session, row, flag, changed, now, outcome)
    lasted = (now - row.step_started_at).total_seconds()
    if lasted < row.min_step_seconds:
        reason = f"step {at:g}% has lasted {lasted:.0f}s of {row.min_step_seconds}s"
        return {**outcome, "decision": "wait", "reason": reason}
    treatment, control = impressions_since(session, row)
    outcome.update(treatment_impressions=treatment, control_impressions=control)
    if min(treatment, control) < row.min_impressions:
        reason = (
            f"{treatment} {row.treatment_variant} and {control} {row.control_variant} "
            f"impressions at {at:g}%, {row.min_impressions} of each needed"
        )
        return _looked(session, row, now, outcome, "wait", reason)
    row.last_analysis_at = now
    try:
        verdict = judge_rollout(row, source, now)
    except PrometheusUnavailable as exc:
        since = row.prometheus_down_since or now
        row.prometheus_down_since = since
        if now - since > timedelta(seconds=row.prometheus_deadline_seconds):
            reason = (
                f"Prometheus unreachable since {since.isoformat()} "
                f"(deadline {row.prometheus_deadline_seconds}s): {exc}"
            )
            value = _end(session, row, flag, "rolled_back", now, reason, notify)
            return _looked(session, row, now, {**outcome, "to": value}, "rollback", reason)
        return _looked(session, row, now, outcome, "wait", f"Prometheus unreachable: {exc}")
    except QueryError as exc:
        return _inconclusive(session, row, flag, now, outcome, "nodata", str(exc), notify)
    except Exception as exc:  # anything else: an error, never a stuck rollout
        reason = f"analysis failed: {type(exc).__name__}: {exc}".splitlines()[0][:500]
        return _inconclusive(session, row, flag, now, outcome, "error", reason, notify)
    row.prometheus_down_since = None
    outcome.update(verdict=verdict.classification, score=verdict.score)
    results = [m.as_dict() for m in verdict.metrics]
    if verdict.classification == "pass":
        return _passed(session, row, flag, verdict, now, outcome, notify)
    if verdict.classification == "fail":
        reason = f"{at:g}% failed: {verdict.reason or 'the treatment is worse'}"
        value = _end(session, row, flag, "rolled_back", now, reason, notify)
        outcome["to"] = value
        return _looked(session, row, now, outcome, "rollback", reason, verdict, results)
    return _inconclusive(
        session,
        row,
        flag,
        now,
        outcome,
        verdict.classification,
        verdict.reason or verdict.classification,
        notify,
        verdict,
        results,
    )


def _conflict(
    session: Session,
    row: FlagRollout,
    flag: FeatureFlag | None,
    changed: dict[str, Any] | None,
    now: datetime,
    outcome: dict[str, Any],
) -> dict[str, Any]:
    row.state, row.conflict, row.decided_at = "conflict", changed, now
    row.reason = (
        f"flag {row.flag_key} is gone from {row.environment}: nothing written"
        if flag is None
        else f"flag changed by {flag.updated_by} to {flag.rollout_percentage:g}% "
        f"(the rollout left it at {row.written_percentage:g}%): nothing written; "
        "`fleet rollout resume` adopts the flag as it is"
    )
    audit.record(session, "rollout_conflict", row.name, now, reason=row.reason, found=changed)
    return _looked(session, row, now, outcome, "conflict", row.reason)


def _passed(
    session: Session,
    row: FlagRollout,
    flag: FeatureFlag,
    verdict: Verdict,
    now: datetime,
    outcome: dict[str, Any],
    notify: redis.Redis | None,
) -> dict[str, Any]:
    """The treatment passed at this step: on to the next one."""
    at = percentage(row)
    results = [m.as_dict() for m in verdict.metrics]
    nxt = row.step_index + 1
    if nxt >= len(row.steps):  # already at the last step: nothing left to give
        row.state, row.decided_at, row.reason = "completed", now, "every step passed"
        return _looked(session, row, now, outcome, "complete", row.reason, verdict, results)
    value = float(row.steps[nxt])
    reason = f"{at:g}% passed (score {verdict.score:.0f})"
    _write(session, row, flag, value, now, reason, notify)
    row.step_index, row.inconclusives = nxt, 0
    begin_step(session, row, now)
    decision = "advance"
    if nxt == len(row.steps) - 1:
        row.state, row.decided_at, row.reason = "completed", now, f"{reason}; at {value:g}%"
        decision = "complete"
        audit.record(
            session, "rollout_completed", row.name, now, flag=row.flag_key, percentage=value
        )
    outcome["to"] = value
    return _looked(session, row, now, outcome, decision, reason, verdict, results)


def _inconclusive(
    session: Session,
    row: FlagRollout,
    flag: FeatureFlag,
    now: datetime,
    outcome: dict[str, Any],
    classification: str,
    reason: str,
    notify: redis.Redis | None,
    verdict: Verdict | None = None,
    results: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    row.inconclusives += 1
    outcome["verdict"] = classification
    if row.inconclusives >= row.inconclusive_limit:
        why = (
            f"{row.inconclusives} inconclusive analyses at {percentage(row):g}% "
            f"(limit {row.inconclusive_limit}; last: {reason}); missing data is not health"
        )
        outcome["to"] = _end(session, row, flag, "rolled_back", now, why, notify)
        return _looked(session, row, now, outcome, "rollback", why, verdict, results)
    why = f"{classification} ({row.inconclusives} of {row.inconclusive_limit}): {reason}"
    return _looked(session, row, now, outcome, "wait", why, verdict, results)


def _looked(
    session: Session,
    row: FlagRollout,
    now: datetime,
    outcome: dict[str, Any],
    decision: str,
    reason: str | None,
    verdict: Verdict | None = None,
    results: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    session.add(
        FlagRolloutStep(
            rollout_id=row.id,
            at=now,
            percentage=outcome["percentage"],
            treatment_impressions=outcome.get("treatment_impressions", 0),
            control_impressions=outcome.get("control_impressions", 0),
            verdict=outcome.get("verdict"),
            score=verdict.score if verdict else None,
            results=results or [],
            decision=decision,
            reason=reason,
        )
    )
    return {**outcome, "decision": decision, "reason": reason, "state": row.state}


def _count(outcome: dict[str, Any]) -> None:
    from monitoring import metrics

    metrics.ROLLOUT_STEPS.labels(outcome["decision"]).inc()
    if outcome["decision"] in ("wait",):
        log.info("rollout_looked", **outcome)
    else:
        log.warning("rollout_decided", **outcome)


def advance_one(
    rt: Runtime, rollout_id: int, source: MetricsSource, now: datetime
) -> dict[str, Any] | None:
    # Resolved by reading back: the flag and the rollout commit together; after a lost
    # COMMIT answer the next look reads both and goes on from what committed.
    with rt.sessions.begin() as session:
        row = session.get(FlagRollout, rollout_id, with_for_update=True)
        if row is None or row.state != ACTIVE:
            return None  # paused, aborted or decided meanwhile
        outcome = look(session, row, source, now, rt.redis)
    _count(outcome)
    return outcome


def states(rt: Runtime) -> dict[str, int]:
    with rt.sessions() as session:
        counts = Counter(
            dict(
                session.execute(
                    select(FlagRollout.state, func.count()).group_by(FlagRollout.state)
                ).all()
            )
        )
    return {state: counts.get(state, 0) for state in STATES}


def advance(
    rt: Runtime, source: MetricsSource | None = None, now: datetime | None = None
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    if source is None:
        if rt.settings.prometheus_url is None:
            states(rt)
            return skipped("guarded rollouts need Prometheus: FLEET_PROMETHEUS_URL is not set")
        source = PrometheusSource(rt.settings.prometheus_url)
    with rt.sessions() as session:
        ids = session.scalars(
            select(FlagRollout.id).where(FlagRollout.state == ACTIVE).order_by(FlagRollout.id)
        ).all()
    looks = []
    for rollout_id in ids:
        # One writer per rollout: the lock, then the row locked in the transaction.
        with job_locks(rt.redis, [f"rollout:{rollout_id}"], ttl=60) as busy:
            if busy is not None:
                continue
            try:
                outcome = advance_one(rt, rollout_id, source, now)
            except Exception as exc:  # one rollout's fault never stops the others
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                log.error("rollout_look_failed", rollout_id=rollout_id, error=reason)
                outcome = {"rollout_id": rollout_id, "decision": "error", "reason": reason}
                from monitoring import metrics

                metrics.ROLLOUT_STEPS.labels("error").inc()
            if outcome is not None:
                looks.append(outcome)
    return {"looks": looks, "rollouts": states(rt)}


def set_state(
    session: Session,
    name: str,
    action: str,
    now: datetime,
    notify: redis.Redis | None,
) -> FlagRollout:
    """``pause``, ``resume`` or ``abort`` a rollout, as an operator asks."""
    row = session.scalars(
        select(FlagRollout).where(FlagRollout.name == name).with_for_update()
    ).first()
    if row is None:
        raise RolloutRefused(f"no rollout named {name!r}")
    if row.state in FINAL:
        raise RolloutRefused(f"rollout {name} is {row.state} already")
    flag = _locked_flag(session, row.flag_key, row.environment)
    if action == "pause":
        if row.state != ACTIVE:
            raise RolloutRefused(f"rollout {name} is {row.state}, not active")
        row.state, row.reason = "paused", "paused by an operator"
    elif action == "resume":
        if row.state == ACTIVE:
            raise RolloutRefused(f"rollout {name} is active already")
        if row.state == "conflict":
            _adopt(row, flag)
        row.state, row.reason, row.conflict = ACTIVE, "resumed by an operator", None
        row.inconclusives, row.prometheus_down_since = 0, None
        begin_step(session, row, now)
    elif action == "abort":
        if row.state == "conflict" or flag is None:
            # The flag is someone else's now: stop without writing over it.
            row.state, row.decided_at = "aborted", now
            row.reason = "aborted by an operator; the flag left as another hand set it"
        else:
            _end(session, row, flag, "aborted", now, "aborted by an operator", notify)
            return row
    else:
        raise RolloutRefused(f"unknown action {action!r}")
    audit.record(session, f"rollout_{action}d", name, now, flag=row.flag_key, state=row.state)
    return row


def _adopt(row: FlagRollout, flag: FeatureFlag | None) -> None:
    """Resuming after a conflict: the flag as it stands becomes what the rollout expects,
    at the last step at or below its percentage."""
    if flag is None:
        raise RolloutRefused(f"flag {row.flag_key} is gone from {row.environment}")
    below = [i for i, step in enumerate(row.steps) if step <= flag.rollout_percentage]
    if not below:
        raise RolloutRefused(
            f"flag {row.flag_key} is at {flag.rollout_percentage:g}%, below the first step "
            f"({row.steps[0]:g}%): abort this rollout and start a new one"
        )
    row.step_index = below[-1]
    row.written_percentage, row.written_at = flag.rollout_percentage, flag.updated_at


@job(
    "rollouts.advance",
    queue="canary",
    soft_time_limit=50,
    time_limit=60,
    retry=RetryPolicy(max_retries=2, backoff_base=2, backoff_cap=10),
)
def advance_rollouts() -> dict[str, Any]:
    """Advance every active guarded flag rollout that is due; roll back on regression."""
    return advance(runtime())
