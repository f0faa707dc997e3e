"""``drift.detect``: where live configuration differs from declared, and environments
from each other.

The shell around :func:`tasks.drift.diff.detect`: read the desired files, the live rows and
the rules; compare; store the findings with their lifecycle; count and log what changed.
One run per environment at a time (Redis locks); a run over every environment also owns
the comparisons between environments.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from tasks.drift.cache import CacheEntry, read_entries
from tasks.drift.diff import DriftInput, detect
from tasks.drift.gitsource import GitUnavailable, Revision, fetch, last_root, masked
from tasks.drift.model import CROSS, Finding
from tasks.drift.overrides import read_layers
from tasks.drift.rules import Rules, RulesError, load_rules, parse_rules
from tasks.drift.sources import (
    Flat,
    SourceProblem,
    desired_files,
    parse_desired,
    read_live,
)
from tasks.drift.store import Reconciled, reconcile
from workers import audit
from workers.configstore import announce
from workers.db.models import Configuration
from workers.fleetstate import DRIFT_RUN, record_health
from workers.jobs import PermanentError, RetryPolicy, job, skipped
from workers.locks import job_locks
from workers.logs import get_logger
from workers.runtime import Runtime, runtime

log = get_logger("fleet.drift")

# The configuration layer that desired files describe: environment-wide, no tenant.
LIVE_SCOPE = "environment"
# Parsed desired files, by content hash (see desired_flat).
DESIRED_CACHE_PREFIX = "fleet:drift:desired:"
DESIRED_CACHE_SECONDS = 86400
# New findings and resolutions logged one by one, per run; the rest are summarized.
MAX_EVENT_LINES = 100
TIME_LIMIT = 300


LAYER_SCOPES = ("service", "tenant", "global")


@dataclass
class ActiveRows:
    """Every active row of the run's environments, read once (one snapshot, one sequential
    read): ``(id, environment, scope, tenant_id, key, value, sensitive, encrypted, meta)``.
    The environment-wide ones are the live state, the others its layers, and all of them
    what the platform's cache is checked against."""

    rows: list[tuple[Any, ...]]

    def live(self) -> list[tuple[Any, ...]]:
        """Environment-wide rows, as tuples in :class:`LiveRow` order."""
        return [_LIVE(row) for row in self.rows if row[2] == LIVE_SCOPE and row[3] is None]

    def layers(self) -> list[tuple[Any, ...]]:
        """Rows at service, tenant and global scope (see :mod:`tasks.drift.overrides`)."""
        return [row for row in self.rows if row[2] in LAYER_SCOPES]

    def by_place(self) -> dict[Any, tuple[Any, ...]]:
        """Every row by (environment, scope, key, tenant), as the cache check reads it."""
        return dict(zip(map(_PLACE, self.rows), map(_CACHED, self.rows), strict=True))


# Fields of an active row (see ActiveRows) as LiveRow, as a place, and as the cache check's row.
_LIVE = itemgetter(0, 1, 4, 5, 6, 7, 8)
_PLACE = itemgetter(1, 2, 4, 3)
_CACHED = itemgetter(1, 2, 4, 3, 5, 7, 6, 8)


def active_rows(rt: Runtime, environments: list[str]) -> ActiveRows:
    query = select(
        Configuration.id,
        Configuration.environment,
        Configuration.scope,
        Configuration.tenant_id,
        Configuration.key,
        Configuration.value,
        Configuration.sensitive,
        Configuration.encrypted,
        Configuration.meta,
    ).where(Configuration.active.is_(True), Configuration.environment.in_(environments))
    with rt.engine.connect() as connection:
        return ActiveRows([tuple(row) for row in connection.execute(query)])


@dataclass(frozen=True)
class Desired:
    """Where a run reads the desired files and rules: the config folder, or a Git
    checkout (``revision``); ``root`` None when Git has nothing to give (``problem``)."""

    root: Path | None
    revision: Revision | None = None
    problem: SourceProblem | None = None

    def describe(self) -> dict[str, Any]:
        if self.revision is not None:
            return {"git": self.revision.describe()}
        if self.problem is not None:
            return {"git": {"error": self.problem.reason}}
        return {"dir": str(self.root)}


