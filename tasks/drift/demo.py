"""The drift act of ``fleet demo``: live configuration seeded from the sample desired files
with deliberate drift; findings appear; one difference is fixed and its finding resolves.
One entry of the platform's configuration cache is left stale on purpose (a value the
database does not hold, under the platform's own cache key), for a ``stale_cache``
finding. The workers read the desired files from a local Git repository the demo makes
from the samples, so every finding records its commit."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tasks.drift.sources import desired_files, read_desired
from workers.configstore import delete_configuration, set_configuration
from workers.db.models import DriftFindingRow
from workers.runtime import Runtime

USER = "fleet-demo"
_REMOVE = object()

# (environment, key, live value): what the demo breaks on purpose.
DELIBERATE_DRIFT: list[tuple[str, str, Any]] = [
    ("production", "services.chat_service.replicas", 4),
    ("production", "database.postgresql.pool_size", _REMOVE),
    ("production", "feature.debug_toolbar", True),
    ("staging", "security.csrf_protection", "false"),
    ("staging", "external_apis.openai.api_key", "sk-demo-not-a-real-key"),
]
# The difference the demo repairs mid-way, to show a finding resolve.
FIXED = ("production", "services.chat_service.replicas")
# A cache entry the platform forgot to invalidate (its _build_cache_key spelling).
STALE_CACHE = ("production", "security.csrf_protection", "config::production:environment:")


def seed_live(session: Session, config_dir: Any, now: datetime, *, drift: bool = True) -> int:
    """Write every declared key as the live configuration, then the deliberate drift."""
    written = 0
    for environment, path in desired_files(config_dir).items():
        flat, _problem = read_desired(path, environment)
        for key, value in (flat or {}).items():
            set_configuration(
                session, key=key, value=value, environment=environment, user_id=USER, now=now
            )
            written += 1
    for environment, key, value in DELIBERATE_DRIFT if drift else []:
        if value is _REMOVE:
            delete_configuration(session, key=key, environment=environment, user_id=USER, now=now)
        else:
            set_configuration(
                session,
                key=key,
                value=value,
                environment=environment,
                user_id=USER,
                now=now,
                sensitive=key.endswith("api_key"),
            )
    return written


class DriftAct:
    name = "drift"
    expected_successes: ClassVar[dict[str, int]] = {"drift.detect": 2}
    metrics: ClassVar[tuple[str, ...]] = (
        "fleet_drift_findings_opened_total",
        "fleet_drift_findings_resolved_total",
    )

    def __init__(self) -> None:
        self.fixed_at: datetime | None = None
        self.env: dict[str, str] = {}
        self.git_note = ""

    def prepare(self, rt: Runtime, now: datetime) -> str:
        with rt.sessions.begin() as session:
            written = seed_live(session, rt.settings.configuration_dir, now)
        environment, key, prefix = STALE_CACHE
        rt.redis.set(prefix + key, '"stale"', ex=3600)
        self.git_note = self._git_repository(rt.settings.configuration_dir, rt.settings.home)
        return (
            f"drift: seeded {written} live keys with {len(DELIBERATE_DRIFT)} deliberate differences"
            f" and one stale cache entry ({environment} {key}); {self.git_note}"
        )

    def _git_repository(self, config_dir: Path, home: Path) -> str:
        """The sample desired files committed to a local bare repository, for the workers
        to fetch (FLEET_DRIFT_GIT_URL)."""
        if shutil.which("git") is None:
            return "desired files from the folder (git is not installed)"
        work, bare = home / "demo-git" / "work", home / "demo-git" / "desired.git"
        shutil.rmtree(home / "demo-git", ignore_errors=True)
        shutil.copytree(config_dir / "environments", work / "environments")
        shutil.copy(config_dir / "drift-rules.yaml", work / "drift-rules.yaml")
        who = {"GIT_AUTHOR_NAME": USER, "GIT_AUTHOR_EMAIL": "demo@fleet.invalid"}
        env = {**os.environ, **who, "GIT_COMMITTER_NAME": USER,
               "GIT_COMMITTER_EMAIL": "demo@fleet.invalid"}  # fmt: skip
        for args, cwd in (
            (["init", "--quiet", "-b", "main"], work),
            (["add", "."], work),
            (["commit", "--quiet", "-m", "desired configuration"], work),
            (["init", "--quiet", "--bare", str(bare)], home),
            (["push", "--quiet", str(bare), "main"], work),
        ):
            subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)
        self.env = {"FLEET_DRIFT_GIT_URL": str(bare), "FLEET_DRIFT_GIT_REF": "main"}
        return f"desired files from Git ({bare})"

    def tick(self, rt: Runtime, now: datetime, remaining: float) -> str | None:
        if self.fixed_at is not None or not self._open(rt, *FIXED):
            return None
        environment, key = FIXED
        desired, _ = read_desired(
            desired_files(rt.settings.configuration_dir)[environment], environment
        )
        with rt.sessions.begin() as session:
            set_configuration(
                session,
                key=key,
                value=(desired or {})[key],
                environment=environment,
                user_id=USER,
                now=now,
            )
        self.fixed_at = now
        return f"drift: fixed {environment} {key} in the live configuration"

    def status(self, rt: Runtime) -> str:
        with rt.sessions() as session:
            rows = session.execute(
                select(
                    DriftFindingRow.severity, DriftFindingRow.resolved_at.is_(None), func.count()
                ).group_by(DriftFindingRow.severity, DriftFindingRow.resolved_at.is_(None))
            ).all()
        open_by = {sev: n for sev, is_open, n in rows if is_open}
        resolved = sum(n for _, is_open, n in rows if not is_open)
        shown = ", ".join(f"{n} {sev}" for sev, n in sorted(open_by.items())) or "none"
        stale = "found" if self._stale_found(rt) else "not found yet"
        commits = self._commits(rt)
        compared = f"; compared with commit {', '.join(c[:10] for c in commits)}" if commits else ""
        return (
            f"drift findings open: {shown}; resolved: {resolved}; stale cache entry {stale}"
            f"{compared}"
        )

    def _commits(self, rt: Runtime) -> list[str]:
        with rt.sessions() as session:
            query = select(DriftFindingRow.desired_commit).where(
                DriftFindingRow.desired_commit.is_not(None)
            )
            return sorted({c for c in session.scalars(query) if c})

    def problems(self, rt: Runtime) -> list[str]:
        if not self._any_open(rt):
            return ["drift: no finding was opened"]
        if self.fixed_at is None:
            return ["drift: the demo's fix was never made (no finding to fix)"]
        if self._open(rt, *FIXED):
            return [f"drift: the fixed {FIXED[0]} {FIXED[1]} finding is still open"]
        if not self._stale_found(rt):
            return ["drift: the stale cache entry was not found"]
        if self.env and not self._commits(rt):
            return ["drift: no finding records the Git commit it was compared with"]
        return []

    def _stale_found(self, rt: Runtime) -> bool:
        environment, key, _ = STALE_CACHE
        with rt.sessions() as session:
            query = (
                select(func.count())
                .select_from(DriftFindingRow)
                .where(
                    DriftFindingRow.kind == "stale_cache",
                    DriftFindingRow.environment == environment,
                    DriftFindingRow.key == f"{key}@environment",
                )
            )
            return bool(session.scalar(query))

    def _open(self, rt: Runtime, environment: str, key: str) -> bool:
        with rt.sessions() as session:
            query = (
                select(func.count())
                .select_from(DriftFindingRow)
                .where(
                    DriftFindingRow.environment == environment,
                    DriftFindingRow.key == key,
                    DriftFindingRow.kind == "value_changed",
                    DriftFindingRow.resolved_at.is_(None),
                )
            )
            return bool(session.scalar(query))

    def _any_open(self, rt: Runtime) -> bool:
        with rt.sessions() as session:
            query = (
                select(func.count())
                .select_from(DriftFindingRow)
                .where(DriftFindingRow.resolved_at.is_(None))
            )
            return bool(session.scalar(query))


def act() -> DriftAct:
    return DriftAct()
