"""Rotating PostgreSQL credentials kept in a secret store, without ever losing the working one.

The four steps of AWS Secrets Manager, on a KV store:

1. **create**: a fresh password is written as a *pending* entry, with check-and-set, at a
   staging path (``.rotation/<path>``) that the platform's readers never read. It is the
   write-ahead record of the rotation: a crash after it is found by the next run.
2. **set**: the role's password is changed (``ALTER ROLE``, identifier and literal quoted
   by psycopg's ``sql``; the literal is a SCRAM verifier, so no server log ever sees the
   password in clear), connected as the role itself with its current password.
3. **test**: a new connection logs in with the new password.
4. **finish**: the new password becomes the secret's next version (check-and-set on the
   version rotated from), and the pending entry goes.

Any failure rolls the role back to the stored password when the role had changed, so the
store and the database agree on a working password. A pending entry found at the start
(a crash) is finished if the new password works, undone if the stored one does.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets as tokens
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from tasks.secrets.stores import SecretNotFound, SecretStore
from workers.errors import FleetError
from workers.jobs import PermanentError, TransientError
from workers.logs import register_secret

STAGING = ".rotation/"
REQUIRED = ("username", "password", "host", "port", "database")
ROTATORS = ("postgres",)

Connect = Callable[..., Any]
Audit = Callable[..., None]


class RotationFailed(TransientError):
    """A rotation step failed; the store and the database were left agreeing. Retried
    with a fresh password."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"step {step}: {reason}")
        self.step = step


class RotationStuck(FleetError):
    """Neither the stored nor the pending password logs in: a person must look."""


