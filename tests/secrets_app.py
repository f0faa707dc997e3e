"""The secret jobs on the test PostgreSQL and Redis with the embedded store, and a role of
a throwaway PostgreSQL cluster that checks passwords: what the rotation tests share."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import update

from tasks.secrets.stores import SecretStore, open_store
from tests.password_cluster import Cluster
from workers.celery_app import create_app
from workers.db.models import FleetSecretVersion
from workers.runtime import Runtime, install
from workers.settings import FleetSettings

POLICIES = """
policies:
  - {path: "svc/*", rotation_interval_days: 30, notify_days: 7}
"""


@contextmanager
def secrets_app(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Celery]:
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    (config / "rotation-policies.yaml").write_text(POLICIES)
    settings = FleetSettings(
        home=tmp_path, database_url=postgres_url, redis_url=redis_url, config_dir=config
    )
    rt = install(Runtime(settings))
    application = create_app(rt)
    try:
        yield application
    finally:
        application.close()
        rt.close()


def new_role(cluster: Cluster) -> dict[str, str]:
    """A login role of the cluster, as the credentials a managed secret holds."""
    name = f"app_{uuid.uuid4().hex[:8]}"
    password = f"initial-{uuid.uuid4().hex}"
    with cluster.admin() as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    return {
        "username": name,
        "password": password,
        "host": cluster.host,
        "port": str(cluster.port),
        "database": "postgres",
    }


def runtime_of(app: Celery) -> Runtime:
    rt: Runtime = app.fleet_runtime
    return rt


def store_of(app: Celery) -> SecretStore:
    rt = runtime_of(app)
    return open_store(rt.settings, rt.engine)


def backdate(app: Celery, path: str, days: int) -> None:
    with runtime_of(app).engine.begin() as connection:
        connection.execute(
            update(FleetSecretVersion)
            .where(FleetSecretVersion.path == f"platform/{path}")
            .values(created_time=datetime.now(UTC) - timedelta(days=days))
        )


def put(app: Celery, path: str, data: dict[str, str], days: int = 0, **custom: str) -> None:
    store = store_of(app)
    store.write(path, data)
    if custom:
        store.set_custom_metadata(path, custom)
    if days:
        backdate(app, path, days)


def run(app: Celery, name: str, **kwargs: Any) -> Any:
    return app.tasks[name].apply(kwargs=kwargs)


def stored_password(app: Celery, path: str = "db/app") -> str:
    return store_of(app).read(path)["password"]
