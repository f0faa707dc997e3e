"""audit.ship against real PostgreSQL: order, exactly once in files under SIGKILL, an HTTP
receiver that fails and recovers, a refusing sink, sensitive values, metrics, verify."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import insert, text

from tasks.audit import hmac_key, ship
from tasks.audit.verify import verify
from tests.helpers import ROOT, fleet_gauge, run_fleet
from workers.audit import record
from workers.db.models import ConfigurationAuditLog, FeatureFlagAuditLog
from workers.runtime import Runtime, install
from workers.settings import FleetSettings

# The fleet's one audit key (required on a shared database).
AUDIT_KEY = "test-fleet-audit-key-4711"
FILE_SINK = "sinks:\n  - {name: archive, type: file, path: %s, max_bytes: 4096}\n"


def config_with(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    (config / "audit-sinks.yaml").write_text(text)
    return config


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return tmp_path / "archive"


@pytest.fixture
def rt(postgres_url: str, redis_url: str, tmp_path: Path, archive: Path) -> Iterator[Runtime]:
    config = config_with(tmp_path, FILE_SINK % archive)
    runtime = install(
        Runtime(
            FleetSettings(
                home=tmp_path / "home",
                database_url=postgres_url,
                redis_url=redis_url,
                config_dir=config,
                audit_batch_size=50,
                audit_hmac_key=AUDIT_KEY,
            )
        )
    )
    yield runtime
    runtime.close()


def add_events(
    rt: Runtime,
    count: int,
    start: int = 0,
    sensitive_every: int = 0,
    malformed: set[int] | None = None,
) -> None:
    now = datetime.now(UTC)
    rows = []
    for i in range(start, start + count):
        metadata = (
            "{not json"
            if malformed and i in malformed
            else json.dumps({"value": f"model-{i}", "password": f"pw-{i}", "note": f"change {i}"})
        )
        rows.append(
            {
                "action": "SET",
                "key": f"key.{i}",
                "environment": "production",
                "scope": "environment",
                "tenant_id": None,
                "version": f"v{i}",
                "user_id": "admin",
                "timestamp": now,
                "checksum": "c",
                "sensitive": bool(sensitive_every and i % sensitive_every == 0),
                "metadata": metadata,
            }
        )
    with rt.engine.begin() as connection:
        connection.execute(insert(ConfigurationAuditLog.__table__), rows)
        connection.execute(
            insert(FeatureFlagAuditLog.__table__),
            [
                {
                    "flag_key": "new_ui_enabled",
                    "action": "UPDATE",
                    "user_id": "admin",
                    "timestamp": now,
                    "metadata": json.dumps({"n": i}),
                }
                for i in range(start, start + 3)
            ],
        )
    with rt.sessions.begin() as session:
        record(session, "canary_verdict", "deploy-1", now, verdict="pass")


def shipped(archive: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted(archive.glob("*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in events if e["source"] != "checkpoint"]


def assert_exactly_once_in_order(got: list[str], expected: list[str]) -> None:
    """Every event once; within each source in id order (sources interleave by run)."""
    assert len(got) == len(set(got)), "an event was shipped twice"
    assert sorted(got) == sorted(expected), "an event is missing"
    for source in {i.split(":")[0] for i in expected}:
        numbers = [int(i.split(":")[1]) for i in got if i.startswith(source + ":")]
        assert numbers == sorted(numbers), f"{source} out of order"


def expected_ids(config_rows: int, flag_rows: int, fleet_rows: int) -> list[str]:
    return (
        [f"configuration_audit_log:{i}" for i in range(1, config_rows + 1)]
        + [f"feature_flag_audit_log:{i}" for i in range(1, flag_rows + 1)]
        + [f"fleet_audit_log:{i}" for i in range(1, fleet_rows + 1)]
    )


def test_every_event_shipped_in_order_and_verified(rt: Runtime, archive: Path) -> None:
    add_events(rt, 120, sensitive_every=4, malformed={7})
    result = ship(rt)["sinks"]["archive"]
    assert result["shipped"] == {
        "configuration_audit_log": 120,
        "feature_flag_audit_log": 3,
        "fleet_audit_log": 1,
    }
    # The first batch's checkpoint, and the one every run ends with.
    assert result["malformed"] == 1 and result["checkpoints"] == 2
    events = shipped(archive)
    assert ids(events) == expected_ids(120, 3, 1)
    assert len(list(archive.glob("*.jsonl"))) > 1  # rotated by size
    verdict = verify([archive], hmac_key(rt.settings))
    assert verdict.ok, verdict.problem
    text = "".join(path.read_text() for path in archive.glob("*.jsonl"))
    assert "pw-" not in text  # password keys: always an HMAC
    assert '"model-4"' not in text and '"model-5"' in text  # values: hashed when sensitive
    bad = next(e for e in events if e["event_id"] == "configuration_audit_log:8")
    assert (bad["raw"], bad["error"]) == ("{not json", "metadata is not valid JSON")
    # A second run ships only what is new, continuing the same chain.
    add_events(rt, 10, start=120)
    again = ship(rt)["sinks"]["archive"]
    assert again["shipped"]["configuration_audit_log"] == 10
    assert verify([archive], hmac_key(rt.settings)).ok
    backlog = {"source": "configuration_audit_log", "sink": "archive"}
    assert fleet_gauge(rt.sessions, "fleet_audit_backlog_events", backlog) == 0
    assert fleet_gauge(rt.sessions, "fleet_audit_sink_up", {"sink": "archive"}) == 1


def shipper_env(postgres_url: str, redis_url: str, tmp_path: Path, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_DATABASE_URL=postgres_url,
        FLEET_REDIS_URL=redis_url,
        FLEET_HOME=str(tmp_path / "home"),
        FLEET_CONFIG_DIR=str(config),
        FLEET_AUDIT_HMAC_KEY=AUDIT_KEY,
        PYTHONPATH=str(ROOT),
    )
    return env


def test_sigkill_between_write_and_commit_never_duplicates(
    rt: Runtime, archive: Path, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = shipper_env(postgres_url, redis_url, tmp_path, tmp_path / "config")
    total = 0
    for trial in range(6):
        add_events(rt, 150, start=total)
        total += 150
        killed = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.audit_shipper",
                "--die-after-batch",
                str(1 + trial % 3),
                "--batch-size",
                "40",
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        rt.redis.delete("fleet:lock:audit:archive")  # its lock expiring (20 s), without waiting
        ship(rt)
        assert_exactly_once_in_order(
            ids(shipped(archive)), expected_ids(total, 3 * (trial + 1), trial + 1)
        )
        assert verify([archive], hmac_key(rt.settings)).ok


def test_random_sigkills_while_shipping(
    rt: Runtime, archive: Path, postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    import random

    env = shipper_env(postgres_url, redis_url, tmp_path, tmp_path / "config")
    rng = random.Random(3)
    add_events(rt, 3000)
    for _ in range(4):
        shipper = subprocess.Popen(
            [sys.executable, "-m", "tests.audit_shipper", "--batch-size", "25"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.8, 1.6))  # let it get going, then kill it wherever it is
        shipper.send_signal(signal.SIGKILL)
        shipper.wait(30)
        rt.redis.delete("fleet:lock:audit:archive")  # its lock expiring, without waiting
    ship(rt)
    assert ids(shipped(archive)) == expected_ids(3000, 3, 1)
    assert verify([archive], hmac_key(rt.settings)).ok


class Receiver:
    """An HTTP sink on loopback: fails, times out, then takes everything."""

    def __init__(self, plan: list[str]) -> None:
        self.plan = plan  # per request: "500", "timeout", "400", else 204
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.headers.append(dict(self.headers))
                step = receiver.plan.pop(0) if receiver.plan else "ok"
                if step == "timeout":
                    time.sleep(1.5)
                if step in ("500", "400"):
                    self.send_response(int(step))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                receiver.bodies.append(body)
                receiver.received.extend(orjson.loads(line) for line in body.splitlines())
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ingest"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def http_runtime(
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
    receiver: Receiver,
    attempts: int = 6,
    form: str = "jsonl",
) -> Runtime:
    sink = (
        f"{{name: siem, type: http, url: {receiver.url}, timeout_seconds: 0.5, format: {form}, "
        f"max_attempts: {attempts}, backoff_base_seconds: 0.01, backoff_cap_seconds: 0.05}}"
    )
    config = config_with(tmp_path, f"sinks:\n  - {sink}\n")
    return install(
        Runtime(
            FleetSettings(
                home=tmp_path / "home",
                database_url=postgres_url,
                redis_url=redis_url,
                config_dir=config,
                audit_batch_size=50,
                audit_hmac_key=AUDIT_KEY,
                audit_sink_headers={"siem": {"Authorization": "Bearer tok-siem-77"}},
            )
        )
    )


def test_an_http_sink_that_fails_and_times_out_loses_nothing(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    receiver = Receiver(["500", "timeout", "500", "ok", "500", "500", "500", "500", "500", "500"])
    rt = http_runtime(postgres_url, redis_url, tmp_path, receiver)
    try:
        add_events(rt, 120)
        first = ship(rt)["sinks"]["siem"]
        assert first["error"] is not None and "HTTP 500 after 6 attempts" in first["error"]
        assert fleet_gauge(rt.sessions, "fleet_audit_sink_up", {"sink": "siem"}) == 0
        backlog = fleet_gauge(
            rt.sessions,
            "fleet_audit_backlog_events",
            {"source": "configuration_audit_log", "sink": "siem"},
        )
        assert backlog is not None and backlog > 0
        second = ship(rt)["sinks"]["siem"]  # the receiver has recovered
        assert second["error"] is None
        got = [e["event_id"] for e in receiver.received]
        unique = list(dict.fromkeys(got))  # at least once: receivers drop repeats by event_id
        assert [i for i in unique if not i.startswith("checkpoint")] == expected_ids(120, 3, 1)
        assert receiver.headers[0]["Authorization"] == "Bearer tok-siem-77"
        assert fleet_gauge(rt.sessions, "fleet_audit_sink_up", {"sink": "siem"}) == 1
    finally:
        receiver.close()
        rt.close()


def test_a_loki_sink_gets_each_record_as_written_in_its_source_stream(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    from tasks.audit.events import line_hash

    receiver = Receiver([])
    rt = http_runtime(postgres_url, redis_url, tmp_path, receiver, form="loki")
    try:
        add_events(rt, 12)
        assert ship(rt)["sinks"]["siem"]["error"] is None
        streams = [s for body in receiver.bodies for s in orjson.loads(body)["streams"]]
        by_source: dict[str, list[str]] = {}
        for stream in streams:
            labels = stream["stream"]
            assert labels["job"] == "config-fleet-audit" and labels["sink"] == "siem"
            for nanos, line in stream["values"]:
                event = orjson.loads(line)
                assert event["source"] == labels["source"]
                assert line_hash(line.encode() + b"\n") == event["hash"]  # as written
                if "timestamp" in event:  # the event's own time, in nanoseconds
                    stamp = datetime.fromisoformat(event["timestamp"]).timestamp()
                    assert int(nanos) == int(stamp * 1e9)
                by_source.setdefault(labels["source"], []).append(event["event_id"])
        shipped_ids = [i for ids_ in by_source.values() for i in ids_]
        assert sorted(i for i in shipped_ids if not i.startswith("checkpoint")) == sorted(
            expected_ids(12, 3, 1)
        )
    finally:
        receiver.close()
        rt.close()


def test_a_refusing_sink_is_stopped_until_resumed(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    receiver = Receiver(["400"])
    rt = http_runtime(postgres_url, redis_url, tmp_path, receiver)
    env = shipper_env(postgres_url, redis_url, tmp_path, tmp_path / "config")
    try:
        add_events(rt, 10)
        result = ship(rt)["sinks"]["siem"]
        assert result["stopped"] == "audit sink siem: refused with HTTP 400"
        assert ship(rt)["sinks"]["siem"]["stopped"] is not None  # stays stopped
        assert receiver.received == []
        assert (
            REGISTRY.get_sample_value(
                "fleet_audit_sink_errors_total", {"sink": "siem", "kind": "refused"}
            )
            >= 1
        )
        resumed = run_fleet("audit", "resume", "siem", env=env)
        assert resumed.returncode == 0, resumed.stderr
        assert ship(rt)["sinks"]["siem"]["stopped"] is None
        assert len({e["event_id"] for e in receiver.received}) >= 14
    finally:
        receiver.close()
        rt.close()


def test_verify_cli_names_the_broken_record(rt: Runtime, archive: Path, tmp_path: Path) -> None:
    add_events(rt, 30)
    ship(rt)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_HOME"] = str(tmp_path / "home")
    env["FLEET_AUDIT_HMAC_KEY"] = AUDIT_KEY
    env["FLEET_DATABASE_URL"] = rt.settings.database_url or ""
    ok = run_fleet("audit", "verify", str(archive), env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 36 records"), ok.stderr
    # A copy kept elsewhere is judged as of when it was copied: two hours on, with no
    # checkpoint since (one is written every hour), its end was cut.
    later = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S")
    stale = run_fleet("audit", "verify", "--no-db", "--as-of", later, str(archive), env=env)
    assert stale.returncode == 1 and "the end of the archive was cut" in stale.stderr
    first = sorted(archive.glob("*.jsonl"))[0]
    records = first.read_bytes().splitlines(keepends=True)
    del records[3]
    first.write_bytes(b"".join(records))
    broken = run_fleet("audit", "verify", str(archive), env=env)
    assert broken.returncode == 1
    assert broken.stderr.startswith(f"fleet: error: audit chain broken at {first}:4 (seq 5,")
    assert "expected seq 4" in broken.stderr


# Id gaps: rows commit out of id order; a missing id is waited for, never skipped while a
# transaction could still commit it.

INSERT_ONE = (
    "INSERT INTO configuration_audit_log (action, key, environment, scope, version, user_id,"
    " timestamp, checksum, sensitive, metadata) VALUES ('SET', %s, 'production', 'environment',"
    " 'v', 'admin', now(), 'c', false, '{}') RETURNING id"
)


def writer(rt: Runtime, autocommit: bool = False) -> psycopg.Connection[Any]:
    url = rt.settings.database_url or ""
    return psycopg.connect(
        url.replace("postgresql+psycopg://", "postgresql://"), autocommit=autocommit
    )


def insert_one(connection: psycopg.Connection[Any], key: str) -> int:
    row = connection.execute(INSERT_ONE, (key,)).fetchone()
    assert row is not None
    return int(row[0])


def config_ids(archive: Path) -> list[int]:
    return [
        int(e["event_id"].split(":")[1])
        for e in shipped(archive)
        if e["source"] == "configuration_audit_log"
    ]


def gaps_passed() -> float:
    labels = {"source": "configuration_audit_log", "sink": "archive"}
    return REGISTRY.get_sample_value("fleet_audit_id_gaps_total", labels) or 0.0


def with_grace(rt: Runtime, grace: timedelta) -> Runtime:
    return Runtime(rt.settings.model_copy(update={"audit_gap_grace": grace}))


def test_a_row_committed_after_a_later_id_is_shipped_in_its_place(
    rt: Runtime, archive: Path
) -> None:
    add_events(rt, 2)
    ship(rt)
    eager = with_grace(rt, timedelta(0))  # only the running transaction holds the gap
    try:
        with writer(rt) as slow, writer(rt, autocommit=True) as fast:
            late = insert_one(slow, "late")  # id 3, not committed yet
            early = insert_one(fast, "early")  # id 4, committed
            assert (late, early) == (3, 4)
            for _ in range(2):  # grace long past: still waits, the transaction runs
                result = ship(eager)["sinks"]["archive"]
                assert "configuration_audit_log" not in result["shipped"]
            assert config_ids(archive) == [1, 2]
            slow.commit()
        ship(eager)
    finally:
        eager.close()
    assert config_ids(archive) == [1, 2, 3, 4]
    assert verify([archive], hmac_key(rt.settings)).ok
    assert gaps_passed() == 0


def test_a_row_committed_between_the_page_read_and_the_check_is_not_skipped(
    rt: Runtime, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page is read, then the transaction holding the missing id commits, then the
    check finds no transaction running: the gap must not be passed on the page read before
    the commit (that would skip the row for good)."""
    from tasks.audit.shipper import Shipper

    add_events(rt, 2)
    ship(rt)
    eager = with_grace(rt, timedelta(0))
    try:
        with writer(rt) as slow, writer(rt, autocommit=True) as fast:
            assert insert_one(slow, "late") == 3
            assert insert_one(fast, "early") == 4
            ship(eager)  # the gap is seen; the transaction runs: it waits
            assert config_ids(archive) == [1, 2]
            monkeypatch.setattr(Shipper, "_before_gap_check", lambda self: slow.commit())
            ship(eager)
    finally:
        eager.close()
    assert config_ids(archive) == [1, 2, 3, 4]
    assert verify([archive], hmac_key(rt.settings)).ok


