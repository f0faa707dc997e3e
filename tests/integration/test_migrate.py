"""`fleet migrate` on empty PostgreSQL and SQLite databases, twice, and concurrently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from tests.helpers import run_fleet
from workers.db import head_revision, make_engine

TABLES = {
    "configurations",
    "configuration_history",
    "configuration_audit_log",
    "feature_flags",
    "feature_flag_audit_log",
    "task_runs",
    "alembic_version",
}


def _env(tmp_path: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_HOME=str(tmp_path / "home"), FLEET_DATABASE_URL=url, FLEET_LOG_FORMAT="json")
    return env


@pytest.fixture(params=["postgres", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return str(request.getfixturevalue("empty_postgres_url"))


def test_migrate_an_empty_database_twice(tmp_path: Path, empty_url: str) -> None:
    env = _env(tmp_path, empty_url)
    first = run_fleet("migrate", "--json", env=env)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary == {
        "database": summary["database"],
        "revision_before": None,
        "revision": head_revision(),
        "changed": True,
    }
    second = run_fleet("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert f"already at {head_revision()}" in second.stdout
    engine = make_engine(empty_url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_concurrent_migrations_take_turns(tmp_path: Path, empty_postgres_url: str) -> None:
    env = _env(tmp_path, empty_postgres_url)
    (tmp_path / "home").mkdir()
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "workers", "migrate"],
            env=env,
            cwd=tmp_path / "home",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    assert sum("empty -> " in out for out, _ in outputs) == 1


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path, "postgresql://postgres@127.0.0.1:1/none")
    done = run_fleet("migrate", env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("fleet: error: database unreachable:")
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_models_and_the_migrations_agree(postgres_url: str) -> None:
    """Nothing in workers/db/models.py is missing from the migrations, or the reverse."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from workers.db.models import Base

    engine = make_engine(postgres_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []
