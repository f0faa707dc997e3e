"""A rotation check over 10,000 secrets: the embedded SQL store on PostgreSQL, and Vault
through hvac against the HTTP double (tests/vault_double.py, with 2 ms per request to stand
in for a real server's work). Printed: secrets per second; for Vault, one request at a time
(the naive way) and with the check's concurrency, as a ratio.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from cryptography.fernet import Fernet
from sqlalchemy import create_engine, insert, text

ROOT = Path(__file__).resolve().parent.parent
COUNT = 10_000
ADMIN_URL = os.environ.get(
    "FLEET_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _check(store: object) -> tuple[float, int]:
    from tasks.secrets import all_metadata, statuses

    began = time.perf_counter()
    metas = all_metadata(store)  # type: ignore[arg-type]
    found = statuses(metas, [], datetime.now(UTC))
    return time.perf_counter() - began, len(found)


def sql_store() -> None:
    from tasks.secrets.stores import SqlStore
    from workers.db import make_engine, migrate
    from workers.db.models import FleetSecret, FleetSecretVersion

    name = f"fleet_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        engine = make_engine(ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
        migrate(engine)
        key = Fernet.generate_key()
        fernet, now = Fernet(key), datetime.now(UTC)
        token = fernet.encrypt(b'{"password": "x"}').decode()
        with engine.begin() as connection:
            connection.execute(
                insert(FleetSecret),
                [
                    {
                        "path": f"platform/svc/s{i}",
                        "current_version": 1,
                        "custom_metadata": {"rotation_interval_days": "30"},
                        "created_time": now,
                        "updated_time": now,
                    }
                    for i in range(COUNT)
                ],
            )
            connection.execute(
                insert(FleetSecretVersion),
                [
                    {
                        "path": f"platform/svc/s{i}",
                        "version": 1,
                        "ciphertext": token,
                        "created_time": now,
                        "destroyed": False,
                    }
                    for i in range(COUNT)
                ],
            )
        seconds, checked = _check(SqlStore(engine, key, "platform"))
        print(
            f"SQL store (PostgreSQL): {checked:,} secrets in {seconds:.2f} s = "
            f"{checked / seconds:,.0f} secrets/s"
        )
        engine.dispose()
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def vault() -> None:
    import subprocess

    import tasks.secrets as job
    from tasks.secrets.stores import VaultStore
    from workers.settings import FleetSettings

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.vault_double",
            "--port",
            str(port),
            "--seed",
            str(COUNT),
            "--latency",
            "0.002",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        settings = FleetSettings(vault_addr=f"http://127.0.0.1:{port}", vault_token="hvs.bench")
        sample = 1_000
        one_at_a_time = VaultStore(settings)
        began = time.perf_counter()
        for path in one_at_a_time.list_paths()[:sample]:
            one_at_a_time.metadata(path)
        naive = sample / (time.perf_counter() - began)
        seconds, checked = _check(VaultStore(settings))
        rate = checked / seconds
        print(
            f"Vault via hvac (double in its own process, 2 ms per request): {checked:,} "
            f"secrets in {seconds:.2f} s = {rate:,.0f} secrets/s, "
            f"{job.METADATA_THREADS} requests in flight"
        )
        print(
            f"  one request at a time (first {sample:,}): {naive:,.0f} secrets/s; "
            f"ratio {rate / naive:.1f}x"
        )
    finally:
        server.terminate()
        server.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    from workers.logs import configure_logging

    configure_logging(level="ERROR")
    sql_store()
    vault()


if __name__ == "__main__":
    main()