def test_a_rolled_back_id_is_passed_once_the_grace_is_over(rt: Runtime, archive: Path) -> None:
    add_events(rt, 2)
    ship(rt)
    before = gaps_passed()
    with writer(rt) as aborted:
        assert insert_one(aborted, "aborted") == 3
        aborted.rollback()
    with writer(rt, autocommit=True) as fast:
        assert insert_one(fast, "after") == 4
    waiting = ship(rt)["sinks"]["archive"]  # the default grace (2 s) has not passed
    assert "configuration_audit_log" not in waiting["shipped"]
    with rt.engine.begin() as connection:  # as if the grace had passed
        connection.execute(
            text(
                "UPDATE audit_cursors SET gap_seen_at = gap_seen_at - interval '1 minute'"
                " WHERE source = 'configuration_audit_log'"
            )
        )
    passed = ship(rt)["sinks"]["archive"]
    assert passed["shipped"]["configuration_audit_log"] == 1
    assert config_ids(archive) == [1, 2, 4]
    assert gaps_passed() == before + 1
    assert verify([archive], hmac_key(rt.settings)).ok
    with rt.engine.connect() as connection:
        cursor = connection.execute(
            text(
                "SELECT last_id, gap_seen_at FROM audit_cursors"
                " WHERE source = 'configuration_audit_log'"
            )
        ).one()
    assert (cursor.last_id, cursor.gap_seen_at) == (4, None)


