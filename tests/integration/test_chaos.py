"""The chaos run as CI runs it: a short run under faults must hold every invariant, and the
same run against a deliberately broken build must fail, naming the evidence and the seed.
(Longer runs and their figures: README, "Reliability".)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_ADMIN_URL
from tests.helpers import ROOT, installed


@pytest.fixture
def chaos_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    installed("redis-server", "redis-server")
    name = f"fleet_chaos_{uuid.uuid4().hex[:8]}"
    admin = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "CHAOS_"))}
    env.update(
        CHAOS_PG_ADMIN_URL=admin.render_as_string(hide_password=False),
        CHAOS_DATABASE=name,
        CHAOS_HOME=str(tmp_path / "chaos"),
    )
    yield env
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def chaos(env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chaos"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.timeout(600)
def test_a_short_chaos_run_holds_every_invariant(chaos_env: dict[str, str]) -> None:
    seed = os.environ.get("CHAOS_SEED", "7")
    done = chaos({**chaos_env, "CHAOS_SECONDS": "45", "CHAOS_SEED": seed}, timeout=540)
    assert done.returncode == 0, done.stdout[-6000:] + "\n--- stderr:\n" + done.stderr[-2000:]
    last = [line for line in done.stdout.splitlines() if line.startswith("chaos: ")][-1]
    assert "(0 lost, 0 doubled)" in last and ", 0 twice," in last, last
    assert "chain verified" in last
    assert "  fault " in done.stdout  # faults were injected, each logged with its time


@pytest.mark.timeout(600)
def test_a_broken_build_fails_with_its_evidence_and_seed(chaos_env: dict[str, str]) -> None:
    """The fleet drops its dead letters (FLEET_CHAOS_BREAK=dead_letters, set only here):
    the run must fail, say which invariant and show the evidence, and give the seed."""
    env = {**chaos_env, "CHAOS_SECONDS": "15", "CHAOS_SEED": "3", "CHAOS_BREAK": "dead_letters"}
    done = chaos(env, timeout=540)
    assert done.returncode == 1, (done.stdout + done.stderr)[-6000:]
    assert re.search(r"^chaos: FAILED \(.*impressions", done.stdout, re.MULTILINE), done.stdout
    assert "dead letters: 0, expected" in done.stdout
    assert "replay with CHAOS_SEED=3 CHAOS_SECONDS=15 CHAOS_BREAK=dead_letters" in done.stdout
