"""The audit act of ``fleet demo``: the demo's own audit trail (configuration changes made
by the drift act, secret status changes, ...) shipped to a JSONL file and verified."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from tasks.audit import hmac_key
from tasks.audit.verify import Verdict, verify
from workers.runtime import Runtime


class AuditAct:
    name = "audit"
    expected_successes: ClassVar[dict[str, int]] = {"audit.ship": 1}
    metrics: ClassVar[tuple[str, ...]] = ("fleet_audit_events_shipped_total",)

    def prepare(self, rt: Runtime, now: datetime) -> str:
        return f"audit: shipping to {self._directory(rt)} (a JSONL file sink)"

    def tick(self, rt: Runtime, now: datetime, remaining: float) -> str | None:
        return None

    def _directory(self, rt: Runtime) -> Path:
        return rt.settings.home / "audit"

    def _verify(self, rt: Runtime) -> Verdict:
        interval = rt.settings.audit_checkpoint_interval
        return verify([self._directory(rt)], hmac_key(rt.settings), interval=interval)

    def status(self, rt: Runtime) -> str:
        verdict = self._verify(rt)
        state = "chain verified" if verdict.ok else f"BROKEN: {verdict.problem}"
        return (
            f"audit: {verdict.records} records in {self._directory(rt)}, "
            f"{verdict.checkpoints} checkpoints, {state}"
        )

    def problems(self, rt: Runtime) -> list[str]:
        verdict = self._verify(rt)
        if not verdict.ok:
            return [f"audit: the shipped file does not verify: {verdict.problem}"]
        if verdict.records == 0:
            return ["audit: nothing was shipped"]
        return []


def act() -> Any:
    return AuditAct()