@dataclass(frozen=True)
class Rotated:
    path: str
    version: int
    outcome: str  # rotated | resumed | undone_then_rotated


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier for ``password`` (RFC 5802/7677), so that
    ``ALTER ROLE ... PASSWORD`` carries a hash, never the password itself."""
    salt = tokens.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def new_password() -> str:
    password = tokens.token_urlsafe(32)  # 256 bits; URL-safe: no quoting surprises anywhere
    register_secret(password)
    return password


def _credentials(path: str, data: Mapping[str, str]) -> dict[str, str]:
    missing = [name for name in REQUIRED if not data.get(name)]
    if missing:
        raise PermanentError(f"{path}: not PostgreSQL credentials (missing {', '.join(missing)})")
    return dict(data)


def _conninfo(creds: Mapping[str, str], password: str) -> dict[str, Any]:
    return {
        "host": creds["host"],
        "port": int(creds["port"]),
        "dbname": creds["database"],
        "user": creds["username"],
        "password": password,
        "connect_timeout": 5,
        "sslmode": creds.get("sslmode", "prefer"),
    }


def logs_in(connect: Connect, creds: Mapping[str, str], password: str) -> bool:
    try:
        with connect(**_conninfo(creds, password)) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def set_password(connect: Connect, creds: Mapping[str, str], login: str, password: str) -> None:
    """As the role itself (logged in with ``login``), make its password ``password``."""
    statement = sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
        sql.Identifier(creds["username"]), sql.Literal(scram_verifier(password))
    )
    with connect(**_conninfo(creds, login), autocommit=True) as connection:
        connection.execute(statement)


class PostgresRotator:
    def __init__(
        self, store: SecretStore, audit: Audit, connect: Connect = psycopg.connect
    ) -> None:
        self.store = store
        self.audit = audit
        self.connect = connect

    def rotate(self, path: str) -> Rotated:
        outcome = self._resolve_pending(path)
        if outcome == "resumed":
            return Rotated(path, self.store.metadata(path).current_version, "resumed")
        meta = self.store.metadata(path)
        base = meta.current_version
        current = _credentials(path, self.store.read(path, base))
        fresh = new_password()
        self._step(
            path,
            "create",
            base,
            lambda: self.store.write(
                STAGING + path, {**current, "password": fresh, "base_version": str(base)}, cas=0
            ),
        )
        try:
            self._step(
                path,
                "set",
                base,
                lambda: set_password(self.connect, current, current["password"], fresh),
            )
        except RotationFailed:
            self._drop_pending(path)
            raise
        self._guarded(path, base, current, fresh, "test", lambda: self._must_log_in(current, fresh))
        version = self._guarded(
            path,
            base,
            current,
            fresh,
            "finish",
            lambda: self.store.write(path, {**current, "password": fresh}, cas=base),
        )
        self._drop_pending(path)
        self.audit("secret_rotated", path, version=version, previous_version=base)
        return Rotated(path, version, "undone_then_rotated" if outcome == "undone" else "rotated")

    def _step(self, path: str, step: str, base: int, work: Callable[[], Any]) -> Any:
        try:
            result = work()
        except Exception as exc:  # any failure of a step is that step failing
            self.audit(
                "secret_rotation_step",
                path,
                step=step,
                ok=False,
                base_version=base,
                error=type(exc).__name__,
            )
            raise RotationFailed(step, _reason(exc)) from None
        self.audit("secret_rotation_step", path, step=step, ok=True, base_version=base)
        return result

    def _guarded(
        self,
        path: str,
        base: int,
        current: Mapping[str, str],
        fresh: str,
        step: str,
        work: Callable[[], Any],
    ) -> Any:
        """A step after the role changed: on failure, roll the role back first."""
        try:
            return self._step(path, step, base, work)
        except RotationFailed:
            self._roll_back(path, current, fresh)
            self._drop_pending(path)
            raise

    def _must_log_in(self, creds: Mapping[str, str], password: str) -> None:
        if not logs_in(self.connect, creds, password):
            raise FleetError("cannot log in with the new password")

    def _roll_back(self, path: str, current: Mapping[str, str], fresh: str) -> None:
        """Make the role's password the stored one again, whichever now logs in."""
        old = current["password"]
        if logs_in(self.connect, current, old):
            self.audit("secret_rotation_rolled_back", path, needed=False)
            return
        for login in (fresh, old):
            try:
                set_password(self.connect, current, login, old)
            except psycopg.Error:
                continue
            if logs_in(self.connect, current, old):
                self.audit("secret_rotation_rolled_back", path, needed=True)
                return
        self.audit("secret_rotation_stuck", path)
        raise RotationStuck(f"{path}: rollback failed: neither password can restore the role")

    def _drop_pending(self, path: str) -> None:
        with contextlib.suppress(SecretNotFound):
            self.store.delete(STAGING + path)

    def _resolve_pending(self, path: str) -> str | None:
        """A rotation that a crash interrupted: finish it or undo it."""
        try:
            pending = self.store.read(STAGING + path)
        except SecretNotFound:
            return None
        meta = self.store.metadata(path)
        stored = _credentials(path, self.store.read(path, meta.current_version))
        if pending.get("password") == stored["password"]:
            self._drop_pending(path)  # it finished; only the clean-up was missing
            self.audit("secret_rotation_resumed", path, version=meta.current_version)
            return "resumed"
        if logs_in(self.connect, stored, pending["password"]):
            base = int(pending.get("base_version", meta.current_version))
            finished = {k: v for k, v in pending.items() if k != "base_version"}
            version = self.store.write(path, finished, cas=base)
            self._drop_pending(path)
            self.audit("secret_rotation_resumed", path, version=version)
            return "resumed"
        if logs_in(self.connect, stored, stored["password"]):
            self._drop_pending(path)
            self.audit("secret_rotation_undone", path, version=meta.current_version)
            return "undone"
        raise RotationStuck(f"{path}: neither the stored nor the pending password logs in")


def _reason(exc: BaseException) -> str:
    """A short reason without any value: the class, and for psycopg its SQLSTATE."""
    state = getattr(exc, "sqlstate", None)
    if state:
        return f"{type(exc).__name__} (SQLSTATE {state})"
    # The fleet's own errors (store errors included) are written to carry no value.
    message = str(exc) if isinstance(exc, FleetError | TransientError) else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
