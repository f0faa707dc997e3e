"""Writing feature flags the way the platform's flag service does.

The fleet changes a flag in one place: a guarded rollout moving its
``rollout_percentage``. Each change leaves exactly what the platform's
``update_feature_flag`` would: the ``feature_flags`` row updated with ``updated_at`` and
``updated_by``, a ``feature_flag_audit_log`` row (action ``UPDATE``, metadata
``{"flag_data": ...}``, the whole flag as written) in the caller's transaction; then, only
once that transaction has committed, the invalidation message ``{flag_key, environment}``
published on ``flag_cache_invalidation``, on which every service instance drops its cached
flag. A rolled-back transaction publishes nothing; a publish that fails is logged and
counted, the services' 30-second cache TTL bounding how long they keep the old flag.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session

from workers.db.models import FeatureFlag, FeatureFlagAuditLog

log = structlog.get_logger(__name__)

CHANNEL = "flag_cache_invalidation"


def user_hash(user_id: str, salt: str) -> float:
    """Where a user falls in a rollout, 0 to 100, as the platform's flag service hashes
    them: MD5 of ``user_id:salt`` (the flag key, or a rule's variant), first 8 hex digits,
    modulo 10,000, in hundredths."""
    digest = hashlib.md5(f"{user_id}:{salt}".encode(), usedforsecurity=False).hexdigest()
    return (int(digest[:8], 16) % 10000) / 100


_PENDING = "fleet_flag_changes"  # session.info: invalidations to publish after the commit


@dataclass(frozen=True)
class FlagChange:
    flag_key: str
    environment: str

    def message(self) -> str:
        return json.dumps({"flag_key": self.flag_key, "environment": self.environment})


def publish(client: redis.Redis, changes: list[FlagChange]) -> int:
    """Publish each invalidation; returns how many could not be published."""
    from monitoring import metrics

    failed = 0
    for change in changes:
        try:
            client.publish(CHANNEL, change.message())
        except redis.RedisError as exc:
            failed += 1
            metrics.CONFIG_ANNOUNCE_FAILURES.inc()
            log.error(
                "flag_change_not_announced",
                flag_key=change.flag_key,
                environment=change.environment,
                error=f"{type(exc).__name__}: {exc}",
            )
    return failed


@event.listens_for(Session, "after_commit")
def _publish_committed(session: Session) -> None:
    pending = session.info.pop(_PENDING, [])
    for client, change in pending:
        publish(client, [change])


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


def _iso(when: datetime | None) -> str | None:
    return when.astimezone(UTC).replace(tzinfo=None).isoformat() if when else None


def flag_data(flag: FeatureFlag) -> dict[str, Any]:
    """The flag as the platform's audit metadata holds it (``asdict(flag)``)."""
    return {
        "key": flag.key,
        "name": flag.name,
        "description": flag.description,
        "flag_type": flag.flag_type,
        "enabled": flag.enabled,
        "default_variant": flag.default_variant,
        "variants": json.loads(flag.variants or "[]"),
        "targeting_rules": json.loads(flag.targeting_rules or "[]"),
        "created_at": _iso(flag.created_at),
        "created_by": flag.created_by,
        "updated_at": _iso(flag.updated_at),
        "updated_by": flag.updated_by,
        "environment": flag.environment,
        "rollout_percentage": flag.rollout_percentage,
        "rollout_start_time": _iso(flag.rollout_start_time),
        "rollout_end_time": _iso(flag.rollout_end_time),
        "impression_count": flag.impression_count,
        "last_evaluated": _iso(flag.last_evaluated),
    }


def treatment_of(flag: FeatureFlag) -> str | None:
    """The variant a percentage rollout gives: the platform's first non-default one."""
    for variant in json.loads(flag.variants or "[]"):
        name = variant.get("name") if isinstance(variant, dict) else None
        if name and name != flag.default_variant:
            return str(name)
    return None


def update_flag(
    session: Session,
    flag: FeatureFlag,
    *,
    user_id: str,
    now: datetime,
    notify: redis.Redis | None,
    **metadata: Any,
) -> None:
    """Record the caller's changes to ``flag`` as the platform's ``update_feature_flag``
    does: who and when, the audit row, the invalidation once committed."""
    flag.updated_at, flag.updated_by = now, user_id
    session.flush()
    session.add(
        FeatureFlagAuditLog(
            flag_key=flag.key,
            action="UPDATE",
            user_id=user_id,
            timestamp=now,
            meta=json.dumps({"flag_data": flag_data(flag), **metadata}),
        )
    )
    if notify is not None:
        session.info.setdefault(_PENDING, []).append(
            (notify, FlagChange(flag.key, flag.environment))
        )
