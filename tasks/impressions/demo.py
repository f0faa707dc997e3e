"""The impressions act of ``fleet demo``: a stream of evaluations of the platform's two
example flags (``new_ui_enabled``, ``model_configuration``), a few malformed ones among
them, counted as they arrive; at the end every good one is counted exactly once and every
bad one is a dead letter."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
from sqlalchemy import func, select

from tasks.impressions.queue import DEAD, SOURCE
from workers.db.models import FeatureFlag, FlagImpressionCount, FlagImpressionUsers
from workers.flagstore import user_hash
from workers.runtime import Runtime

ENVIRONMENTS = ("production", "staging")
PLANS = ("enterprise", "professional", "starter", "free")
PER_TICK = 120
PUSHES = 14  # ticks with impressions (about 7 s); then the demo waits for them to be counted
STOP_BEFORE_END = 5.0  # seconds: the last impressions get drained before the demo checks


def _flags(now: datetime) -> list[FeatureFlag]:
    made = []
    for environment in ENVIRONMENTS:
        made.append(
            FeatureFlag(
                key="new_ui_enabled",
                environment=environment,
                name="New UI Design",
                description="Enable new user interface design",
                flag_type="boolean",
                enabled=True,
                default_variant="off",
                variants=json.dumps(
                    [{"name": "off", "value": False}, {"name": "on", "value": True}]
                ),
                targeting_rules=json.dumps(
                    [
                        {
                            "rule_type": "tenant_plan",
                            "operator": "in",
                            "values": ["enterprise", "professional"],
                            "variant": "on",
                        }
                    ]
                ),
                created_at=now,
                created_by="admin",
                updated_at=now,
                updated_by="admin",
                rollout_percentage=25.0,
            )
        )
        made.append(
            FeatureFlag(
                key="model_configuration",
                environment=environment,
                name="AI Model Configuration",
                description="Dynamic AI model configuration",
                flag_type="json",
                enabled=True,
                default_variant="standard",
                variants=json.dumps(
                    [
                        {"name": "standard", "value": {"primary_model": "gpt-3.5-turbo"}},
                        {"name": "premium", "value": {"primary_model": "gpt-4-turbo"}},
                    ]
                ),
                targeting_rules=json.dumps(
                    [
                        {
                            "rule_type": "tenant_plan",
                            "operator": "equals",
                            "values": ["enterprise"],
                            "variant": "premium",
                        }
                    ]
                ),
                created_at=now,
                created_by="admin",
                updated_at=now,
                updated_by="admin",
            )
        )
    return made


def evaluate(flag: str, user: str, plan: str) -> str:
    """The platform's targeting for its two example flags (rules, then rollout)."""
    if flag == "new_ui_enabled":
        if plan in ("enterprise", "professional") or user_hash(user, flag) <= 25.0:
            return "on"
        return "off"
    return "premium" if plan == "enterprise" else "standard"


def impression(rng: random.Random, now: datetime) -> dict[str, Any]:
    tenant = rng.randrange(20)
    user = f"user-{rng.randrange(500)}"
    flag = rng.choice(("new_ui_enabled", "model_configuration"))
    context = {"user_id": user, "tenant_id": f"tenant-{tenant}", "tenant_plan": PLANS[tenant % 4]}
    return {
        "flag_key": flag,
        "environment": rng.choice(ENVIRONMENTS),
        "variant": evaluate(flag, user, context["tenant_plan"]),
        "user_id": user,
        "tenant_id": context["tenant_id"],
        "timestamp": now.replace(tzinfo=None).isoformat(),
        "context": context,
    }


BAD = [
    b"{not json",
    b'{"flag_key": "new_ui_enabled"}',
    b'{"flag_key": "", "environment": "x", "variant": "on", "timestamp": "2026-01-01T00:00:00"}',
]


class ImpressionsAct:
    name = "impressions"
    expected_successes: ClassVar[dict[str, int]] = {"impressions.aggregate": 3}
    metrics: ClassVar[tuple[str, ...]] = (
        "fleet_impressions_processed_total",
        "fleet_impressions_dead_lettered_total",
        "fleet_impressions_queue_depth",
    )

    def __init__(self) -> None:
        self.rng = random.Random(42)
        self.good = 0
        self.bad = 0

    def prepare(self, rt: Runtime, now: datetime) -> str:
        with rt.sessions.begin() as session:
            session.add_all(_flags(now))
        return "impressions: flags new_ui_enabled and model_configuration in production and staging"

    def tick(self, rt: Runtime, now: datetime, remaining: float) -> str | None:
        if remaining < STOP_BEFORE_END or self.good >= PUSHES * PER_TICK:
            return None
        payloads = [orjson.dumps(impression(self.rng, now)) for _ in range(PER_TICK)]
        if self.good // PER_TICK % 10 == 0:
            payloads.append(BAD[self.bad % len(BAD)])
            self.bad += 1
        rt.redis.lpush(SOURCE, *payloads)
        self.good += PER_TICK
        return None

    def status(self, rt: Runtime) -> str:
        counted, users, flag_count = self._counted(rt)
        dead = rt.redis.llen(DEAD)
        return (
            f"impressions: {self.good:,} good ones pushed and {counted:,} counted, {self.bad} bad "
            f"ones pushed and {dead} dead-lettered; "
            f"new_ui_enabled/on users today: {users}; production new_ui_enabled "
            f"impression_count: {flag_count:,}"
        )

    def problems(self, rt: Runtime) -> list[str]:
        counted, _users, _flags = self._counted(rt)
        problems = []
        if counted != self.good:
            problems.append(f"impressions: {counted:,} counted of {self.good:,} pushed")
        dead = rt.redis.llen(DEAD)
        if dead != self.bad:
            problems.append(f"impressions: {dead} dead letters for {self.bad} bad records")
        return problems

    def _counted(self, rt: Runtime) -> tuple[int, int, int]:
        with rt.sessions() as session:
            counted = session.scalar(
                select(func.coalesce(func.sum(FlagImpressionCount.count), 0)).where(
                    FlagImpressionCount.flag_key.in_(("new_ui_enabled", "model_configuration"))
                )
            )
            users = session.scalar(
                select(func.coalesce(func.sum(FlagImpressionUsers.users), 0)).where(
                    FlagImpressionUsers.flag_key == "new_ui_enabled",
                    FlagImpressionUsers.variant == "on",
                    FlagImpressionUsers.day == datetime.now(UTC).date(),
                )
            )
            flag = session.get(FeatureFlag, ("new_ui_enabled", "production"))
        return int(counted or 0), int(users or 0), flag.impression_count if flag else 0


def act() -> ImpressionsAct:
    return ImpressionsAct()