def desired_source(rt: Runtime) -> Desired:
    """The desired configuration for this run: fetched from Git when configured (the last
    fetched commit when the remote fails, said and counted)."""
    from monitoring import metrics

    settings = rt.settings
    if settings.drift_git_url is None:
        return Desired(settings.configuration_dir)
    url = settings.drift_git_url
    try:
        revision = fetch(
            settings.home, url, settings.drift_git_ref, settings.drift_git_path,
            settings.drift_git_timeout,
        )  # fmt: skip
    except GitUnavailable as exc:
        metrics.DRIFT_GIT_FETCH_FAILURES.inc()
        log.error("drift_git_unavailable", url=masked(url), error=str(exc))
        return Desired(None, None, SourceProblem("", f"git {masked(url)}", str(exc)))
    if not revision.fresh:
        metrics.DRIFT_GIT_FETCH_FAILURES.inc()
        log.error(
            "drift_git_fetch_failed",
            url=revision.url,
            ref=revision.ref,
            error=revision.error,
            using=revision.commit,
        )
    return Desired(revision.root, revision)


def _desired_hint(rt: Runtime) -> Path | None:
    """The desired folder known before a run fetches (environment names only)."""
    settings = rt.settings
    if settings.drift_git_url is None:
        return settings.configuration_dir
    return last_root(settings.home, settings.drift_git_url, settings.drift_git_path)


def _known_environments(rt: Runtime) -> list[str]:
    with rt.engine.connect() as connection:
        query = (
            select(Configuration.environment)
            .where(Configuration.active.is_(True), Configuration.scope == LIVE_SCOPE)
            .distinct()
        )
        live = {row[0] for row in connection.execute(query)}
    hint = _desired_hint(rt)
    return sorted(live | set(desired_files(hint) if hint is not None else {}))


# The last rules file that parsed, for a run whose file cannot be read or parsed.
LAST_GOOD_RULES = "fleet:drift:rules:last-good"


def _rules(rt: Runtime, problems: list[SourceProblem], root: Path | None) -> Rules:
    """The rules file's rules; when it cannot be used, the last good ones, or, with none,
    rules that hide every value (a broken file must never put secrets in clear)."""
    try:
        if root is None:
            raise RulesError("drift-rules.yaml", "no desired configuration to read it from")
        rules, text = load_rules(root)
    except RulesError as exc:
        saved = rt.redis.get(LAST_GOOD_RULES)
        if saved is not None:
            text = saved.decode() if isinstance(saved, bytes) else str(saved)
            rules = parse_rules(text, "the last good rules")
            which = "using the last good rules"
        else:
            rules = Rules.hiding_everything()
            which = "no good rules known: every value is treated as sensitive"
        log.error("drift_rules_unusable", where=exc.where, reason=exc.reason, fallback=which)
        problems.append(SourceProblem("", exc.where, f"{exc.reason}; {which}"))
        return rules
    if text is not None:
        rt.redis.set(LAST_GOOD_RULES, text)
    return rules


def desired_flat(
    rt: Runtime, path: Path, environment: str
) -> tuple[Flat | None, SourceProblem | None]:
    """A desired file, flattened; parsed once per content for the whole fleet.

    Parsing YAML is the slow part of a run (seconds for 100,000 keys); the flattened form
    is kept in Redis under the file's SHA-256 for a day, so an unchanged file costs one
    read. Files that do not parse are not kept: their problem is reported every run.
    """
    try:
        content = path.read_bytes()
    except OSError as exc:
        return None, SourceProblem(environment, str(path), f"cannot read: {exc.strerror or exc}")
    key = DESIRED_CACHE_PREFIX + hashlib.sha256(content).hexdigest()
    cached = rt.redis.get(key)
    if cached is not None:
        return orjson.loads(cached), None
    flat, problem = parse_desired(content.decode("utf-8", errors="replace"), str(path), environment)
    if flat is not None:
        rt.redis.set(key, orjson.dumps(flat), ex=DESIRED_CACHE_SECONDS)
    return flat, problem


