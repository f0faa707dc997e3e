"""The platform's side of a configuration change, as the reference describes it, for tests:
a reader that reads through the Redis cache (``ConfigurationManager.get_configuration``:
the cache entry, else the active row at the scope asked for, cached for 300 s, else the
fallback chain tenant, service, environment, global, uncached) and a watcher that
``PSUBSCRIBE``s ``config_changes:*`` and, on each event, reads the changed row from the
database at once, as a hot-reload handler would."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import Engine, select

from workers.configstore import active_clauses
from workers.db.models import Configuration

FALLBACK = {
    "tenant": [("service", None), ("environment", None), ("global", None)],
    "service": [("environment", None), ("global", None)],
    "environment": [("global", None)],
    "global": [],
}


def reference_cache_key(key: str, environment: str, scope: str, tenant_id: str | None) -> str:
    """``_build_cache_key`` as the reference writes it: ``":".join(["config:", ...])``."""
    parts = ["config:", environment, scope, key]
    if tenant_id:
        parts.append(tenant_id)
    return ":".join(parts)


def _row(engine: Engine, key: str, environment: str, scope: str, tenant_id: str | None) -> Any:
    with engine.connect() as connection:
        value = connection.execute(
            select(Configuration.value).where(*active_clauses(key, environment, scope, tenant_id))
        ).scalar()
    return None if value is None else json.loads(value)


@dataclass
class Reader:
    engine: Engine
    cache: redis.Redis

    def get(self, key: str, environment: str, scope: str, tenant_id: str | None = None) -> Any:
        cache_key = reference_cache_key(key, environment, scope, tenant_id)
        cached = self.cache.get(cache_key)
        if cached:
            return json.loads(cached)
        value = _row(self.engine, key, environment, scope, tenant_id)
        if value is not None:
            self.cache.set(cache_key, json.dumps(value), ex=300)  # the reference's setex
            return value
        for fallback_scope, fallback_tenant in FALLBACK[scope]:
            value = _row(self.engine, key, environment, fallback_scope, fallback_tenant)
            if value is not None:
                return value
        return None


@dataclass
class Watcher:
    """Collects every change event with the value the database held when it arrived."""

    url: str
    engine: Engine
    events: list[dict[str, Any]] = field(default_factory=list)
    _arrived: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self._client = redis.Redis.from_url(self.url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(**{"config_changes:*": self._on_message})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _on_message(self, message: dict[str, Any]) -> None:
        event = json.loads(message["data"])
        event["channel"] = message["channel"].decode()
        event["value_seen"] = _row(
            self.engine, event["key"], event["environment"], event["scope"], event["tenant_id"]
        )
        with self._arrived:
            self.events.append(event)
            self._arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.events) >= count, timeout):
                raise AssertionError(f"{len(self.events)} change events, not {count}")
            return list(self.events)

    def take(self, count: int) -> list[dict[str, Any]]:
        events = self.wait_for(count)
        with self._arrived:
            del self.events[:count]
        return events[:count]

    def close(self) -> None:
        self._thread.stop()
        self._thread.join(timeout=5)
        self._pubsub.close()
        self._client.close()
