"""The canary act of ``fleet demo``: canaries are judged only with a Prometheus to ask,
and the demo says so plainly when there is none."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import func, select

from workers.db.models import CanaryDeployment, TaskRun
from workers.runtime import Runtime


class CanaryAct:
    name = "canary"
    expected_successes: ClassVar[dict[str, int]] = {}
    metrics: ClassVar[tuple[str, ...]] = ("fleet_canary_deployments",)

    def prepare(self, rt: Runtime, now: datetime) -> str:
        if rt.settings.prometheus_url is None:
            return (
                "canary: analysis skipped, no FLEET_PROMETHEUS_URL (set it to have "
                "`fleet canary start` deployments judged)"
            )
        return f"canary: judging deployments against {rt.settings.prometheus_url}"

    def tick(self, rt: Runtime, now: datetime, remaining: float) -> str | None:
        return None

    def status(self, rt: Runtime) -> str:
        with rt.sessions() as session:
            runs = (
                session.scalar(
                    select(func.count()).select_from(TaskRun).where(TaskRun.job == "canary.analyze")
                )
                or 0
            )
            deployments = session.scalar(select(func.count()).select_from(CanaryDeployment)) or 0
        if rt.settings.prometheus_url is None:
            return f"canary: {runs} runs, each skipped (no FLEET_PROMETHEUS_URL), as expected"
        return f"canary: {runs} runs over {deployments} deployments"

    def problems(self, rt: Runtime) -> list[str]:
        with rt.sessions() as session:
            outcomes = dict(
                session.execute(
                    select(TaskRun.outcome, func.count())
                    .where(TaskRun.job == "canary.analyze")
                    .group_by(TaskRun.outcome)
                ).all()
            )
        if outcomes.get("failure"):
            return [f"canary: {outcomes['failure']} failed runs"]
        if not outcomes.get("success") and not outcomes.get("skipped"):
            return ["canary: canary.analyze has not run yet"]
        return []


def act() -> Any:
    return CanaryAct()