def gather(
    rt: Runtime, environments: list[str], cross: bool, source: Desired | None = None
) -> DriftInput:
    source = source or Desired(rt.settings.configuration_dir)
    problems: list[SourceProblem] = [source.problem] if source.problem else []
    rules = _rules(rt, problems, source.root)
    files = desired_files(source.root) if source.root is not None else {}
    desired: dict[str, Flat] = {}
    for environment in environments:
        path = files.get(environment)
        if path is None:
            continue  # live only: every key shows as unexpected_in_live
        flat, problem = desired_flat(rt, path, environment)
        if flat is None:
            assert problem is not None
            log.error(
                "drift_source_unusable",
                environment=environment,
                where=problem.where,
                reason=problem.reason,
            )
            problems.append(problem)
        else:
            desired[environment] = flat
    rows = active_rows(rt, environments)
    live = read_live(rows.live())
    for problem in live.problems:
        log.error(
            "drift_live_value_unusable",
            environment=problem.environment,
            key=problem.key,
            where=problem.where,
            reason=problem.reason,
        )
    problems.extend(live.problems)
    layers, layer_problems = read_layers(rows.layers())
    for problem in layer_problems:
        log.error(
            "drift_live_value_unusable",
            environment=problem.environment,
            key=problem.key,
            where=problem.where,
            reason=problem.reason,
        )
    problems.extend(layer_problems)
    cache = platform_cache(rt, environments, problems, rows.by_place)
    return DriftInput(
        desired=desired,
        live=live,
        rules=rules,
        environments=environments,
        cross=cross,
        problems=problems,
        cache=cache,
        layers=layers,
    )


def cache_client(rt: Runtime) -> redis.Redis:
    url = rt.settings.drift_cache_redis_url
    return redis.Redis.from_url(url) if url else rt.redis


def platform_cache(
    rt: Runtime,
    environments: list[str],
    problems: list[SourceProblem],
    known: Callable[[], dict[Any, tuple[Any, ...]]] | None = None,
) -> list[CacheEntry]:
    """The platform's cached configuration values with their rows; an unreachable cache
    is a problem of each environment's, said, never a silent pass."""
    try:
        return read_entries(cache_client(rt), rt.engine, environments, known)
    except redis.RedisError as exc:
        reason = f"the platform's cache could not be read: {type(exc).__name__}"
        log.error("drift_cache_unreadable", error=str(exc))
        problems.extend(SourceProblem(env, "platform cache", reason) for env in environments)
        return []


def heal_cache(rt: Runtime, session: Session, entries: list[CacheEntry], now: datetime) -> int:
    """Stale entries deleted and their change events published, each audit-logged."""
    from monitoring import metrics

    stale = [entry for entry in entries if entry.stale()]
    if not stale:
        return 0
    client = cache_client(rt)
    failed = announce(client, [entry.change(now) for entry in stale])
    audit.record_many(
        session,
        [
            audit.entry(
                "drift_cache_healed",
                entry.cache_key,
                now,
                environment=entry.environment,
                scope=entry.scope,
                key=entry.key,
                tenant_id=entry.tenant_id,
            )
            for entry in stale
        ],
    )
    for entry in stale:
        metrics.DRIFT_CACHE_HEALED.labels(entry.environment).inc()
    log.warning("drift_cache_healed", entries=len(stale), not_announced=failed)
    return len(stale)


@job(
    "drift.detect",
    queue="drift",
    soft_time_limit=TIME_LIMIT - 30,
    time_limit=TIME_LIMIT,
    retry=RetryPolicy(max_retries=3, backoff_base=5, backoff_cap=60),
)
def detect_drift(*, environment: str | None = None, max_findings: int = 500) -> dict[str, Any]:
    """Compare desired and live configuration, and environments with each other."""
    rt = runtime()
    known = _known_environments(rt)
    if environment is not None and environment not in known:
        listed = ", ".join(known) or "none"
        raise PermanentError(f"drift.detect: unknown environment {environment!r} (known: {listed})")
    environments = [environment] if environment else known
    cross = environment is None
    locks = [f"drift:{env}" for env in environments] + (["drift:cross"] if cross else [])
    with job_locks(rt.redis, locks, ttl=TIME_LIMIT + 60) as busy:
        if busy is not None:
            log.info("drift_run_skipped", held=busy)
            return skipped(f"another drift run holds the {busy} lock", environment=environment)
        return _run(rt, environments, cross, max_findings)


def clock() -> datetime:
    """The time a run judges rule expiry at (tests move it)."""
    return datetime.now(UTC)