def test_sqlite_gaps_are_final_when_seen(
    sqlite_url: str, redis_url: str, tmp_path: Path, archive: Path
) -> None:
    config = config_with(tmp_path, FILE_SINK % archive)
    settings = FleetSettings(
        home=tmp_path / "home", database_url=sqlite_url, redis_url=redis_url, config_dir=config
    )
    runtime = install(Runtime(settings))
    try:
        add_events(runtime, 4)
        with runtime.engine.begin() as connection:  # ids 2 and 3 never committed
            connection.execute(text("DELETE FROM configuration_audit_log WHERE id IN (2, 3)"))
        before = gaps_passed()
        result = ship(runtime)["sinks"]["archive"]
        assert result["shipped"]["configuration_audit_log"] == 2
        assert config_ids(archive) == [1, 4]
        assert gaps_passed() == before + 1
        assert verify([archive], hmac_key(settings)).ok
    finally:
        runtime.close()


def both_paths(rt: Runtime, source: str, protector: Any) -> tuple[list[bytes], int, list[Any]]:
    """A source's rows chained the PostgreSQL way (rendered by the server) and rendered row
    by row the Python way: (the lines, how many were malformed, the Python renderings)."""
    from sqlalchemy import select

    from tasks.audit.events import GENESIS, Chain, chain_page, render_values
    from tasks.audit.reading import TABLES, _Pages

    table = TABLES[source]
    with rt.engine.connect() as connection:
        plain = connection.execute(select(table).order_by(table.c.id)).all()
    pages = _Pages(rt, table, 100)
    try:
        rendered = pages.read(0)
    finally:
        pages.close()
    assert len(rendered) == len(plain) > 0
    lines, malformed = chain_page(Chain(0, GENESIS), source, rendered, protector)
    columns = list(table.c.keys())
    return lines, malformed, [render_values(source, columns, tuple(r), protector) for r in plain]


