"""Configuration writes announced as the platform's configuration manager announces them:
cache entries invalidated and the change event published, only once the write committed,
to a reader and a watcher that work as the reference's ``get_configuration`` and its
``config_changes:*`` subscribers do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis
import structlog
from prometheus_client import REGISTRY
from sqlalchemy import Engine, select

from tests.helpers import free_port
from tests.platform_reader import Reader, Watcher, reference_cache_key
from workers.configstore import delete_configuration, set_configuration
from workers.db import make_engine, migrate
from workers.db.engine import make_session_factory as session_factory
from workers.db.models import Configuration

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    made = make_engine(postgres_url)
    migrate(made)
    yield made
    made.dispose()


@pytest.fixture
def watcher(redis_url: str, engine: Engine) -> Iterator[Watcher]:
    watching = Watcher(redis_url, engine)
    yield watching
    watching.close()


def announce_failures() -> float:
    return REGISTRY.get_sample_value("fleet_config_announce_failures_total") or 0.0


def write(engine: Engine, notify: redis.Redis | None, value: object, **where: str) -> None:
    with session_factory(engine).begin() as session:
        set_configuration(
            session,
            key="k.v",
            value=value,
            environment="staging",
            user_id="u",
            now=NOW,
            notify=notify,
            **where,  # type: ignore[arg-type]
        )


def test_a_write_is_announced_after_its_commit_and_stale_entries_are_gone(
    engine: Engine, redis_client: redis.Redis, watcher: Watcher
) -> None:
    reader = Reader(engine, redis_client)
    write(engine, redis_client, 1)
    assert watcher.take(1)[0]["value_seen"] == 1
    assert reader.get("k.v", "staging", "environment") == 1  # cached by the reader
    redis_client.set("config:staging:environment:k.v", "1")  # the spelling
    redis_client.set("config:x:staging:environment:k.v", "1")  # the reference's pattern
    write(engine, redis_client, 2)
    [event] = watcher.take(1)
    assert {k: event[k] for k in ("key", "environment", "scope", "tenant_id", "channel")} == {
        "key": "k.v",
        "environment": "staging",
        "scope": "environment",
        "tenant_id": None,
        "channel": "config_changes:staging",
    }
    assert event["timestamp"] == "2026-12-01T12:00:00"  # naive UTC, as utcnow().isoformat()
    assert event["value_seen"] == 2  # the database had it when the event arrived
    assert redis_client.keys("config:*") == []
    assert reader.get("k.v", "staging", "environment") == 2


def test_a_tenant_override_and_its_removal_reach_the_tenants_reader(
    engine: Engine, redis_client: redis.Redis, watcher: Watcher
) -> None:
    reader = Reader(engine, redis_client)
    write(engine, redis_client, 1)
    write(engine, redis_client, 5, scope="tenant", tenant_id="acme")
    watcher.take(2)
    assert reader.get("k.v", "staging", "tenant", "acme") == 5
    assert redis_client.get(reference_cache_key("k.v", "staging", "tenant", "acme")) == b"5"
    with session_factory(engine).begin() as session:
        assert delete_configuration(
            session,
            key="k.v",
            environment="staging",
            scope="tenant",
            tenant_id="acme",
            user_id="u",
            now=NOW,
            notify=redis_client,
        )
    [event] = watcher.take(1)
    assert (event["scope"], event["tenant_id"], event["value_seen"]) == ("tenant", "acme", None)
    assert reader.get("k.v", "staging", "tenant", "acme") == 1  # falls back, never stale


def test_a_rolled_back_write_announces_nothing(
    engine: Engine, redis_client: redis.Redis, watcher: Watcher
) -> None:
    with pytest.raises(RuntimeError), session_factory(engine).begin() as session:
        set_configuration(
            session,
            key="k.v",
            value=1,
            environment="staging",
            user_id="u",
            now=NOW,
            notify=redis_client,
        )
        raise RuntimeError("the caller fails before its commit")
    with pytest.raises(AssertionError):
        watcher.wait_for(1, timeout=0.5)
    write(engine, redis_client, 3)  # the next transaction announces only its own
    assert [e["value_seen"] for e in watcher.take(1)] == [3]


def test_redis_down_after_the_commit_keeps_the_write_and_says_so(
    engine: Engine, redis_client: redis.Redis
) -> None:
    down = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    before = announce_failures()
    with structlog.testing.capture_logs() as logs:
        write(engine, down, 7)
    assert announce_failures() == before + 1
    [line] = [entry for entry in logs if entry["event"] == "config_change_not_announced"]
    assert (line["key"], line["environment"], line["log_level"]) == ("k.v", "staging", "error")
    assert "7" not in json.dumps({k: v for k, v in line.items() if k != "error"})
    with session_factory(engine)() as session:
        row = session.scalars(select(Configuration).where(Configuration.active)).one()
        assert json.loads(row.value or "") == 7


def test_a_commit_refused_by_the_server_announces_nothing(
    engine: Engine, redis_client: redis.Redis, watcher: Watcher
) -> None:
    """The server refuses the COMMIT itself (a deferred constraint, checked only then):
    an announcement made any earlier would tell readers about a value that never was."""
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE FUNCTION refuse_13() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.value = '13' THEN RAISE EXCEPTION 'thirteen refused at commit'; END IF; "
            "RETURN NULL; END $$"
        )
        connection.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER refuse_13 AFTER INSERT ON configurations "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_13()"
        )
    with pytest.raises(Exception, match="thirteen refused at commit"):
        write(engine, redis_client, 13)
    with pytest.raises(AssertionError):
        watcher.wait_for(1, timeout=0.5)
    write(engine, redis_client, 14)
    assert [e["value_seen"] for e in watcher.take(1)] == [14]
