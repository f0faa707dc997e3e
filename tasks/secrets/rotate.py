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

A step can fail after it took effect: ``ALTER ROLE`` ran but the answer was lost, the
store applied the new version and then timed out. So a failure is never taken at its word:
the rotator finds out what happened before it acts (:meth:`PostgresRotator._settle`). It
tries the candidate passwords (the store's current one, the pending one, the one rotated
from) and makes the store hold whichever logs in, with check-and-set; only then does the
pending entry go. When the store cannot be read or written, the role is put back on the
stored password and the pending entry stays, so that the next run settles whatever the
store finally did. When no candidate logs in, the rotation is *stuck*: the pending entry is
marked so, the secret shows ``error`` with reason ``stuck``, an audit event and
``fleet_secret_rotations_total{outcome="stuck"}`` are written, and nothing retries until a
person has looked (``fleet secrets unstick PATH``). A database that cannot be reached at all
settles nothing: the pending entry stays for the next run.
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
STUCK = "stuck"  # set on a pending entry when no candidate password logs in
REQUIRED = ("username", "password", "host", "port", "database")
ROTATORS = ("postgres", "postgres-alternating")
# postgres-alternating: the secret also holds the other role of the pair and its password.
ALTERNATE = ("alternate_username", "alternate_password")

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


def _credentials(
    path: str, data: Mapping[str, str], required: tuple[str, ...] = REQUIRED
) -> dict[str, str]:
    missing = [name for name in required if not data.get(name)]
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


def logs_in(connect: Connect, creds: Mapping[str, str], password: str) -> bool | None:
    """True when ``password`` logs in, False when the server refuses it, None when the
    server cannot be asked (down, unreachable: nothing can be concluded)."""
    try:
        with connect(**_conninfo(creds, password)) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        return False if _refused(exc) else None
    return True


def _refused(exc: psycopg.Error) -> bool:
    """An authentication failure (SQLSTATE class 28): libpq reports it at connection time
    with no SQLSTATE, only the server's message."""
    state = getattr(exc, "sqlstate", None) or ""
    text = str(exc)
    return (
        state.startswith("28")
        or "password authentication failed" in text
        or ("role" in text and "does not exist" in text)
    )


def set_password(connect: Connect, creds: Mapping[str, str], login: str, password: str) -> None:
    """As the role itself (logged in with ``login``), make its password ``password``."""
    statement = sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
        sql.Identifier(creds["username"]), sql.Literal(scram_verifier(password))
    )
    with connect(**_conninfo(creds, login), autocommit=True) as connection:
        connection.execute(statement)


@dataclass(frozen=True)
class Plan:
    """One rotation: which role's password changes, logged in with what, and the secret's
    data once it is done (the pending entry holds that data, so that a crash can be
    settled from it alone)."""

    role: dict[str, str]  # credentials of the role whose password changes
    login: str  # its password now
    finished: dict[str, str]  # the secret's next version (its password: the fresh one)


def single_user(current: Mapping[str, str], fresh: str) -> Plan:
    """The secret's own role gets a new password: every client must re-read the secret."""
    return Plan(dict(current), current["password"], {**current, "password": fresh})


def alternating_users(current: Mapping[str, str], fresh: str) -> Plan:
    """The role *not* in use gets a new password and becomes the secret's current one; the
    one in use is untouched, so connections and pools holding it keep working until the
    rotation after this one (AWS Secrets Manager's alternating users)."""
    other = {**current, "username": current["alternate_username"]}
    finished = {
        **current,
        "username": current["alternate_username"],
        "password": fresh,
        "alternate_username": current["username"],
        "alternate_password": current["password"],
    }
    return Plan(other, current["alternate_password"], finished)


def password_of(data: Mapping[str, str], username: str) -> str | None:
    """The password ``data`` (a secret's version) records for ``username``."""
    if data.get("username") == username:
        return data.get("password")
    if data.get("alternate_username") == username:
        return data.get("alternate_password")
    return None


