"""Where secrets live: one interface, two implementations.

- :class:`VaultStore`: HashiCorp Vault's KV v2 engine through hvac (token or AppRole,
  namespace, TLS settings, timeouts);
- :class:`SqlStore`: the embedded store (the default with no Vault settings), versions and
  custom metadata with KV v2's meaning, values Fernet-encrypted at rest, in PostgreSQL or
  SQLite.

Paths are relative to the managed prefix. Errors are :class:`StoreUnavailable` (cannot be
reached, sealed, refusing: worth retrying later), :class:`StoreRefused` (an invalid
request: never retried), :class:`SecretNotFound` and :class:`CasMismatch`. No error message
ever contains a value.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import orjson
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import CursorResult, Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tasks.secrets.model import SecretMetadata, VersionInfo
from workers.db.models import FleetSecret, FleetSecretVersion
from workers.errors import FleetError
from workers.jobs import PermanentError, TransientError
from workers.logs import register_secret
from workers.settings import FleetSettings


class StoreUnavailable(TransientError):
    """The store cannot answer now (unreachable, sealed, refusing): try again later."""


class SecretNotFound(FleetError):
    pass


class CasMismatch(FleetError):
    """Check-and-set failed: the secret changed since it was read."""


class StoreRefused(PermanentError):
    """The store refused the request as invalid (Vault's 400: a metadata limit, a bad
    parameter): retrying cannot help. The message is the server's, which names fields,
    never values."""


class SecretStore(Protocol):
    name: str

    def health(self) -> None:
        """Raise StoreUnavailable unless the store can serve reads and writes."""

    def list_paths(self) -> list[str]:
        """Every secret under the managed prefix, recursively."""

    def metadata(self, path: str) -> SecretMetadata: ...

    def read(self, path: str, version: int | None = None) -> dict[str, str]:
        """The secret's data (latest version by default). Registers the values as secret."""

    def write(self, path: str, data: Mapping[str, str], cas: int | None = None) -> int:
        """A new version; with ``cas`` only if the current version is ``cas`` (0: the
        secret must not exist yet). Returns the new version."""

    def set_custom_metadata(self, path: str, custom: Mapping[str, str]) -> None: ...

    def delete(self, path: str) -> None:
        """Remove the secret and all its versions (used for rotation staging entries)."""


T = TypeVar("T")


def _register(data: Mapping[str, Any]) -> dict[str, str]:
    values = {str(k): str(v) for k, v in data.items()}
    for value in values.values():
        register_secret(value)
    return values


def _now() -> datetime:
    return datetime.now(UTC)


def _deleted(deletion_time: datetime | None) -> bool:
    """KV v2 semantics: a version with a deletion time still to come is readable."""
    return deletion_time is not None and deletion_time <= _now()


# The embedded store -------------------------------------------------------------------