def event_of(line: bytes) -> dict[str, Any]:
    """A record's event: the record without its place in the chain."""
    return {k: v for k, v in orjson.loads(line).items() if k not in ("seq", "prev_hash", "hash")}


def test_events_rendered_by_postgres_equal_those_rendered_in_python(rt: Runtime) -> None:
    """The PostgreSQL hot path (the document rendered by the server, written and hashed as
    it is) and the row-by-row path make the same events: timestamps with and without a
    fraction, NULLs, unicode, quotes, sensitive rows, keys to protect in plain rows (also
    spelled with an escape, or nested), metadata over several lines, malformed and JSONB
    metadata, every source. Each line's hash is that of its bytes, and the page verifies.
    The database's time zone is not UTC: pages are read in UTC all the same, and their
    connection goes back to the pool in the database's zone, out of autocommit."""

    from tasks.audit.events import (
        Protector,
        line_hash,
    )
    from tasks.audit.reading import TABLES, _Pages

    with rt.engine.connect() as connection:
        name = connection.exec_driver_sql("SELECT current_database()").scalar_one()
        connection.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET timezone = 'America/St_Johns'")
        connection.commit()
    rt.engine.dispose()  # new connections take the zone
    whole = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    rows = [
        {"timestamp": whole, "tenant_id": None, "metadata": None, "sensitive": False},
        {
            "timestamp": whole.replace(microsecond=120000),
            "tenant_id": "t-ü\"'\\",
            "metadata": '{"value": "é😀", "password": "x", "n": 1.5e-7, "big": 12345678901234}',
            "sensitive": True,
        },
        {"timestamp": whole.replace(microsecond=7), "tenant_id": "t", "metadata": "{oops"},
        {"metadata": '{"db_password": "hunter2", "who": "admin"}'},
        {"metadata": '{"pass\\u0077ord": "hunter3"}'},
        {"metadata": '{"outer": {"api_token": "hunter4"}, "list": [{"secret": "hunter5"}]}'},
        {"metadata": '{\n  "spans": "lines",\r\n  "n": 2\n}'},
        {"metadata": '{"value": "plain", "ok": true}'},
    ]
    with rt.engine.begin() as connection:
        for i, extra in enumerate(rows):
            values = {
                "action": "SET",
                "key": f"k.{i}",
                "environment": "production",
                "scope": "environment",
                "version": None,
                "user_id": "admin\n\t",
                "checksum": "c",
                "sensitive": False,
                "timestamp": whole,
                **extra,
            }
            connection.execute(insert(ConfigurationAuditLog.__table__), values)
        connection.execute(
            insert(FeatureFlagAuditLog.__table__),
            {
                "flag_key": "f",
                "action": "UPDATE",
                "user_id": None,
                "timestamp": whole,
                "metadata": "[]",
            },
        )
    with rt.sessions.begin() as session:
        record(session, "canary_verdict", "deploy-1", whole, verdict="pass", score=0.25)
    protector = Protector(b"k" * 32)
    compared, written = 0, []
    for source in TABLES:
        lines, malformed, expected = both_paths(rt, source, protector)
        written += lines
        assert malformed == sum(e.malformed for e in expected)
        for line, want in zip(lines, expected, strict=True):
            assert line_hash(line) == orjson.loads(line)["hash"]
            assert event_of(line) == want.event
            compared += 1
    assert compared == 10
    assert b"hunter" not in b"".join(written)
    assert b"+00:00" in b"".join(written) and b"-03:30" not in b"".join(written)
    rt.engine.dispose()  # one connection in the pool: the pages', once they close
    pages = _Pages(rt, TABLES["configuration_audit_log"], 3)
    pages.read(0)  # a full page: the next one is read ahead, then waited for on close
    backend = pages.connection.info.backend_pid
    pages.close()
    pages.close()  # closing again changes nothing
    with rt.engine.connect() as connection:  # the pages' connection, back from the pool
        assert connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() == backend
        zone = connection.exec_driver_sql("SHOW timezone").scalar_one()
        assert zone == "America/St_Johns"
        assert connection.connection.driver_connection.autocommit is False

    rt.engine.dispose()  # a close interrupted while it waits for the read ahead: dropped
    pages = _Pages(rt, TABLES["configuration_audit_log"], 3)
    pages.read(0)
    backend = pages.connection.info.backend_pid
    assert pages.ahead is not None
    ahead = pages.ahead[1]
    ahead.result()  # the read ahead is done: the interrupt comes from the wait itself

    def interrupted(timeout: float | None = None) -> BaseException | None:
        raise KeyboardInterrupt

    ahead.exception = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        pages.close()
    pages.close()
    assert rt.engine.pool.checkedout() == 0  # given up, not held
    with rt.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != backend


