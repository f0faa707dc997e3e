"""A throwaway PostgreSQL cluster that checks passwords (scram-sha-256).

The machine's PostgreSQL trusts every local connection, so it cannot show that a password
works, or no longer does. This one is made with ``initdb`` in a temporary directory and
started with ``pg_ctl`` on a free port, as a non-root user (root cannot run PostgreSQL:
as root, the ``postgres`` system user runs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.helpers import free_port

SUPERUSER_PASSWORD = "cluster-admin-pw-7731"


def _bindir() -> Path:
    done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    configured = Path(done.stdout.strip())
    if (configured / "initdb").exists():
        return configured
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise FileNotFoundError("initdb not found (install postgresql)")
    return found[-1].parent


@dataclass(frozen=True)
class Cluster:
    host: str
    port: int

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host=self.host,
            port=self.port,
            dbname="postgres",
            user="postgres",
            password=SUPERUSER_PASSWORD,
            autocommit=True,
        )

    def logs_in(self, user: str, password: str) -> bool:
        try:
            with psycopg.connect(
                host=self.host,
                port=self.port,
                dbname="postgres",
                user=user,
                password=password,
                connect_timeout=5,
            ) as connection:
                connection.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True


@contextmanager
def password_cluster() -> Iterator[Cluster]:
    bindir = _bindir()
    root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if root else []
    directory = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
    data, log, pwfile = directory / "data", directory / "server.log", directory / "pw"
    pwfile.write_text(SUPERUSER_PASSWORD + "\n")
    if root:
        shutil.chown(directory, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    port = free_port()
    try:
        subprocess.run(
            [
                *run_as,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *run_as,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-o",
                f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        yield Cluster("127.0.0.1", port)
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(directory, ignore_errors=True)