def load_or_create_key(settings: FleetSettings) -> bytes:
    """The Fernet key: from FLEET_SECRET_KEY, else FLEET_HOME/secret.key (made once, 0600)."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    path = settings.home / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key)
    return Path(path).read_bytes().strip()


class SqlStore:
    name = "sql"

    def __init__(self, engine: Engine, key: bytes, prefix: str = "") -> None:
        self._engine = engine
        self._fernet = Fernet(key)
        self._prefix = prefix.strip("/")

    def _full(self, path: str) -> str:
        return f"{self._prefix}/{path}" if self._prefix else path

    def _relative(self, full: str) -> str:
        return full[len(self._prefix) + 1 :] if self._prefix else full

    def health(self) -> None:
        try:
            with self._engine.connect() as connection:
                connection.execute(select(1))
        except Exception as exc:
            raise StoreUnavailable(f"embedded secret store: {type(exc).__name__}") from None

    def list_paths(self) -> list[str]:
        query = select(FleetSecret.path)
        if self._prefix:
            query = query.where(FleetSecret.path.startswith(self._prefix + "/"))
        with self._engine.connect() as connection:
            return sorted(self._relative(row[0]) for row in connection.execute(query))

    def metadata(self, path: str) -> SecretMetadata:
        with Session(self._engine) as session:
            secret = session.get(FleetSecret, self._full(path))
            if secret is None:
                raise SecretNotFound(f"no secret at {path}")
            versions = session.scalars(
                select(FleetSecretVersion).where(FleetSecretVersion.path == secret.path)
            ).all()
            return SecretMetadata(
                path=path,
                current_version=secret.current_version,
                versions={
                    v.version: VersionInfo(v.version, v.created_time, v.deletion_time, v.destroyed)
                    for v in versions
                },
                custom_metadata=dict(secret.custom_metadata or {}),
            )

    def all_metadata(self) -> list[SecretMetadata]:
        """Every secret's metadata in two queries (the check's bulk path)."""
        with Session(self._engine) as session:
            secrets = session.scalars(select(FleetSecret)).all()
            versions = session.execute(
                select(
                    FleetSecretVersion.path,
                    FleetSecretVersion.version,
                    FleetSecretVersion.created_time,
                    FleetSecretVersion.deletion_time,
                    FleetSecretVersion.destroyed,
                )
            ).all()
        by_path: dict[str, dict[int, VersionInfo]] = {}
        for path, version, created, deleted, destroyed in versions:
            by_path.setdefault(path, {})[version] = VersionInfo(
                version, created, deleted, destroyed
            )
        prefix = self._prefix + "/" if self._prefix else ""
        return [
            SecretMetadata(
                self._relative(s.path),
                s.current_version,
                by_path.get(s.path, {}),
                dict(s.custom_metadata or {}),
            )
            for s in secrets
            if s.path.startswith(prefix)
        ]

    def read(self, path: str, version: int | None = None) -> dict[str, str]:
        with Session(self._engine) as session:
            secret = session.get(FleetSecret, self._full(path))
            if secret is None:
                raise SecretNotFound(f"no secret at {path}")
            row = session.get(FleetSecretVersion, (secret.path, version or secret.current_version))
        if row is None or row.destroyed or _deleted(row.deletion_time):
            raise SecretNotFound(f"{path}: version {version or secret.current_version} is gone")
        try:
            data = orjson.loads(self._fernet.decrypt(row.ciphertext.encode()))
        except InvalidToken:
            raise FleetError(
                f"{path}: cannot decrypt (is FLEET_SECRET_KEY the right key?)"
            ) from None
        return _register(data)

    def write(self, path: str, data: Mapping[str, str], cas: int | None = None) -> int:
        now = _now()
        ciphertext = self._fernet.encrypt(orjson.dumps(dict(data))).decode()
        full = self._full(path)
        try:
            with Session(self._engine) as session, session.begin():
                secret = session.get(FleetSecret, full, with_for_update=True)
                current = secret.current_version if secret is not None else 0
                if cas is not None and cas != current:
                    raise CasMismatch(
                        f"{path}: check-and-set expected version {cas}, found {current}"
                    )
                version = current + 1
                if secret is None:
                    session.add(
                        FleetSecret(
                            path=full,
                            current_version=version,
                            custom_metadata={},
                            created_time=now,
                            updated_time=now,
                        )
                    )
                else:
                    result = session.execute(
                        update(FleetSecret)
                        .where(FleetSecret.path == full, FleetSecret.current_version == current)
                        .values(current_version=version, updated_time=now)
                    )
                    changed = cast("CursorResult[Any]", result).rowcount
                    if changed != 1:
                        raise CasMismatch(f"{path}: changed while writing")
                session.add(
                    FleetSecretVersion(
                        path=full,
                        version=version,
                        ciphertext=ciphertext,
                        created_time=now,
                        destroyed=False,
                    )
                )
        except IntegrityError:
            raise CasMismatch(f"{path}: written concurrently") from None
        return version

    def set_custom_metadata(self, path: str, custom: Mapping[str, str]) -> None:
        with Session(self._engine) as session, session.begin():
            secret = session.get(FleetSecret, self._full(path))
            if secret is None:
                raise SecretNotFound(f"no secret at {path}")
            secret.custom_metadata = {str(k): str(v) for k, v in custom.items()}
            secret.updated_time = _now()

    def delete(self, path: str) -> None:
        with Session(self._engine) as session, session.begin():
            full = self._full(path)
            for row in session.scalars(
                select(FleetSecretVersion).where(FleetSecretVersion.path == full)
            ):
                session.delete(row)
            secret = session.get(FleetSecret, full)
            if secret is not None:
                session.delete(secret)


# Vault KV v2 ----------------------------------------------------------------------------


class VaultStore:
    """KV v2 through hvac. One hvac client per thread (its HTTP session is not shared).

    The token is kept alive for a long-running worker: a renewable token is renewed
    (renew-self) once half its TTL has passed; a token file is read again when it changes
    (Vault Agent rewrites it); a token that worked and is then refused (403: expired or
    revoked) makes an AppRole login again, or the token file be read again, once, before
    the error is reported. Every write uses check-and-set, so mounts with ``cas_required``
    work and a concurrent change is a :class:`CasMismatch`, never silently overwritten.
    """

    name = "vault"

    def __init__(
        self, settings: FleetSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        assert settings.vault_addr is not None
        self._settings = settings
        self._mount = settings.vault_mount
        self._prefix = settings.vault_path_prefix.strip("/")
        self._clock = clock
        self._local = threading.local()

    # The token's lifecycle ------------------------------------------------------------

    def _client(self) -> Any:
        session: _Session | None = getattr(self._local, "session", None)
        if session is None or session.file_changed(self._settings.vault_token_file):
            session = self._local.session = self._connect()
        elif session.renew_due(self._clock()):
            self._renew(session)
        return session.client

    def _connect(self) -> _Session:
        import hvac

        settings = self._settings
        verify: bool | str = (
            settings.vault_verify
            if isinstance(settings.vault_verify, bool)
            else str(settings.vault_verify)
        )
        client = hvac.Client(
            url=settings.vault_addr,
            token=settings.vault_token_value(),
            namespace=settings.vault_namespace,
            verify=verify,
            timeout=settings.vault_timeout,
        )
        session = _Session(client, _file_stamp(settings.vault_token_file))
        if settings.vault_role_id and settings.vault_secret_id is not None:
            with self._errors("AppRole login"):
                answer = client.auth.approle.login(
                    role_id=settings.vault_role_id,
                    secret_id=settings.vault_secret_id.get_secret_value(),
                )
            register_secret(client.token)
            auth = answer.get("auth") or {}
            session.lease(auth.get("lease_duration"), auth.get("renewable"), self._clock())
        elif client.token:
            register_secret(client.token)
            with contextlib.suppress(StoreUnavailable, SecretNotFound):
                with self._errors("token lookup"):
                    data = client.auth.token.lookup_self()["data"]
                session.lease(data.get("ttl"), data.get("renewable"), self._clock())
        return session

    def _renew(self, session: _Session) -> None:
        """Renew the token; a failure is left for the next request to meet (and report)."""
        try:
            with self._errors("token renewal"):
                auth = session.client.auth.token.renew_self()["auth"]
        except (StoreUnavailable, SecretNotFound, StoreRefused):
            session.renew_at = None  # do not try again before the token is replaced
            return
        session.lease(auth.get("lease_duration"), auth.get("renewable"), self._clock())

    def _call(self, what: str, operation: Callable[[Any], T]) -> T:
        """``operation(client)`` with errors mapped; a refused token that had worked is
        replaced once (AppRole login again, or the token file read again)."""
        import hvac.exceptions as vault_errors

        session_before = getattr(self._local, "session", None)
        client = self._client()
        try:
            with self._errors(what, reraise=(vault_errors.Forbidden,)):
                return operation(client)
        except vault_errors.Forbidden:
            replaceable = self._settings.vault_role_id or self._settings.vault_token_file
            if not replaceable or session_before is None or not session_before.worked:
                raise StoreUnavailable(f"vault: {what}: permission denied (403)") from None
        self._local.session = None  # log in again, or read the token file again
        with self._errors(what):
            return operation(self._client())

    @contextlib.contextmanager
    def _errors(self, what: str, reraise: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
        """hvac and network errors as the store's errors, never with a value in them."""
        import hvac.exceptions as vault_errors
        import requests

        try:
            yield
        except reraise:
            raise
        except vault_errors.InvalidPath:
            raise SecretNotFound(f"vault: {what}: not found") from None
        except vault_errors.InvalidRequest as exc:
            reason = "; ".join(str(e) for e in (getattr(exc, "errors", None) or [])) or "400"
            if "check-and-set parameter did not match" in reason:
                raise CasMismatch(f"vault: {what}: check-and-set did not match") from None
            raise StoreRefused(f"vault: {what}: refused (400): {reason}") from None
        except vault_errors.Forbidden:
            raise StoreUnavailable(f"vault: {what}: permission denied (403)") from None
        except vault_errors.VaultDown:
            raise StoreUnavailable(f"vault: {what}: Vault is sealed (503)") from None
        except (vault_errors.VaultError, requests.RequestException) as exc:
            raise StoreUnavailable(f"vault: {what}: {type(exc).__name__}") from None
        session = getattr(self._local, "session", None)
        if session is not None:
            session.worked = True

    # KV v2 -------------------------------------------------------------------------------

    def _full(self, path: str) -> str:
        return f"{self._prefix}/{path}" if self._prefix else path

    def health(self) -> None:
        status = self._call("health", lambda c: c.sys.read_health_status(method="GET"))
        body = status if isinstance(status, dict) else status.json()
        if body.get("sealed"):
            raise StoreUnavailable("vault: Vault is sealed")
        self._call("token", lambda c: c.auth.token.lookup_self())

    def list_paths(self) -> list[str]:
        found: list[str] = []
        pending = [""]
        while pending:
            directory = pending.pop()
            full = self._full(directory)

            def listing(client: Any, full: str = full) -> list[str]:
                answer = client.secrets.kv.v2.list_secrets(path=full, mount_point=self._mount)
                return list(answer["data"]["keys"])

            try:
                keys = self._call(f"list {directory or '/'}", listing)
            except SecretNotFound:
                continue  # an empty directory: Vault answers 404
            for key in keys:
                (pending if key.endswith("/") else found).append(f"{directory}{key}")
        return sorted(found)

    def metadata(self, path: str) -> SecretMetadata:
        """A key with metadata and no version (``current_version`` 0, what custom metadata
        set before any write creates) has no current version: its status says so."""
        data = self._call(
            f"metadata {path}",
            lambda c: c.secrets.kv.v2.read_secret_metadata(
                path=self._full(path), mount_point=self._mount
            )["data"],
        )
        versions = {
            int(number): VersionInfo(
                int(number),
                vault_time(v["created_time"]) or _EPOCH,
                vault_time(v.get("deletion_time")),
                bool(v.get("destroyed")),
            )
            for number, v in (data.get("versions") or {}).items()
        }
        return SecretMetadata(
            path=path,
            current_version=int(data.get("current_version") or 0),
            versions=versions,
            custom_metadata=dict(data.get("custom_metadata") or {}),
        )

    def read(self, path: str, version: int | None = None) -> dict[str, str]:
        response = self._call(
            f"read {path}",
            lambda c: c.secrets.kv.v2.read_secret_version(
                path=self._full(path),
                version=version,
                mount_point=self._mount,
                raise_on_deleted_version=True,
            ),
        )
        return _register(response["data"]["data"])

    def write(self, path: str, data: Mapping[str, str], cas: int | None = None) -> int:
        """Always check-and-set: with no ``cas``, against the version read just before."""
        for value in data.values():
            register_secret(str(value))
        if cas is None:
            try:
                cas = self.metadata(path).current_version
            except SecretNotFound:
                cas = 0
        response = self._call(
            f"write {path}",
            lambda c: c.secrets.kv.v2.create_or_update_secret(
                path=self._full(path), secret=dict(data), cas=cas, mount_point=self._mount
            ),
        )
        return int(response["data"]["version"])

    def set_custom_metadata(self, path: str, custom: Mapping[str, str]) -> None:
        """Only ``custom_metadata`` is sent: hvac's update_metadata would also send
        ``delete_version_after=0s`` (and so reset an operator's setting); the API leaves
        the fields it is not given as they are."""
        url = f"/v1/{self._mount}/metadata/{self._full(path)}"
        body = {"custom_metadata": {str(k): str(v) for k, v in custom.items()}}
        self._call(f"metadata {path}", lambda c: c.adapter.post(url, json=body))

    def delete(self, path: str) -> None:
        self._call(
            f"delete {path}",
            lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(
                path=self._full(path), mount_point=self._mount
            ),
        )