def test_a_page_with_no_key_word_ships_flat_metadata_as_stored_and_the_rest_as_before(
    rt: Runtime,
) -> None:
    """A page whose metadata holds no sensitive key word, escape or line break takes the
    page-wide fast path (only each text's shape is checked, by msgspec): the events are
    still those of the row-by-row path, for flat, nested, malformed and odd JSON alike."""

    from tasks.audit.events import Protector

    texts = [
        '{"who": "admin", "n": 1}',
        '  {"spaced" :  "out", "t": true, "f": null }  ',
        '{"outer": {"who": 1}}',
        '{"list": [1, 2]}',
        '{"big": 123456789012345678901234567890, "x": 1.5e-7}',
        '{"huge": 1e400}',
        '{"a": 1, "a": 2}',
        "{oops",
        "[]",
        '"text"',
        "1",
        "",
    ]
    with rt.engine.begin() as connection:
        for i, metadata in enumerate(texts):
            connection.execute(
                insert(ConfigurationAuditLog.__table__),
                {
                    "action": "SET",
                    "key": f"k.{i}",
                    "environment": "production",
                    "scope": "environment",
                    "user_id": "admin",
                    "checksum": "c",
                    "sensitive": False,
                    "timestamp": datetime(2026, 3, 1, 12, tzinfo=UTC),
                    "metadata": metadata,
                },
            )
    protector = Protector(b"k" * 32)
    assert protector.plain_page(t.encode() for t in texts)
    lines, malformed, expected = both_paths(rt, "configuration_audit_log", protector)
    assert malformed == sum(e.malformed for e in expected) == 3  # {oops, 1e400, ""
    assert len(lines) == len(texts)
    for line, want in zip(lines, expected, strict=True):
        assert event_of(line) == want.event
    assert b'"metadata":  {"spaced" :  "out"' in lines[1]  # flat: shipped as stored


