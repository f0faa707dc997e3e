"""The rollout act of ``fleet demo``, and a service instance of the platform to drive it.

:class:`FlagService` is what the platform's ``FeatureFlagService`` does for one service
instance, as the reference describes it: flags read from ``feature_flags`` and cached for
30 seconds under ``feature_flags:{environment}:{key}``, a cached flag dropped when
``{flag_key, environment}`` arrives on ``flag_cache_invalidation``; targeting rules
first, then the percentage rollout (``md5("{user_id}:{flag_key}")``, first 8 hex digits
mod 10000 / 100, at or under ``rollout_percentage`` gets the first non-default variant);
each evaluation pushes an impression onto ``feature_flag_impressions`` in the platform's
format. The demo and the tests evaluate flags through it, so the impressions that gate
each step are the ones real services would produce at that step's percentage.

The act: two flags, each rolled out through 1, 5, 25, 50 and 100 percent, judged on
``app_latency_seconds`` of their ``on`` and ``off`` variants, which the canary act's
Prometheus scrapes from a small app here. ``new_checkout``'s treatment is as fast as its
control and reaches 100 %; ``new_search``'s is three times slower and is rolled back to
0 at its first step.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tasks.canary import demo as canary_demo
from tasks.impressions.queue import SOURCE
from tasks.rollouts import start_rollout
from tasks.rollouts.spec import RolloutSpec
from workers.db.models import FeatureFlag, FlagRollout, FlagRolloutStep, TaskRun
from workers.flagstore import CHANNEL, user_hash
from workers.runtime import Runtime

CACHE_PREFIX = "feature_flags:"
CACHE_TTL = 30.0


def _matches(rule: dict[str, Any], context: dict[str, Any]) -> bool:
    kind, values = rule.get("rule_type"), rule.get("values") or []
    if kind == "percentage":
        share = float(values[0]) if values else 0.0
        return user_hash(str(context.get("user_id", "anonymous")), rule["variant"]) <= share
    actual = context.get(str(kind))
    operator = rule.get("operator")
    if operator in ("equals", "in"):
        return actual in values
    if operator in ("not_equals", "not_in"):
        return actual not in values
    return False


class FlagService:
    """One service instance's flag evaluation, cache and impressions (see the module)."""

    def __init__(
        self,
        engine: Engine,
        client: redis.Redis,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine, self._client, self._clock = engine, client, clock
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()
        self.invalidations: list[dict[str, Any]] = []
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
        self._pubsub.subscribe(**{CHANNEL: self._invalidated})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _invalidated(self, message: dict[str, Any]) -> None:
        change = json.loads(message["data"])
        with self._lock:
            self._cache.pop(f"{CACHE_PREFIX}{change['environment']}:{change['flag_key']}", None)
            self.invalidations.append(change)

    def flag(self, key: str, environment: str) -> dict[str, Any] | None:
        cache_key = f"{CACHE_PREFIX}{environment}:{key}"
        with self._lock:
            cached = self._cache.get(cache_key)
            if cached is not None and cached[0] > self._clock():
                return cached[1]
        with Session(self._engine) as session:
            row = session.get(FeatureFlag, (key, environment))
            flag = (
                None
                if row is None
                else {
                    "key": row.key,
                    "enabled": row.enabled,
                    "default_variant": row.default_variant,
                    "variants": json.loads(row.variants or "[]"),
                    "targeting_rules": json.loads(row.targeting_rules or "[]"),
                    "rollout_percentage": row.rollout_percentage,
                }
            )
        with self._lock:
            self._cache[cache_key] = (self._clock() + CACHE_TTL, flag)
        return flag

    def variant(self, key: str, environment: str, context: dict[str, Any]) -> str | None:
        flag = self.flag(key, environment)
        if flag is None or not flag["enabled"]:
            return None
        for rule in flag["targeting_rules"]:
            if _matches(rule, context):
                return str(rule["variant"])
        if flag["rollout_percentage"] > 0:
            user = str(context.get("user_id", "anonymous"))
            if user_hash(user, key) <= flag["rollout_percentage"]:
                others = [
                    v["name"] for v in flag["variants"] if v["name"] != flag["default_variant"]
                ]
                if others:
                    return str(others[0])
        return str(flag["default_variant"])

    def evaluate_many(
        self, key: str, environment: str, users: Iterable[str], tenant_id: str = "tenant-1"
    ) -> Counter[str]:
        """Evaluate ``key`` for each user and push each impression (one round trip)."""
        served: Counter[str] = Counter()
        pushed = []
        stamp = datetime.now(UTC).replace(tzinfo=None).isoformat()
        for user in users:
            context = {"user_id": user, "tenant_id": tenant_id}
            name = self.variant(key, environment, context)
            if name is None:
                continue
            served[name] += 1
            pushed.append(
                orjson.dumps(
                    {
                        "flag_key": key,
                        "environment": environment,
                        "variant": name,
                        "user_id": user,
                        "tenant_id": tenant_id,
                        "timestamp": stamp,
                        "context": context,
                    }
                )
            )
        if pushed:
            self._client.lpush(SOURCE, *pushed)
        return served

    def close(self) -> None:
        self._thread.stop()
        self._thread.join(timeout=5)
        self._pubsub.close()


def demo_flag(key: str, environment: str, now: datetime) -> FeatureFlag:
    return FeatureFlag(
        key=key,
        environment=environment,
        name=key.replace("_", " ").title(),
        description=f"{key}, rolled out by the fleet",
        flag_type="boolean",
        enabled=True,
        default_variant="off",
        variants=json.dumps([{"name": "off", "value": False}, {"name": "on", "value": True}]),
        targeting_rules="[]",
        created_at=now,
        created_by="admin",
        updated_at=now,
        updated_by="admin",
        rollout_percentage=0.0,
    )


def latency_rollout(name: str, flag: str, environment: str, **overrides: Any) -> RolloutSpec:
    """A rollout judged on ``app_latency_seconds`` of the flag's ``on`` variant against its
    ``off`` one, at the demo's pace unless ``overrides`` say otherwise."""
    return RolloutSpec.model_validate(
        {
            "name": name,
            "flag": flag,
            "environment": environment,
            "treatment": {"selector": f'flag="{flag}",flag_variant="on"'},
            "control": {"selector": f'flag="{flag}",flag_variant="off"'},
            "metrics": [
                # Not critical: too few samples (the demo judges from its first seconds)
                # is inconclusive, not a failure; a slower treatment still fails.
                {"name": "latency", "query": "app_latency_seconds{$selector}"}
            ],
            "min_step": 0,
            "min_impressions": 50,
            "analysis": {"window": 20, "step": 1, "min_samples": 8, "inconclusive_limit": 10},
            **overrides,
        }
    )


def variants_exposition(flag: str, latencies: dict[str, float], seed: int) -> Callable[[], str]:
    """An app serving ``flag``'s variants: ``app_latency_seconds`` per variant, each
    around its latency give or take 5 %."""
    rng = random.Random(seed)

    def render() -> str:
        lines = ["# TYPE app_latency_seconds gauge"]
        for variant, seconds in latencies.items():
            value = seconds * (1 + rng.uniform(-0.05, 0.05))
            lines.append(f'app_latency_seconds{{flag="{flag}",flag_variant="{variant}"}} {value}')
        return "\n".join(lines) + "\n"

    return render


# (rollout, flag, treatment latency against a 0.1 s control, how it should end)
ROLLOUTS = (
    ("new-checkout", "new_checkout", 0.10, "completed"),
    ("new-search", "new_search", 0.30, "rolled_back"),
)
ENVIRONMENT = "production"
USERS_PER_TICK = 1500
for _seed, (_, _flag, _latency, _) in enumerate(ROLLOUTS):
    canary_demo.SCRAPED[f"flag_{_flag}"] = variants_exposition(
        _flag, {"on": _latency, "off": 0.10}, seed=100 + _seed
    )


def _path(rt: Runtime, row: FlagRollout) -> list[float]:
    """The percentages a rollout went through, from its recorded looks (each at the
    percentage it found) and where it stands now: every step, however fast they came."""
    with rt.sessions() as session:
        looked = session.scalars(
            select(FlagRolloutStep.percentage)
            .where(FlagRolloutStep.rollout_id == row.id)
            .order_by(FlagRolloutStep.at, FlagRolloutStep.id)
        ).all()
    path: list[float] = []
    for value in (*looked, row.written_percentage):
        if not path or path[-1] != value:
            path.append(value)
    return path


class RolloutAct:
    name = "rollout"
    expected_successes: ClassVar[dict[str, int]] = {}
    metrics: ClassVar[tuple[str, ...]] = ("fleet_rollout_steps", "fleet_rollout_percentage")

    def __init__(self) -> None:
        self.service: FlagService | None = None
        self.judged = False
        self.users = 0
        self.served: Counter[str] = Counter()

    def prepare(self, rt: Runtime, now: datetime) -> str:
        if canary_demo.judging_prometheus() is None:
            return "rollout: skipped, no Prometheus of the demo's own to judge with (see canary:)"
        self.service = FlagService(rt.engine, rt.redis)  # listening before the first write
        with rt.sessions.begin() as session:
            for name, flag, _, _ in ROLLOUTS:
                session.merge(demo_flag(flag, ENVIRONMENT, now))
                session.flush()
                start_rollout(
                    session, latency_rollout(name, flag, ENVIRONMENT), now, "fleet-demo", rt.redis
                )
        self.judged = True
        return (
            f"rollout: {', '.join(f for _, f, _, _ in ROLLOUTS)} start at 1 %; "
            f"{ROLLOUTS[0][1]} should reach 100 %, {ROLLOUTS[1][1]} (3x latency) be rolled back"
        )

    def _rollouts(self, rt: Runtime) -> dict[str, FlagRollout]:
        with rt.sessions() as session:
            return {r.name: r for r in session.scalars(select(FlagRollout))}

    def tick(self, rt: Runtime, now: datetime, remaining: float) -> str | None:
        if self.service is None or not self.judged:
            return None
        rows = self._rollouts(rt)
        for name, flag, _, _ in ROLLOUTS:
            row = rows.get(name)
            if row is None:
                continue
            if row.state == "active":
                first, self.users = self.users, self.users + USERS_PER_TICK
                users = (f"user-{i}" for i in range(first, self.users))
                self.served.update(self.service.evaluate_many(flag, ENVIRONMENT, users))
        return None

    def status(self, rt: Runtime) -> str:
        rows = self._rollouts(rt)
        with rt.sessions() as session:
            runs = session.scalar(
                select(func.count()).select_from(TaskRun).where(TaskRun.job == "rollouts.advance")
            )
        ours = {name for name, *_ in ROLLOUTS}
        parts = [
            f"{row.flag_key} {' -> '.join(f'{p:g}%' for p in _path(rt, row))} ({row.state})"
            for name, row in sorted(rows.items())
            if name in ours
        ]
        heard = len(self.service.invalidations) if self.service else 0
        return (
            f"rollout: {runs or 0} runs; {'; '.join(parts)}; "
            f"{heard} invalidations heard on {CHANNEL}"
        )

    def problems(self, rt: Runtime) -> list[str]:
        with rt.sessions() as session:
            outcomes = dict(
                session.execute(
                    select(TaskRun.outcome, func.count())
                    .where(TaskRun.job == "rollouts.advance")
                    .group_by(TaskRun.outcome)
                ).all()
            )
        if outcomes.get("failure"):
            return [f"rollout: {outcomes['failure']} failed runs"]
        if not outcomes.get("success") and not outcomes.get("skipped"):
            return ["rollout: rollouts.advance has not run yet"]
        if not self.judged:
            return []
        rows = self._rollouts(rt)
        wrong = [
            f"{name} is {rows[name].state if name in rows else 'missing'}, not yet {wanted}"
            for name, _, _, wanted in ROLLOUTS
            if name not in rows or rows[name].state != wanted
        ]
        if wrong:
            return [f"rollout: {'; '.join(wrong)}"]
        heard = len(self.service.invalidations) if self.service else 0
        if heard < 7:  # two starts, four advances, one rollback
            return [f"rollout: {heard} invalidations heard on {CHANNEL}, 7 expected"]
        return []

    def close(self) -> None:
        if self.service is not None:
            self.service.close()


def act() -> RolloutAct:
    return RolloutAct()