def _run(rt: Runtime, environments: list[str], cross: bool, max_findings: int) -> dict[str, Any]:
    now = clock()
    source = desired_source(rt)
    data = gather(rt, environments, cross, source)
    found = detect(data, now)
    if source.revision is not None:
        found = [replace(f, commit=source.revision.commit) for f in found]
    scopes = None if cross else {f"env:{env}" for env in environments}
    with rt.sessions.begin() as session:
        outcome = reconcile(session, found, scopes, now)
        _audit(session, outcome, now)
        healed = heal_cache(rt, session, data.cache, now) if rt.settings.drift_heal_cache else 0
        # Open findings are read from drift_findings at scrape time (fleet exporter); the
        # time of this run is what no table records.
        covered = environments + ([CROSS, "all"] if cross else [])
        record_health(session, DRIFT_RUN, dict.fromkeys(covered, now.timestamp()), now)
    _record(outcome, environments)
    result = summary(found, outcome, environments, max_findings)
    result["cache_entries"] = len(data.cache)
    result["cache_healed"] = healed
    result["desired"] = source.describe()
    return result


def _audit(session: Session, outcome: Reconciled, now: datetime) -> None:
    """Openings and resolutions in the fleet's audit log, in the run's own transaction (so
    shipped with the platform's audit trail): what and where, never a value."""
    rows = [
        audit.entry(
            "drift_finding_opened",
            f"{finding.kind}:{finding.environment}:{finding.key}",
            now,
            fingerprint=finding.fingerprint,
            kind=finding.kind,
            environment=finding.environment,
            environments=list(finding.environments),
            key=finding.key,
            source=finding.source,
            severity=finding.severity,
            expected=finding.expected,
            reason=finding.reason,
        )
        for finding in outcome.opened
    ]
    rows += [
        audit.entry(
            "drift_finding_resolved",
            f"{row.kind}:{row.environment}:{row.key}",
            now,
            fingerprint=row.fingerprint,
            kind=row.kind,
            environment=row.environment,
            environments=list(row.environments),
            key=row.key,
            source=row.source,
            severity=row.severity,
            opened_at=row.opened_at.isoformat(),
        )
        for row in outcome.resolved
    ]
    audit.record_many(session, rows)


def _record(outcome: Reconciled, environments: list[str]) -> None:
    from monitoring import metrics

    for finding in outcome.opened:
        metrics.DRIFT_OPENED.labels(finding.environment, finding.kind, finding.severity).inc()
    for row in outcome.resolved:
        metrics.DRIFT_RESOLVED.labels(row.environment, row.kind, row.severity).inc()
    for finding in outcome.opened[:MAX_EVENT_LINES]:
        log.warning(
            "drift_finding_opened",
            kind=finding.kind,
            environment=finding.environment,
            key=finding.key,
            severity=finding.severity,
            expected=finding.expected,
            before=finding.before,
            after=finding.after,
            message=finding.message,
        )
    for row in outcome.resolved[:MAX_EVENT_LINES]:
        log.info(
            "drift_finding_resolved",
            kind=row.kind,
            environment=row.environment,
            key=row.key,
            severity=row.severity,
        )
    unlogged = max(0, len(outcome.opened) - MAX_EVENT_LINES) + max(
        0, len(outcome.resolved) - MAX_EVENT_LINES
    )
    log.info(
        "drift_run_finished",
        environments=environments,
        opened=len(outcome.opened),
        resolved=len(outcome.resolved),
        still_open=outcome.still_open,
        events_not_logged=unlogged,
    )


def summary(
    found: list[Finding], outcome: Reconciled, environments: list[str], max_findings: int
) -> dict[str, Any]:
    by_kind = Counter(f.kind for f in found)
    by_severity = Counter(f.severity for f in found)
    return {
        "environments": environments,
        "findings_total": len(found),
        "by_kind": dict(sorted(by_kind.items())),
        "by_severity": dict(sorted(by_severity.items())),
        "new": len(outcome.opened),
        "resolved": len(outcome.resolved),
        "new_findings": [f.fingerprint for f in outcome.opened[:max_findings]],
        "resolved_findings": [
            {
                "fingerprint": r.fingerprint,
                "kind": r.kind,
                "environment": r.environment,
                "key": r.key,
            }
            for r in outcome.resolved[:max_findings]
        ],
        "findings": [f.as_dict() for f in found[:max_findings]],
        "findings_not_shown": max(0, len(found) - max_findings),
    }
