"""Drift detection at size: three environments of 100,000 keys, 1% drift of every kind.

Prints
- the core comparison (desired vs live per environment, between environments, schemas,
  rules), which must stay under a second;
- the reference document's ``validate_environment_consistency``, re-implemented here as
  it is written (nested dicts, ``_flatten_keys``, ``_get_nested_value`` per key), which
  does only the cross-environment part, and the ratio;
- end to end on PostgreSQL (`FLEET_BENCH_POSTGRES_URL`, default the local server): read
  300,000 live rows and three YAML files, compare, store findings; first run and a
  steady-state run.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from tasks.drift.diff import DriftInput, detect
from tasks.drift.rules import Rules
from tasks.drift.sources import LiveRow, read_live, unflatten

ENVIRONMENTS = ("development", "staging", "production")
KEYS = 100_000
DRIFT = KEYS // 100


def _value(rng: random.Random, i: int) -> Any:
    choice = i % 5
    if choice == 0:
        return rng.randint(0, 10_000)
    if choice == 1:
        return f"value-{rng.randint(0, 10**6)}"
    if choice == 2:
        return rng.random() < 0.5
    if choice == 3:
        return [f"item-{j}" for j in range(i % 3)]
    return round(rng.random(), 3)


def build() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Desired and live flat configurations with 1% drift of every kind per environment."""
    rng = random.Random(7)
    base = {f"section{i % 40}.group{i % 997}.key{i}": _value(rng, i) for i in range(KEYS)}
    desired: dict[str, dict[str, Any]] = {}
    live: dict[str, dict[str, Any]] = {}
    keys = list(base)
    for n, env in enumerate(ENVIRONMENTS):
        flat = dict(base)
        offset = n * 5 * DRIFT
        for key in keys[offset : offset + DRIFT]:  # missing_in_environment
            del flat[key]
        for key in keys[offset + DRIFT : offset + 2 * DRIFT]:  # type_mismatch
            flat[key] = str(flat[key]) if not isinstance(flat[key], str) else 1
        desired[env] = flat
        actual = dict(flat)
        window = keys[offset + 2 * DRIFT : offset + 5 * DRIFT]
        for key in window[:DRIFT]:  # missing_in_live
            actual.pop(key, None)
        for key in window[DRIFT : 2 * DRIFT]:  # value_changed
            actual[key] = "changed"
        for i in range(DRIFT):  # unexpected_in_live
            actual[f"extra.group{i % 97}.key{i}"] = i
        live[env] = actual
    names = [f"svc_{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(100)]
    for env in ENVIRONMENTS:  # schema_violation: a services section, 10% of it broken
        for i, name in enumerate(names):
            desired[env][f"services.{name}.replicas"] = 0 if i % 10 == 0 else 3
            live[env][f"services.{name}.replicas"] = desired[env][f"services.{name}.replicas"]
    return desired, live


def naive_consistency(  # noqa: C901 - as the reference writes it
    dev: dict[str, Any], staging: dict[str, Any], prod: dict[str, Any]
) -> int:
    """The reference's validate_environment_consistency, as written there."""

    def flatten_keys(config: dict[str, Any], prefix: str = "") -> list[str]:
        keys = []
        for key, value in config.items():
            full = f"{prefix}.{key}" if prefix else key
            keys.append(full)
            if isinstance(value, dict):
                keys.extend(flatten_keys(value, full))
        return keys

    def nested(config: dict[str, Any], path: str) -> Any:
        value: Any = config
        for key in path.split("."):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                return None
        return value

    warnings = []
    dev_keys, staging_keys, prod_keys = (set(flatten_keys(c)) for c in (dev, staging, prod))
    for key in dev_keys | staging_keys | prod_keys:
        present = [k for k in (dev_keys, staging_keys, prod_keys) if key in k]
        if len(present) < 3:
            warnings.append(key)
    for key in dev_keys & staging_keys & prod_keys:
        types = {type(nested(dev, key)), type(nested(staging, key)), type(nested(prod, key))}
        if len(types) > 1:
            warnings.append(key)
    return len(warnings)


def _best(runs: int, work: Any) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(runs):
        began = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - began)
    return best, result


