"""Shared fixtures: real PostgreSQL and Redis, fleet subprocesses, and waiting on events.

Services: ``FLEET_TEST_POSTGRES_URL`` (an admin connection; each test gets a fresh
database cloned from a migrated template) and ``FLEET_TEST_REDIS_URL`` (a Redis database
that tests flush). Without them a test skips with the reason; with ``CI=true`` it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.helpers import ROOT, FleetProcess, service_missing
from workers.db import make_engine, migrate

POSTGRES_ADMIN_URL = os.environ.get(
    "FLEET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("FLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


# PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Any]:
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        engine.dispose()
        service_missing("PostgreSQL", exc)
    yield engine
    engine.dispose()


def _database_url(name: str) -> str:
    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop(admin: Any, name: str) -> None:
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_template(postgres_admin: Any) -> Iterator[str]:
    """A migrated database that each test's database is cloned from."""
    name = f"fleet_tmpl_{uuid.uuid4().hex[:8]}"
    with postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(_database_url(name))
    migrate(engine)
    engine.dispose()
    yield name
    _drop(postgres_admin, name)


@pytest.fixture
def empty_postgres_url(postgres_admin: Any) -> Iterator[str]:
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    with postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield _database_url(name)
    _drop(postgres_admin, name)


@pytest.fixture
def postgres_url(postgres_admin: Any, postgres_template: str) -> Iterator[str]:
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    with postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"'))
    yield _database_url(name)
    _drop(postgres_admin, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated database on each supported backend: store tests run on both."""
    fixture = "postgres_url" if request.param == "postgres" else "sqlite_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Any]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


# Redis -------------------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        service_missing("Redis", exc)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# Fleet processes ---------------------------------------------------------------------------


@pytest.fixture
def fleet_env(tmp_path: Path, redis_url: str, postgres_url: str) -> dict[str, str]:
    """Environment for fleet subprocesses on the real services, isolated in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_HOME=str(tmp_path / "home"),
        FLEET_DATABASE_URL=postgres_url,
        FLEET_REDIS_URL=redis_url,
        FLEET_LOG_FORMAT="json",
        FLEET_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),  # so that workers can load tests.jobs_for_tests
    )
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., FleetProcess]]:
    started: list[FleetProcess] = []

    def start(*args: str, env: dict[str, str], name: str | None = None) -> FleetProcess:
        Path(env["FLEET_HOME"]).mkdir(parents=True, exist_ok=True)
        log = tmp_path / f"{name or args[0]}-{len(started)}.log"
        process = FleetProcess(list(args), env, log)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(timeout=10)


# OpenBao -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def openbao() -> Iterator[Any]:
    """A real Vault-API server (OpenBao dev mode) for the whole session: see
    tests/openbao_server.py."""
    from tests.openbao_server import openbao_server

    with openbao_server() as server:
        yield server


# Rotation: a PostgreSQL cluster that checks passwords, and the secret jobs ------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from tests.password_cluster import password_cluster

    with password_cluster() as running:
        yield running


@pytest.fixture
def role(cluster: Any) -> dict[str, str]:
    from tests.secrets_app import new_role

    return new_role(cluster)