class PostgresRotator:
    def __init__(
        self,
        store: SecretStore,
        audit: Audit,
        connect: Connect = psycopg.connect,
        alternating: bool = False,
    ) -> None:
        self.store = store
        self.audit = audit
        self.connect = connect
        self.alternating = alternating

    def rotate(self, path: str) -> Rotated:
        outcome = self._settle(path)
        if outcome == "resumed":
            return Rotated(path, self.store.metadata(path).current_version, "resumed")
        meta = self.store.metadata(path)
        base = meta.current_version
        required = REQUIRED + ALTERNATE if self.alternating else REQUIRED
        current = _credentials(path, self.store.read(path, base), required)
        fresh = new_password()
        plan = (alternating_users if self.alternating else single_user)(current, fresh)
        role = plan.role
        pending = {**plan.finished, "base_version": str(base)}
        try:
            self._step(
                path, "create", base, lambda: self.store.write(STAGING + path, pending, cas=0)
            )
            self._step(
                path, "set", base, lambda: set_password(self.connect, role, plan.login, fresh)
            )
            try:
                self._step(path, "test", base, lambda: self._must_log_in(role, fresh))
            except RotationFailed:
                self._roll_back(path, role, plan.login, fresh)  # set, but of no use
                raise
            self._step(
                path, "finish", base, lambda: self.store.write(path, plan.finished, cas=base)
            )
        except RotationFailed:
            if self._recover(path, role, plan.login, fresh) != "resumed":
                raise
            # The step had taken effect after all (its answer was lost): finished forward.
        self._drop_pending(path)
        version = self.store.metadata(path).current_version
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

    def _recover(self, path: str, role: Mapping[str, str], old: str, fresh: str) -> str | None:
        """After a failed step: settle what really happened. When the store cannot be read
        or written to settle it, put the role back on the stored password and keep the
        pending entry for the next run (which settles whatever the store finally did)."""
        try:
            return self._settle(path)
        except RotationStuck:
            raise
        except Exception:  # the store (or the database) cannot answer now
            self._roll_back(path, role, old, fresh)
            return None

    def _must_log_in(self, creds: Mapping[str, str], password: str) -> None:
        if not logs_in(self.connect, creds, password):
            raise FleetError("cannot log in with the new password")

    def _roll_back(self, path: str, role: Mapping[str, str], old: str, fresh: str) -> None:
        """Make the role's password ``old`` (the stored one) again, whichever logs in."""
        if logs_in(self.connect, role, old):
            self.audit("secret_rotation_rolled_back", path, needed=False)
            return
        for login in (fresh, old):
            try:
                set_password(self.connect, role, login, old)
            except psycopg.Error:
                continue
            if logs_in(self.connect, role, old):
                self.audit("secret_rotation_rolled_back", path, needed=True)
                return
        self.audit("secret_rotation_rollback_failed", path)

    def unstick(self, path: str) -> str:
        """After a person has fixed a stuck rotation: once the stored password logs in, the
        pending entry goes and rotations resume. Raises FleetError saying what to do."""
        try:
            self.store.read(STAGING + path)
        except SecretNotFound:
            return f"{path}: no rotation is pending"
        stored = _credentials(path, self.store.read(path))
        works = logs_in(self.connect, stored, stored["password"])
        if works is None:
            raise FleetError(f"{path}: the database cannot be reached to try the stored password")
        if not works:
            raise FleetError(
                f"{path}: the stored password does not log in: give the role that password "
                "(ALTER ROLE), or store the one that works (fleet secrets put), then run again"
            )
        self._drop_pending(path)
        self.audit("secret_rotation_unstuck", path)
        return f"{path}: the stored password logs in; the pending rotation is cleared"

    def _drop_pending(self, path: str) -> None:
        with contextlib.suppress(SecretNotFound):
            self.store.delete(STAGING + path)

    def _settle(self, path: str) -> str | None:
        """Find out which password the changed role has, make the store hold it, then drop
        the pending entry. None: nothing pending. "resumed": the role has the pending
        password and the store now holds the pending entry's data. "undone": the store
        already holds the role's password. Raises RotationStuck when no candidate logs in,
        RotationFailed when the database cannot be asked, store errors when the store cannot
        answer (the entry then stays).

        The pending entry is the secret's data once rotated: its ``username`` is the role
        whose password changes (the secret's own; or, alternating, the other of the pair).
        """
        try:
            pending = self.store.read(STAGING + path)
        except SecretNotFound:
            return None
        if pending.get(STUCK):
            raise RotationStuck(f"{path}: {pending[STUCK]}")
        finished = {k: v for k, v in pending.items() if k != "base_version"}
        user = pending["username"]
        meta = self.store.metadata(path)
        stored = _credentials(path, self.store.read(path, meta.current_version))
        # (name, password of the changed role, the secret's data that goes with it)
        candidates = [
            ("stored", password_of(stored, user), stored),
            ("pending", pending["password"], finished),
        ]
        base = pending.get("base_version")
        if base and base.isdigit() and int(base) != meta.current_version:
            with contextlib.suppress(SecretNotFound):
                before = self.store.read(path, int(base))
                candidates.append(("rotated from", password_of(before, user), before))
        role = {**stored, "username": user}
        unknown = False
        for name, password, data in candidates:
            works = logs_in(self.connect, role, password) if password else False
            if works is None:
                unknown = True
                continue
            if not works:
                continue
            if password != password_of(stored, user):
                # The role has a password the store does not hold: store its secret.
                self.store.write(path, data, cas=meta.current_version)
            self._drop_pending(path)
            settled = "resumed" if password == pending["password"] else "undone"
            self.audit(f"secret_rotation_{settled}", path, password_of=name)
            return settled
        if unknown:
            raise RotationFailed("settle", "the database cannot be reached to try the passwords")
        reason = "stuck: neither the stored nor the pending password logs in"
        with contextlib.suppress(Exception):  # the mark only spares the next run a retry
            self.store.write(STAGING + path, {**pending, STUCK: reason})
        self.audit("secret_rotation_stuck", path)
        raise RotationStuck(f"{path}: {reason}")


def _reason(exc: BaseException) -> str:
    """A short reason without any value: the class, and for psycopg its SQLSTATE."""
    state = getattr(exc, "sqlstate", None)
    if state:
        return f"{type(exc).__name__} (SQLSTATE {state})"
    # The fleet's own errors (store errors included) are written to carry no value.
    message = str(exc) if isinstance(exc, FleetError | TransientError) else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
