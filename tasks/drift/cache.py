"""The platform's configuration cache against its database: ``stale_cache`` findings.

The platform's ``get_configuration`` caches the value it read at the scope asked for, for
300 s, under ``config:{environment}:{scope}:{key}[:{tenant}]`` (its ``_build_cache_key``
spells it with a doubled colon, ``config::...``; both are read here). An entry whose value
is not the active row's (compared as drift compares JSON; encrypted rows by the checksum in
their metadata, since the platform caches the decrypted value), or whose row is gone, is
stale: a writer skipped the invalidation, or lost it. Entries are read with ``SCAN`` in
batches, never ``KEYS``, and looked up in the database a batch at a time.

Healing (``FLEET_DRIFT_HEAL_CACHE=true``, off by default) deletes the entry and publishes
the change event, the reference's own invalidation path (:func:`workers.configstore.announce`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import redis
from sqlalchemy import Engine, select

from workers.configstore import ConfigChange, change_event, platform_checksum
from workers.db.models import Configuration

PATTERN = "config:*"
SCAN_BATCH = 1000
LOOKUP_BATCH = 500
_MISSING = object()


@dataclass(frozen=True)
class CacheEntry:
    """One cached configuration value and what the database holds for it."""

    cache_key: str
    environment: str
    scope: str
    key: str
    tenant_id: str | None
    cached: Any  # the cached value, parsed; _MISSING when it is not JSON
    live_present: bool
    live: Any = None
    checksum: str | None = None  # the row's, when it is encrypted
    sensitive: bool = False

    @property
    def where(self) -> str:
        tenant = f"/{self.tenant_id}" if self.tenant_id else ""
        return f"{self.key}@{self.scope}{tenant}"

    @property
    def unreadable(self) -> bool:
        return self.cached is _MISSING

    def stale(self) -> bool:
        if not self.live_present or self.unreadable:
            return True
        if self.live is _MISSING:
            return False  # the row itself is unreadable: reported as such, not judged here
        if self.checksum is not None:
            return platform_checksum(self.cached) != self.checksum
        if orjson.dumps(self.cached) == orjson.dumps(self.live):
            return False
        from tasks.drift.diff import same

        return not same(self.cached, self.live)

    def change(self, now: datetime) -> ConfigChange:
        return change_event(self.key, self.environment, self.scope, self.tenant_id, now)


def parse_cache_key(cache_key: str) -> tuple[str, str, str, str | None] | None:
    """``(environment, scope, key, tenant)`` of a cache key in either spelling."""
    if not cache_key.startswith("config:"):
        return None
    rest = cache_key[len("config:") :].removeprefix(":")
    parts = rest.split(":", 2)
    if len(parts) < 3 or not all(parts):
        return None
    environment, scope, remainder = parts
    tenant: str | None = None
    if scope == "tenant":
        if ":" not in remainder:
            return None
        remainder, tenant = remainder.rsplit(":", 1)
    return environment, scope, remainder, tenant


Scanned = tuple[str, "_Where", bytes]  # cache key, its place (parsed once), cached bytes


def scan(client: redis.Redis, environments: Iterable[str]) -> Iterator[list[Scanned]]:
    """Batches of (cache key, its place, cached bytes) for the environments asked for."""
    wanted = set(environments)
    batch: list[tuple[str, _Where]] = []
    seen: set[str] = set()  # SCAN may return a key more than once

    def values(keys: list[tuple[str, _Where]]) -> list[Scanned]:
        got = client.mget([name for name, _ in keys])
        return [
            (name, where, v if isinstance(v, bytes) else str(v).encode())
            for (name, where), v in zip(keys, got, strict=True)
            if v is not None
        ]

    for raw in client.scan_iter(match=PATTERN, count=SCAN_BATCH):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        parsed = parse_cache_key(name)
        if parsed is None or parsed[0] not in wanted or name in seen:
            continue
        seen.add(name)
        batch.append((name, parsed))
        if len(batch) >= SCAN_BATCH:
            yield values(batch)
            batch = []
    if batch:
        yield values(batch)


def read_entries(
    client: redis.Redis,
    engine: Engine,
    environments: Iterable[str],
    known: Callable[[], dict[_Where, Any]] | None = None,
) -> list[CacheEntry]:
    """Every cached value of the environments with its row. Small caches are looked up a
    batch at a time by key; from WHOLE_READ entries on, the environments' active rows are
    read once (one sequential read beats hundreds of thousands of index probes), or taken
    from ``known`` (every active row of ``environments`` by place, in :func:`_rows`'s
    order: the rows the drift run read already)."""
    batches = list(scan(client, environments))
    total = sum(map(len, batches))
    if total == 0:
        return []
    if total >= WHOLE_READ:
        if known is not None:
            rows = known()
        else:
            wanted = sorted({where[0] for batch in batches for _, where, _ in batch})
            rows = _rows(engine, Configuration.environment.in_(wanted))
        return [entry for batch in batches for entry in _match(batch, rows)]
    entries: list[CacheEntry] = []
    for batch in batches:
        for start in range(0, len(batch), LOOKUP_BATCH):
            part = batch[start : start + LOOKUP_BATCH]
            keys = sorted({where[2] for _, where, _ in part})
            envs = sorted({where[0] for _, where, _ in part})
            found = _rows(engine, Configuration.key.in_(keys), Configuration.environment.in_(envs))
            entries.extend(_match(part, found))
    return entries


WHOLE_READ = 20_000
_Where = tuple[str, str, str, str | None]


def _rows(engine: Engine, *conditions: Any) -> dict[_Where, Any]:
    query = select(
        Configuration.environment,
        Configuration.scope,
        Configuration.key,
        Configuration.tenant_id,
        Configuration.value,
        Configuration.encrypted,
        Configuration.sensitive,
        Configuration.meta,
    ).where(Configuration.active.is_(True), *conditions)
    with engine.connect() as connection:
        return {(r[0], r[1], r[2], r[3]): r for r in connection.execute(query)}


def _match(batch: list[Scanned], rows: dict[_Where, Any]) -> list[CacheEntry]:
    out = []
    for cache_key, where, raw in batch:
        try:
            cached: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            cached = _MISSING
        row = rows.get(where)
        env, scope, key, tenant = where
        if row is None:
            out.append(CacheEntry(cache_key, env, scope, key, tenant, cached, False))
            continue
        value, encrypted, sensitive, meta = row[4], row[5], row[6], row[7]
        checksum = None
        live: Any = None
        if encrypted:
            try:
                checksum = (orjson.loads(meta or "null") or {}).get("checksum")
            except (orjson.JSONDecodeError, AttributeError):
                checksum = None
            checksum = checksum if isinstance(checksum, str) else ""
        else:
            try:
                live = orjson.loads(value) if value is not None else None
            except orjson.JSONDecodeError:
                live = _MISSING
        out.append(
            CacheEntry(
                cache_key,
                env,
                scope,
                key,
                tenant,
                cached,
                True,
                live,
                checksum,
                bool(sensitive or encrypted),
            )
        )
    return out
