"""The invariants a chaos run ends with, each with its figures and, when it fails, the
first evidence (ids, keys)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from chaos.load import AuditProducer, CountKey, ImpressionProducer
from schedules.claims import Fire
from schedules.table import Schedule
from workers.backlog import IMPRESSIONS, IMPRESSIONS_DEAD, IMPRESSIONS_IN_FLIGHT

PLATFORM_TABLES = ("configuration_audit_log", "feature_flag_audit_log")
EXECUTED = ("success", "failure", "skipped")


@dataclass
class Check:
    name: str
    ok: bool
    figures: str
    evidence: list[str] = field(default_factory=list)


def impressions(
    database_url: str, redis_url: str, producer: ImpressionProducer
) -> tuple[Check, dict[str, int]]:
    with psycopg.connect(database_url, application_name="chaos-check") as connection:
        rows = connection.execute(
            "SELECT flag_key, environment, variant, bucket_start, sum(count)"
            " FROM flag_impression_counts GROUP BY 1, 2, 3, 4"
        ).fetchall()
    found: Counter[CountKey] = Counter()
    for flag, environment, variant, bucket, count in rows:
        minute = bucket.astimezone(UTC).replace(tzinfo=None).isoformat()
        found[(flag, environment, variant, minute)] += int(count)
    client = redis.Redis.from_url(redis_url)
    try:
        dead = int(client.llen(IMPRESSIONS_DEAD))
        left = int(client.llen(IMPRESSIONS))
        in_flight = int(client.zcard(IMPRESSIONS_IN_FLIGHT))
    finally:
        client.close()
    expected_dead = producer.malformed + producer.future
    counted = sum(found.values())
    evidence = []
    for key in sorted(set(found) | set(producer.counts)):
        if found[key] != producer.counts[key]:
            wanted, got = producer.counts[key], found[key]
            what = "lost" if got < wanted else "doubled"
            evidence.append(f"{'/'.join(key)}: pushed {wanted}, counted {got} ({what})")
    if dead != expected_dead:
        evidence.append(f"dead letters: {dead}, expected {expected_dead} (malformed + future)")
    if left or in_flight:
        evidence.append(f"left in the queue {left}, batches in flight {in_flight}")
    lost = sum(max(0, producer.counts[k] - found[k]) for k in producer.counts)
    doubled = sum(max(0, found[k] - producer.counts[k]) for k in found)
    figures = (
        f"pushed {producer.pushed:,} = counted {counted:,} + dead-lettered {dead:,} "
        f"({producer.malformed} malformed, {producer.future} future); {len(found)} minute keys"
    )
    return Check("impressions", not evidence, figures, evidence[:5]), {
        "pushed": producer.pushed,
        "counted": counted,
        "dead": dead,
        "lost": lost,
        "doubled": doubled,
    }


def _shipped(sink: Path) -> tuple[dict[str, list[int]], int]:
    """Ids per source in the order the sink holds them, and rolled-back rows seen."""
    ids: dict[str, list[int]] = {}
    rolled_back = 0
    for segment in sorted(sink.glob("*.jsonl")):
        for line in segment.read_bytes().splitlines():
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("source") == "checkpoint":
                continue
            ids.setdefault(str(event["source"]), []).append(int(event["id"]))
            if event.get("user_id") == "chaos-rolledback":
                rolled_back += 1
    return ids, rolled_back


def audit(
    database_url: str, sink: Path, producers: list[AuditProducer], verified: tuple[int, str]
) -> tuple[Check, int]:
    shipped, rolled_back = _shipped(sink)
    evidence = []
    with psycopg.connect(database_url, application_name="chaos-check") as connection:
        in_db = {
            table: [
                int(r[0])
                for r in connection.execute(
                    f"SELECT id FROM {table} ORDER BY id"  # noqa: S608 - our own table names
                ).fetchall()
            ]
            for table in (*PLATFORM_TABLES, "fleet_audit_log")
        }
    committed = {t: sorted(i for p in producers for i in p.committed[t]) for t in PLATFORM_TABLES}
    for table in PLATFORM_TABLES:
        if in_db[table] != committed[table]:
            extra = sorted(set(in_db[table]) - set(committed[table]))[:3]
            evidence.append(f"{table}: rows not committed by the producers in it: {extra}")
    rows = 0
    for table, ids in in_db.items():
        got = shipped.get(table, [])
        rows += len(ids)
        counts = Counter(got)
        twice = [i for i, n in counts.items() if n > 1][:3]
        missing = sorted(set(ids) - set(got))[:3]
        out_of_order = next((i for a, i in pairwise(got) if i <= a), None)
        if twice:
            evidence.append(f"{table}: shipped twice: ids {twice}")
        if missing:
            evidence.append(f"{table}: committed, never shipped: ids {missing}")
        if out_of_order is not None:
            evidence.append(f"{table}: out of id order at id {out_of_order}")
        extra = sorted(set(got) - set(ids))[:3]
        if extra:
            evidence.append(f"{table}: shipped, not in the table: ids {extra}")
    if rolled_back:
        evidence.append(f"{rolled_back} rolled-back rows shipped")
    code, said = verified
    if code != 0:
        evidence.append(f"fleet audit verify exited {code}: {said.strip()[-300:]}")
    shipped_total = sum(len(v) for v in shipped.values())
    figures = (
        f"{rows:,} committed rows, {shipped_total:,} shipped, in id order per source; "
        f"{sum(p.rolled_back for p in producers):,} rolled back, none shipped; "
        f"verify {'ok' if code == 0 else 'FAILED'}"
    )
    return Check("audit", not evidence, figures, evidence[:5]), rows


def _scheduler_log(logs: Path) -> tuple[dict[tuple[str, str], set[str]], dict[str, int]]:
    """Per (schedule, fire stamp) the results replicas logged; catch-up misses counted."""
    results: dict[tuple[str, str], set[str]] = {}
    missed: Counter[str] = Counter()
    for path in logs.glob("scheduler-*.log"):
        for line in path.read_bytes().splitlines():
            if not line.startswith(b"{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name = event.get("event")
            if name == "schedule_fired":
                results.setdefault((event["schedule"], event["fire"]), set()).add(event["result"])
            elif name == "schedule_fire_recovered":
                results.setdefault((event["schedule"], event["fire"]), set()).add("recovered")
            elif name == "schedule_fires_missed":
                missed[event["schedule"]] += int(event.get("missed", 0))
    return results, dict(missed)


def held_in_broker(redis_url: str) -> bytes:
    """Every message the broker still holds (queued, or unacknowledged by a worker that was
    killed after taking it: Redis gives it back after the visibility timeout), as one blob
    to search task ids in."""
    client = redis.Redis.from_url(redis_url)
    held = []
    try:
        for key in client.scan_iter(count=1000):
            name = key.decode(errors="replace")
            if name.startswith(("feature_flag_impressions", "fleet:")):
                continue
            kind = client.type(key)
            if kind == b"list":
                held.extend(client.lrange(key, 0, -1))
            elif kind == b"hash" and name.startswith("unacked"):
                held.extend(client.hvals(key))
    finally:
        client.close()
    return b"\n".join(v if isinstance(v, bytes) else str(v).encode() for v in held)


def fires(
    database_url: str,
    held: bytes,
    schedules: list[Schedule],
    window: tuple[datetime, datetime],
    all_down: list[tuple[datetime, datetime]],
    logs: Path,
) -> tuple[Check, dict[str, int]]:
    logged, missed = _scheduler_log(logs)
    with psycopg.connect(database_url, application_name="chaos-check") as connection:
        runs = connection.execute(
            "SELECT task_id, outcome FROM task_runs WHERE schedule IS NOT NULL"
        ).fetchall()
    outcomes: dict[str, list[str]] = {}
    for task_id, outcome in runs:
        outcomes.setdefault(task_id, []).append(outcome)
    evidence: list[str] = []
    tally: Counter[str] = Counter()
    for schedule in schedules:
        moment = window[0]
        while True:
            upcoming = schedule.next_fires(moment)
            if not upcoming or upcoming[0] > window[1]:
                break
            at = moment = upcoming[0]
            fire = Fire(schedule.name, at)
            tally["scheduled"] += 1
            kind, said = _account(fire, outcomes.get(fire.task_id, []), logged, all_down, held)
            tally[kind] += 1
            if said:
                evidence.append(said)
    tally["catch-up misses logged"] = sum(missed.values())
    # Every fire missed while every replica was down is one the catch-up counted (it may
    # count more: fires after the window's end, when the last outage ran past it).
    if tally["missed (every replica down)"] > tally["catch-up misses logged"]:
        evidence.append(
            f"{tally['missed (every replica down)']} fires missed while every replica was "
            f"down, but the catch-up logged only {tally['catch-up misses logged']}"
        )
    figures = ", ".join(f"{name} {count}" for name, count in tally.items())
    return Check("scheduler", not evidence, figures, evidence[:5]), dict(tally)


def _account(
    fire: Fire,
    seen: list[str],
    logged: dict[tuple[str, str], set[str]],
    all_down: list[tuple[datetime, datetime]],
    held: bytes = b"",
) -> tuple[str, str | None]:
    """What became of one fire, and the evidence when that breaks an invariant."""
    where = f"{fire.schedule}@{fire.stamp}"
    executed = sum(1 for o in seen if o in EXECUTED)
    if executed > 1:
        return "twice", f"{where} ran {executed} times: {seen}"
    if executed == 1:
        return "ran", None
    if seen:
        return f"ended {'/'.join(sorted(set(seen)))}", None
    said = logged.get((fire.schedule, fire.stamp), set())
    if fire.task_id.encode() in held:
        return "held by the broker (a killed worker's, back after the visibility timeout)", None
    if said & {"enqueued", "recovered", "caught_up"}:
        return "lost", f"{where} enqueued ({', '.join(sorted(said))}), never run"
    if "misfired" in said:
        return "misfired", None
    if any(start <= fire.at <= end for start, end in all_down):
        return "missed (every replica down)", None
    return "unaccounted", f"{where}: no run and no replica's word ({', '.join(sorted(said))})"


def runtime(database_url: str) -> tuple[Check, int]:
    with psycopg.connect(database_url, application_name="chaos-check") as connection:
        counts: dict[str, int] = dict(
            connection.execute("SELECT outcome, count(*) FROM task_runs GROUP BY 1").fetchall()
        )
        running = connection.execute(
            "SELECT job, task_id, started_at FROM task_runs WHERE outcome = 'running' LIMIT 3"
        ).fetchall()
    evidence = [f"{job} {task} started {started} still running" for job, task, started in running]
    figures = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return Check("runtime", not evidence, figures, evidence), int(counts.get("lost", 0))


def _scrape(port: int) -> dict[str, float]:
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _total(values: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in values.items() if k.startswith(prefix))


def metrics(ports: dict[str, int], counted: int, shipped: int) -> Check:
    """Every live process answers /metrics; the exporter's fleet-wide figures agree with
    the database; the workers' counters never exceed it. (A SIGKILLed worker's counters go
    with it: per-process counters undercount after kills, never overcount.)"""
    evidence, scraped = [], {}
    for name, port in ports.items():
        try:
            scraped[name] = _scrape(port)
        except httpx.HTTPError as exc:
            evidence.append(f"{name} /metrics on {port}: {type(exc).__name__}")
    workers = [v for n, v in scraped.items() if n.startswith("worker")]
    processed = sum(_total(v, "fleet_impressions_processed_total") for v in workers)
    sent = sum(_total(v, "fleet_audit_events_shipped_total") for v in workers)
    if processed > counted:
        evidence.append(
            f"workers counted {processed:g} impressions processed, the database {counted}"
        )
    if sent > shipped:
        evidence.append(f"workers counted {sent:g} audit events shipped, the sink holds {shipped}")
    exporter = scraped.get("exporter", {})
    backlog = _total(exporter, "fleet_audit_backlog_events")
    depth = exporter.get("fleet_impressions_queue_depth")
    if backlog or depth:
        evidence.append(f"exporter: audit backlog {backlog:g}, impressions queue {depth}")
    figures = (
        f"{len(scraped)} of {len(ports)} /metrics answered; workers' counters {processed:,.0f} "
        f"impressions (database {counted:,}), {sent:,.0f} events (sink {shipped:,}); "
        f"exporter backlog {backlog:g}"
    )
    return Check("metrics", not evidence, figures, evidence)


def all_down_windows(
    downs: list[list[tuple[float, float | None]]], end: float, slack: float
) -> list[tuple[float, float]]:
    """Intervals (seconds from the start) when every replica was down, each widened by
    ``slack`` at its end (a restarted scheduler needs a moment before it fires)."""
    closed = [[(a, (b if b is not None else end) + slack) for a, b in d] for d in downs]
    if not closed:
        return []
    windows = closed[0]
    for other in closed[1:]:
        windows = [
            (max(a, c), min(b, d)) for a, b in windows for c, d in other if max(a, c) < min(b, d)
        ]
    return windows


def to_datetimes(
    windows: list[tuple[float, float]], origin: datetime
) -> list[tuple[datetime, datetime]]:
    return [(origin + timedelta(seconds=a), origin + timedelta(seconds=b)) for a, b in windows]


def describe(check: Check) -> dict[str, Any]:
    return {
        "check": check.name,
        "ok": check.ok,
        "figures": check.figures,
        "evidence": check.evidence,
    }