@pytest.mark.parametrize("nth", [0, 1, 2, 4, 7])
def test_an_audit_commit_whose_answer_is_lost_ships_every_event_once(
    rt: Runtime, archive: Path, postgres_url: str, redis_url: str, tmp_path: Path, nth: int
) -> None:
    """The shipper's database goes through a proxy that lets ``nth`` COMMITs through,
    then forwards the next one (PostgreSQL commits it) and cuts the connection before the
    answer. Whatever that commit was (the fence, a batch's state and cursor, the run's
    checkpoint), the runs that follow ship every event once, in order, and the archive
    verifies."""
    from sqlalchemy.engine import make_url

    from tests.cutting_proxy import cutting_proxy

    add_events(rt, 300)
    url = make_url(postgres_url)
    with cutting_proxy((url.host or "127.0.0.1", url.port or 5432), b"COMMIT", times=0) as proxy:
        proxied = install(
            Runtime(
                rt.settings.model_copy(
                    update={
                        "database_url": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
                            hide_password=False
                        )
                    }
                )
            )
        )
        proxy.arm(b"COMMIT", after=nth)
        with contextlib.suppress(Exception):  # raised, or said in the sink's result
            ship(proxied)
        assert proxy.cuts == 1
        for _ in range(3):  # the next runs, as the schedule makes them
            ship(proxied)
        proxied.close()
    install(rt)
    assert_exactly_once_in_order(ids(shipped(archive)), expected_ids(300, 3, 1))
    verdict = verify([archive], hmac_key(rt.settings))
    assert verdict.ok, verdict.problem
