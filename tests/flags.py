"""Feature flags in the test database, as the platform keeps them, and a person's change
to one (the platform's update_feature_flag, not the fleet's writer)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tasks.rollouts.demo import demo_flag
from workers.db.models import FeatureFlag, FeatureFlagAuditLog
from workers.runtime import Runtime

ENV = "production"


def add_flags(rt: Runtime, *keys: str) -> None:
    with rt.sessions.begin() as session:
        for key in keys:
            session.add(demo_flag(key, ENV, datetime.now(UTC) - timedelta(days=1)))


def human_update(rt: Runtime, key: str, percentage: float, who: str = "alice") -> None:
    """The platform's update_feature_flag, by a person."""
    now = datetime.now(UTC)
    with rt.sessions.begin() as session:
        flag = session.get(FeatureFlag, (key, ENV))
        assert flag is not None
        flag.rollout_percentage, flag.updated_at, flag.updated_by = percentage, now, who
        session.add(FeatureFlagAuditLog(flag_key=key, action="UPDATE", user_id=who, timestamp=now))