def core() -> float:
    desired, live = build()
    rows = [
        LiveRow(i, env, key, orjson.dumps(value).decode(), False, False, None)
        for env in ENVIRONMENTS
        for i, (key, value) in enumerate(live[env].items())
    ]
    now = datetime.now(UTC)
    parse_seconds, state = _best(3, lambda: read_live(rows))

    def compare() -> list[Any]:
        data = DriftInput(
            desired=desired, live=state, rules=Rules(), environments=list(ENVIRONMENTS)
        )
        return detect(data, now)

    seconds, findings = _best(5, compare)
    trees = [unflatten(desired[env]) for env in ENVIRONMENTS]
    naive_seconds, naive_count = _best(3, lambda: naive_consistency(*trees))
    kinds: dict[str, int] = {}
    for finding in findings:
        kinds[finding.kind] = kinds.get(finding.kind, 0) + 1
    print(f"input: {len(ENVIRONMENTS)} environments x {KEYS:,} keys, 1% drift of every kind")
    print(f"findings: {len(findings):,} {dict(sorted(kinds.items()))}")
    print(f"core comparison (all kinds):           {seconds:.3f} s (best of 5)")
    print(f"parsing 300,000 live JSON values:      {parse_seconds:.3f} s")
    print(
        f"reference validate_environment_consistency (cross-environment only): "
        f"{naive_seconds:.3f} s, {naive_count:,} warnings"
    )
    print(
        f"ratio reference/ours:                  {naive_seconds / seconds:.1f}x "
        "(ours also does desired-vs-live, schemas and rules)"
    )
    return seconds


def end_to_end() -> None:
    from sqlalchemy import create_engine, insert, text

    from tasks.drift import _run
    from workers.db import make_engine, migrate
    from workers.db.models import Configuration
    from workers.runtime import Runtime, install
    from workers.settings import FleetSettings

    admin_url = os.environ.get(
        "FLEET_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    name = f"fleet_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        engine = make_engine(url)
        migrate(engine)
        desired, live = build()
        now = datetime.now(UTC)
        with engine.begin() as connection:
            for env in ENVIRONMENTS:
                rows = [
                    {
                        "key": k,
                        "value": orjson.dumps(v).decode(),
                        "meta": "{}",
                        "encrypted": False,
                        "sensitive": False,
                        "schema_version": "1.0",
                        "environment": env,
                        "scope": "environment",
                        "tenant_id": None,
                        "active": True,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for k, v in live[env].items()
                ]
                connection.execute(insert(Configuration), rows)
        engine.dispose()
        with tempfile.TemporaryDirectory() as directory:
            config = Path(directory)
            (config / "environments").mkdir()
            for env in ENVIRONMENTS:
                (config / "environments" / f"{env}.yaml").write_text(
                    yaml.dump(unflatten(desired[env]), Dumper=getattr(yaml, "CDumper", yaml.Dumper))
                )
            bare = _git_remote(config, Path(directory) / "desired.git")
            redis_url = "redis://127.0.0.1:6379/14"
            stale = _seed_cache(redis_url, live)
            settings = FleetSettings(
                database_url=url,
                redis_url=redis_url,
                config_dir=config,
                home=Path(directory) / "home",
                drift_git_url=str(bare),
                drift_git_ref="main",
            )
            rt = install(Runtime(settings))
            print(
                f"desired from a Git checkout ({bare.name}, fetched every run), live from "
                f"PostgreSQL, {CACHE_ENTRIES:,} entries in the platform's cache ({stale:,} stale)"
            )
            for label in ("first run (every finding new)", "steady state (nothing changed)"):
                began = time.perf_counter()
                summary = _run(rt, list(ENVIRONMENTS), True, 10)
                seconds = time.perf_counter() - began
                print(
                    f"end to end on PostgreSQL, {label}: {seconds:.2f} s "
                    f"({summary['findings_total']:,} findings, {summary['new']:,} new)"
                )
            rt.close()
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


CACHE_ENTRIES = 100_000


def _git_remote(config: Path, bare: Path) -> Path:
    """The desired files committed to a local bare repository."""
    import subprocess

    who = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b"}
    env = {**os.environ, **who, "GIT_COMMITTER_EMAIL": "b@b"}
    for args, cwd in (
        (["init", "--quiet", "-b", "main"], config),
        (["add", "."], config),
        (["commit", "--quiet", "-m", "desired"], config),
        (["init", "--quiet", "--bare", str(bare)], config),
        (["push", "--quiet", str(bare), "main"], config),
    ):
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)
    return bare


def _seed_cache(redis_url: str, live: dict[str, dict[str, Any]]) -> int:
    """The platform's cache: CACHE_ENTRIES live values under its keys, 1 % of them stale."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    entries = [(env, key, value) for env in ENVIRONMENTS for key, value in live[env].items()]
    stale = 0
    pipe = client.pipeline(transaction=False)
    for index, (env, key, value) in enumerate(entries[:CACHE_ENTRIES]):
        if index % 100 == 0:
            value, stale = ["stale"], stale + 1
        pipe.set(f"config::{env}:environment:{key}", orjson.dumps(value))
        if index % 10_000 == 0:
            pipe.execute()
    pipe.execute()
    client.close()
    return stale


def main() -> None:
    from workers.logs import configure_logging

    configure_logging(level="ERROR")  # the first run opens 15,000 findings
    seconds = core()
    print("core under 1 s:", "yes" if seconds < 1 else "NO")
    end_to_end()


if __name__ == "__main__":
    main()
