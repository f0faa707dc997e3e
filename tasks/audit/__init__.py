"""``audit.ship``: every audit event delivered to every sink, in order, tamper-evident.

For each sink (one shipper per sink at a time), each source table is read in id order
from the sink's cursor, rendered (sensitive values replaced by an HMAC), chained, delivered,
and only then are the cursor and the chain head (with the file sink's committed offset)
written, in one transaction. A sink that fails holds its cursors and is marked down with
the kind of failure, while the other sinks ship; one that refuses is stopped until an
operator resumes it. Checkpoints sign the chain head periodically.

Here: the job, the keys and the sinks' configuration. :mod:`tasks.audit.shipper` ships one
sink (adopting, fencing, batches, checkpoints); :mod:`tasks.audit.reading` reads a source in
pages; :mod:`tasks.audit.sinks` writes (file, HTTP); :mod:`tasks.audit.events` renders and
chains; :mod:`tasks.audit.verify` checks an archive.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from tasks.audit.events import Protector
from tasks.audit.shipper import Shipper
from tasks.audit.sinks import (
    AuditSink,
    FileSink,
    HttpSink,
    _FileConfig,
    _HttpConfig,
    load_sinks,
)
from workers.fleetstate import AUDIT_SINK, audit_backlog, prune_health
from workers.jobs import PermanentError, RetryPolicy, job
from workers.locks import job_locks
from workers.logs import get_logger, register_secret
from workers.runtime import Runtime, runtime
from workers.settings import FleetSettings

log = get_logger("fleet.audit")

TIME_LIMIT = 300


def hmac_key(settings: FleetSettings, engine: Engine | None = None) -> bytes:
    """The fleet's one audit key: FLEET_AUDIT_HMAC_KEY; else the field ``key`` of the secret
    at FLEET_AUDIT_HMAC_KEY_PATH in the fleet's secret store (Vault/OpenBao or the embedded
    one); else, on SQLite only (one host, as the embedded default), a key generated once into
    FLEET_HOME/audit-hmac.key. On a shared database each host would make its own key, and
    checkpoints and digests would disagree between hosts: refused."""
    if settings.audit_hmac_key is not None:
        key = settings.audit_hmac_key.get_secret_value()
    elif settings.audit_hmac_key_path is not None:
        from tasks.secrets.stores import open_store

        if engine is None:
            raise PermanentError("FLEET_AUDIT_HMAC_KEY_PATH: the secret store needs the database")
        data = open_store(settings, engine).read(settings.audit_hmac_key_path)
        if not data.get("key"):
            raise PermanentError(
                f"FLEET_AUDIT_HMAC_KEY_PATH: the secret {settings.audit_hmac_key_path} has no "
                "field 'key'"
            )
        key = data["key"]
    elif not settings.sqlalchemy_url.startswith("sqlite"):
        raise PermanentError(
            "audit shipping on a shared database needs one key for the whole fleet: set "
            "FLEET_AUDIT_HMAC_KEY, or FLEET_AUDIT_HMAC_KEY_PATH (a secret with a field 'key')"
        )
    else:
        path = settings.home / "audit-hmac.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(os.urandom(32).hex())
        key = path.read_text().strip()
    register_secret(key)
    return key.encode()


def old_hmac_keys(settings: FleetSettings) -> list[bytes]:
    """FLEET_AUDIT_HMAC_KEYS: keys used before the current one (verification only)."""
    if settings.audit_hmac_keys is None:
        return []
    keys = [k.strip() for k in settings.audit_hmac_keys.get_secret_value().split(",")]
    for key in keys:
        register_secret(key)
    return [k.encode() for k in keys if k]


def sink_directory(settings: FleetSettings, config: _FileConfig) -> Path:
    directory = Path(config.path)
    return (directory if directory.is_absolute() else settings.home / directory).resolve()


def open_sink(settings: FleetSettings, config: _FileConfig | _HttpConfig) -> AuditSink:
    if isinstance(config, _FileConfig):
        return FileSink(config.name, sink_directory(settings, config), config.max_bytes)
    return HttpSink(config, settings.audit_sink_headers.get(config.name, {}))


def check_sink_paths(settings: FleetSettings, sinks: Sequence[_FileConfig | _HttpConfig]) -> None:
    """Two file sinks in one directory, or one inside another's, would write two chains
    into one archive (and each take the other's records for its own): refused."""
    seen: list[tuple[str, Path]] = []
    for config in sinks:
        if not isinstance(config, _FileConfig):
            continue
        directory = sink_directory(settings, config)
        for name, other in seen:
            if (
                directory == other
                or directory.is_relative_to(other)
                or other.is_relative_to(directory)
            ):
                raise PermanentError(
                    f"audit sinks {name} and {config.name} share {min(directory, other)}: "
                    "give each file sink a directory of its own"
                )
        seen.append((config.name, directory))


def record_backlog(rt: Runtime, sinks: list[str], now: datetime) -> dict[str, dict[str, int]]:
    """Events not yet shipped, per sink and source."""
    with rt.sessions() as session:
        waiting, _lag = audit_backlog(session, sinks, now)
    backlog: dict[str, dict[str, int]] = {}
    for (source, sink), count in waiting.items():
        backlog.setdefault(sink, {})[source] = count
    return backlog


def ship(rt: Runtime, sink: str | None = None, budget_seconds: float = 240.0) -> dict[str, Any]:
    """Ship the audit tables to every configured sink (or one), until caught up."""
    config = load_sinks(rt.settings.configuration_dir)
    check_sink_paths(rt.settings, config.sinks)
    chosen = [c for c in config.sinks if sink is None or c.name == sink]
    if sink is not None and not chosen:
        raise PermanentError(
            f"audit.ship: no sink named {sink!r} "
            f"(configured: {', '.join(c.name for c in config.sinks)})"
        )
    key = hmac_key(rt.settings, rt.engine)
    protector = (
        Protector(key, config.sensitive_keys)
        if config.sensitive_keys is not None
        else Protector(key)
    )
    deadline = time.monotonic() + budget_seconds
    results: dict[str, Any] = {}
    if sink is None:
        with rt.sessions.begin() as session:
            prune_health(session, AUDIT_SINK, [c.name for c in config.sinks])
    for sink_config in chosen:
        target = open_sink(rt.settings, sink_config)
        lock_ttl = rt.settings.audit_lock_ttl
        with job_locks(rt.redis, [f"audit:{target.name}"], ttl=lock_ttl) as busy:
            if busy is not None:
                results[target.name] = {"skipped": "another shipper holds this sink"}
                continue
            results[target.name] = (
                Shipper(
                    rt,
                    target,
                    protector,
                    key,
                    rt.settings.audit_batch_size,
                    deadline,
                    old_hmac_keys(rt.settings),
                )
                .ship()
                .as_dict()
            )
    backlog = record_backlog(rt, [c.name for c in chosen], datetime.now(UTC))
    for name, outcome in results.items():
        if isinstance(outcome, dict) and "shipped" in outcome:
            outcome["backlog"] = backlog.get(name, {})
    log.info("audit_shipped", sinks=results)
    return {"sinks": results}


@job(
    "audit.ship",
    queue="audit",
    soft_time_limit=TIME_LIMIT - 30,
    time_limit=TIME_LIMIT,
    retry=RetryPolicy(max_retries=2, backoff_base=5, backoff_cap=60),
)
def ship_audit(*, sink: str | None = None, budget_seconds: float = 240.0) -> dict[str, Any]:
    """Ship the audit tables to every configured sink (or one), until caught up."""
    return ship(runtime(), sink, budget_seconds)