@dataclass
class _Session:
    """One thread's client and what is known of its token."""

    client: Any
    file_stamp: tuple[int, int] | None
    renew_at: float | None = None  # monotonic time; None: not renewable, or unknown
    worked: bool = False  # a request with this token has succeeded

    def lease(self, ttl: Any, renewable: Any, now: float) -> None:
        seconds = int(ttl or 0)
        self.renew_at = now + seconds / 2 if renewable and seconds > 0 else None

    def renew_due(self, now: float) -> bool:
        return self.renew_at is not None and now >= self.renew_at

    def file_changed(self, path: Path | None) -> bool:
        return path is not None and _file_stamp(path) != self.file_stamp


def _file_stamp(path: Path | None) -> tuple[int, int] | None:
    """What tells a rewritten token file (Vault Agent renames a new file into place)."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_RFC3339 = re.compile(r"(?P<head>[^.]+?)(?:\.(?P<fraction>\d+))?(?P<zone>Z|[+-]\d\d:\d\d)")


def vault_time(text: Any) -> datetime | None:
    """Vault's time: RFC 3339 with nanoseconds (Python keeps microseconds), in UTC (``Z``)
    or the server's own offset (``last_vault_rotation``); None for empty or malformed."""
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    fraction = (match["fraction"] or "0")[:6].ljust(6, "0")
    zone = "+00:00" if match["zone"] == "Z" else match["zone"]
    try:
        parsed = datetime.fromisoformat(f"{match['head']}.{fraction}{zone}")
    except ValueError:
        return None
    return parsed.astimezone(UTC)


def open_store(settings: FleetSettings, engine: Engine) -> SecretStore:
    """Vault when FLEET_VAULT_ADDR is set, else the embedded SQL store."""
    if settings.vault_addr is not None:
        return VaultStore(settings)
    return SqlStore(engine, load_or_create_key(settings), settings.vault_path_prefix)
