"""The fleet's settings: one typed object, read from ``FLEET_*`` variables and ``.env``.

Built once by whoever starts a process (the CLI, a test) and passed down; nothing reads
the environment at import time. A bad value stops the process at start with one line
naming the variable, and secret values never appear in that line, in ``repr`` or in logs.
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers.errors import FleetError

ENV_PREFIX = "FLEET_"

# Fields whose raw input must never be echoed back in an error message.
_SECRET_FIELDS = frozenset(
    {
        "database_url",
        "redis_url",
        "drift_cache_redis_url",
        "drift_git_url",
        "vault_token",
        "vault_secret_id",
        "secret_key",
    }
)

_DATABASE_SCHEMES = ("postgresql", "postgresql+psycopg", "sqlite")
_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
_DURATION = re.compile(r"(\d+)\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MOUNT = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class SettingsError(FleetError):
    """A setting is missing or invalid; the message is one line naming the variable."""


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def url_password(url: str | None) -> str | None:
    if not url:
        return None
    return urlsplit(url).password


class FleetSettings(BaseSettings):
    """Every knob of the fleet. Unset service settings mean the embedded default."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # Services. None means: run on the embedded default.
    database_url: str | None = Field(default=None, repr=False)
    redis_url: str | None = Field(default=None, repr=False)
    # Drift: the platform's Redis, whose configuration cache is compared with the database
    # (default: the fleet's), and whether stale entries are invalidated.
    drift_cache_redis_url: str | None = Field(default=None, repr=False)
    drift_heal_cache: bool = False
    # Drift: desired configuration from Git (any URL git understands, a local path too),
    # at a branch, tag or commit, in a folder holding environments/ and drift-rules.yaml.
    drift_git_url: str | None = Field(default=None, repr=False)
    drift_git_ref: str = "main"
    drift_git_path: str = ""
    drift_git_timeout: float = Field(default=60.0, gt=0)
    vault_addr: str | None = None
    vault_token: SecretStr | None = Field(default=None, repr=False)
    vault_token_file: Path | None = None
    vault_role_id: str | None = None  # AppRole, instead of a token
    vault_secret_id: SecretStr | None = Field(default=None, repr=False)
    vault_mount: str = "secret"
    vault_path_prefix: str = "platform"
    vault_namespace: str | None = None
    vault_verify: bool | Path = True  # False, or a CA bundle path
    vault_timeout: float = Field(default=10.0, gt=0)
    # Mounts of Vault's database secrets engine whose static roles secrets.check_rotation
    # watches (Vault rotates them; the fleet checks that it does): JSON list, ["database"].
    vault_database_mounts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Embedded secret store: the Fernet key values are encrypted with (generated into
    # FLEET_HOME/secret.key on first use when unset).
    secret_key: SecretStr | None = Field(default=None, repr=False)
    prometheus_url: str | None = None

    # Files and directories.
    home: Path = Path(".fleet")
    config_dir: Path | None = None
    schedule_file: Path | None = None

    # Observability.
    metrics_port: int = Field(default=9808, ge=0, le=65535)
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Celery.
    # None: the longest hard time limit of the loaded jobs plus VISIBILITY_MARGIN.
    visibility_timeout: int | None = Field(default=None, gt=0)
    # Worker heartbeats (seconds): how often each worker beats, and how long without a
    # beat makes its running runs lost.
    worker_heartbeat_interval: float = Field(default=15.0, gt=0)
    worker_lost_after: float = Field(default=90.0, gt=0)
    time_limits: Annotated[dict[str, tuple[float, float]], NoDecode] = Field(default_factory=dict)
    worker_concurrency: int = Field(default=2, ge=1, le=256)
    result_expires: int = Field(default=86400, gt=0)
    # More job families to load beside the fleet's own (module names).
    extra_job_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Impressions.
    impressions_batch_size: int = Field(default=5000, ge=1, le=100_000)
    impressions_future_skew: timedelta = timedelta(minutes=5)
    impressions_inflight_timeout: timedelta = timedelta(minutes=2)
    impressions_minute_retention: timedelta = timedelta(days=7)

    # Audit shipping.
    audit_hmac_key: SecretStr | None = Field(default=None, repr=False)
    # Or the path (under the managed prefix) of a secret whose field "key" is the audit key.
    audit_hmac_key_path: str | None = None
    # Keys used before the current one, comma-separated: `fleet audit verify` accepts them.
    audit_hmac_keys: SecretStr | None = Field(default=None, repr=False)
    audit_checkpoint_interval: timedelta = timedelta(hours=1)
    audit_batch_size: int = Field(default=5000, ge=1, le=100_000)
    # A shipper's lock on a sink, renewed while it lives: a killed one frees the sink in this.
    audit_lock_ttl: int = Field(default=20, ge=2, le=3600)
    # An id missing below committed ones may still be committed by a running transaction;
    # it is passed over only after this long and once every such transaction has ended.
    audit_gap_grace: timedelta = timedelta(seconds=2)
    # Per HTTP sink, headers to send (tokens live here, never in audit-sinks.yaml):
    # {"siem": {"Authorization": "Bearer ..."}}
    audit_sink_headers: Annotated[dict[str, dict[str, str]], NoDecode] = Field(
        default_factory=dict, repr=False
    )

    # Message signing (Celery's auth serializer): the fleet's private key and certificate,
    # and the store (a directory, or a glob) of certificates whose signatures are trusted.
    # All three, or none (off).
    signing_key: Path | None = None
    signing_cert: Path | None = None
    signing_cert_store: str | None = None

    # Scheduler: how long a fire's claim is remembered, and how long a replica that
    # claimed a fire has to enqueue it before another replica takes the fire over.
    fire_claim_ttl: int = Field(default=86400, gt=0)
    fire_lease_seconds: int = Field(default=30, gt=0)

    @field_validator(
        "database_url",
        "redis_url",
        "drift_cache_redis_url",
        "drift_git_url",
        "vault_addr",
        "vault_token",
        "vault_token_file",
        "vault_role_id",
        "vault_secret_id",
        "vault_namespace",
        "secret_key",
        "audit_hmac_key",
        "audit_hmac_key_path",
        "audit_hmac_keys",
        "prometheus_url",
        "config_dir",
        "schedule_file",
        "log_format",
        "signing_key",
        "signing_cert",
        "signing_cert_store",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator(
        "vault_database_mounts",
        "time_limits",
        "extra_job_modules",
        "audit_sink_headers",
        mode="before",
    )
    @classmethod
    def _json(cls, value: Any, info: ValidationInfo) -> Any:
        """JSON from the environment; empty means unset (the default), as for every
        variable, so that ``FLEET_X=`` can switch off a value ``.env`` sets."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            return [] if info.field_name in ("vault_database_mounts", "extra_job_modules") else {}
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError("not valid JSON for this setting") from None

    @field_validator(
        "impressions_future_skew",
        "impressions_inflight_timeout",
        "impressions_minute_retention",
        "audit_checkpoint_interval",
        "audit_gap_grace",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: Any) -> Any:
        """Durations as ``90s``, ``15m``, ``12h``, ``7d``, plain seconds or ISO 8601."""
        if isinstance(value, str):
            match = _DURATION.fullmatch(value.strip())
            if match:
                return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in _DATABASE_SCHEMES:
            raise ValueError(
                f"scheme must be one of {', '.join(_DATABASE_SCHEMES)} (got {scheme or 'none'!r})"
            )
        return value

    @field_validator("redis_url", "drift_cache_redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = urlsplit(value).scheme
        if scheme not in _REDIS_SCHEMES:
            raise ValueError(
                f"scheme must be one of {', '.join(_REDIS_SCHEMES)} (got {scheme or 'none'!r})"
            )
        return value

    @field_validator("vault_addr", "prometheus_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("vault_database_mounts")
    @classmethod
    def _mount_names(cls, value: list[str]) -> list[str]:
        mounts: list[str] = []
        for raw in value:
            mount = raw.strip().strip("/")
            if not _MOUNT.fullmatch(mount):
                raise ValueError(f"{raw!r} is not a mount path (letters, digits, '_.-/')")
            if mount not in mounts:
                mounts.append(mount)
        return mounts

    @field_validator("time_limits")
    @classmethod
    def _limits_ordered(
        cls, value: dict[str, tuple[float, float]]
    ) -> dict[str, tuple[float, float]]:
        for job, (soft, hard) in value.items():
            if not 0 < soft < hard:
                raise ValueError(f"{job}: soft limit {soft} must be positive and below hard {hard}")
        return value

    @model_validator(mode="after")
    def _token_file(self) -> FleetSettings:
        if self.vault_token is not None and self.vault_token_file is not None:
            raise ValueError(
                f"{ENV_PREFIX}VAULT_TOKEN and {ENV_PREFIX}VAULT_TOKEN_FILE are both set; keep one"
            )
        if self.vault_token_file is not None and not self.vault_token_file.is_file():
            raise ValueError(
                f"{ENV_PREFIX}VAULT_TOKEN_FILE: {self.vault_token_file} is not a readable file"
            )
        return self

    @model_validator(mode="after")
    def _database_mounts_need_vault(self) -> FleetSettings:
        # Refused rather than ignored: whoever set it expects Vault's database rotations to
        # be watched, and with the embedded store none would be, silently.
        if self.vault_database_mounts and self.vault_addr is None:
            raise ValueError(
                f"{ENV_PREFIX}VAULT_DATABASE_MOUNTS needs {ENV_PREFIX}VAULT_ADDR "
                "(the embedded secret store has no database secrets engine)"
            )
        return self

    @model_validator(mode="after")
    def _signing_all_or_nothing(self) -> FleetSettings:
        given = {
            "SIGNING_KEY": self.signing_key,
            "SIGNING_CERT": self.signing_cert,
            "SIGNING_CERT_STORE": self.signing_cert_store,
        }
        missing = [ENV_PREFIX + name for name, value in given.items() if value is None]
        if missing and len(missing) < len(given):
            raise ValueError(
                f"message signing needs {', '.join(ENV_PREFIX + n for n in given)}: "
                f"{', '.join(missing)} missing"
            )
        for name in ("signing_key", "signing_cert"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: {path} is not a readable file")
        return self

    @property
    def signing(self) -> bool:
        return self.signing_key is not None

    @model_validator(mode="after")
    def _lost_after_spans_beats(self) -> FleetSettings:
        if self.worker_lost_after < 2 * self.worker_heartbeat_interval:
            raise ValueError(
                f"{ENV_PREFIX}WORKER_LOST_AFTER ({self.worker_lost_after:g}s) must be at least "
                f"twice {ENV_PREFIX}WORKER_HEARTBEAT_INTERVAL "
                f"({self.worker_heartbeat_interval:g}s), or a slow beat marks live runs lost"
            )
        return self

    # Derived values -------------------------------------------------------------------

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def embedded_secrets(self) -> bool:
        return self.vault_addr is None

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL in the form SQLAlchemy wants (psycopg 3 for PostgreSQL)."""
        if self.database_url is None:
            return f"sqlite:///{(self.home / 'fleet.db').resolve()}"
        if self.database_url.startswith("postgresql://"):
            return "postgresql+psycopg://" + self.database_url[len("postgresql://") :]
        return self.database_url

    @property
    def configuration_dir(self) -> Path:
        """``FLEET_CONFIG_DIR``, or the sample configuration that ships with the fleet."""
        if self.config_dir is not None:
            return self.config_dir
        return Path(__file__).resolve().parent / "sample_config"

    def vault_token_value(self) -> str | None:
        if self.vault_token is not None:
            return self.vault_token.get_secret_value()
        if self.vault_token_file is not None:
            return self.vault_token_file.read_text().strip()
        return None

    def secret_values(self) -> list[str]:
        """Values that must never reach logs, metrics, errors or results in clear."""
        found = [
            url_password(self.database_url),
            url_password(self.redis_url),
            url_password(self.drift_cache_redis_url),
            url_password(self.drift_git_url),
        ]
        with contextlib.suppress(OSError):
            found.append(self.vault_token_value())
        for secret in (
            self.vault_secret_id,
            self.secret_key,
            self.audit_hmac_key,
            self.audit_hmac_keys,
        ):
            if secret is not None:
                found.append(secret.get_secret_value())
        for headers in self.audit_sink_headers.values():
            found.extend(headers.values())
        return [value for value in found if value]

    def describe(self) -> dict[str, Any]:
        """What an operator may see: every setting, with secrets masked."""
        return {
            "database": mask_url(self.sqlalchemy_url),
            "redis": mask_url(self.redis_url) if self.redis_url else "embedded",
            "vault": self.vault_addr or "embedded SQL secret store",
            "vault_database_mounts": ", ".join(self.vault_database_mounts) or "none",
            "prometheus": self.prometheus_url or "not configured",
            "config_dir": str(self.configuration_dir),
            "home": str(self.home),
            "metrics_port": self.metrics_port,
        }


def _describe_error(error: Any) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not field:
        return message
    variable = ENV_PREFIX + field.upper()
    if field in _SECRET_FIELDS or error["type"] == "value_error":
        return f"{variable}: {message}"
    return f"{variable}={error.get('input')!r}: {message}"


def load_settings(**overrides: Any) -> FleetSettings:
    """Build the settings once, from the environment (and ``.env``) plus ``overrides``.

    Raises :class:`SettingsError` with one line naming the first bad variable.
    """
    try:
        return FleetSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more)" if more else ""
        raise SettingsError(_describe_error(first) + suffix) from None
    except ValueError as exc:  # a settings source that cannot parse its input (bad JSON)
        match = re.search(r'field "(\w+)"', str(exc))
        if match is None:
            raise SettingsError(str(exc).strip().splitlines()[0]) from None
        variable = ENV_PREFIX + match.group(1).upper()
        raise SettingsError(f"{variable}: not valid JSON for this setting") from None
