"""The audit archive is never destroyed: a sink renamed, a database new or restored from an
older backup, records left past the committed position by a crash, all are adopted (never
deleted, never shipped twice); files that do not continue the chain stop only their sink;
two sinks cannot share a directory; a failing sink (unusable, or its disk refusing writes)
leaves the other sinks shipping, with its state and metrics saying why."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import delete, select

from tasks.audit import hmac_key, ship
from tasks.audit.events import GENESIS, Chain
from tasks.audit.verify import against_state, verify
from tests.helpers import ROOT, fleet_gauge, wait_for
from tests.integration.test_audit import (
    AUDIT_KEY,
    add_events,
    assert_exactly_once_in_order,
    config_with,
    expected_ids,
    ids,
    shipped,
)
from workers.db.models import AuditCursor, AuditSinkState, FleetHealth
from workers.jobs import PermanentError
from workers.locks import PREFIX as LOCK_PREFIX
from workers.runtime import Runtime, install
from workers.settings import FleetSettings

ONE = "sinks:\n  - {name: %s, type: file, path: %s}\n"
TWO = ONE + "  - {name: %s, type: file, path: %s}\n"


@pytest.fixture
def make_rt(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[object]:
    made: list[Runtime] = []

    def make(sinks: str) -> Runtime:
        config = config_with(tmp_path, sinks)
        rt = install(
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
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def archive_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.jsonl"))}


def kept(before: dict[str, bytes], after: dict[str, bytes]) -> bool:
    """Every byte there before is still there, at the same place."""
    return all(after.get(name, b"").startswith(data) for name, data in before.items())


def forget_state(rt: Runtime) -> None:
    """As a new (or emptied) database shows it: no sink state, no cursors."""
    with rt.sessions.begin() as session:
        session.execute(delete(AuditSinkState))
        session.execute(delete(AuditCursor))


def test_a_renamed_sink_adopts_its_archive(make_rt: object, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    rt = make_rt(ONE % ("archive", archive))  # type: ignore[operator]
    add_events(rt, 120)
    ship(rt)
    before = archive_bytes(archive)
    renamed = make_rt(ONE % ("archive-v2", archive))  # type: ignore[operator]
    add_events(renamed, 30, start=120)
    result = ship(renamed)["sinks"]["archive-v2"]
    assert result["error"] is None and result["shipped"]["configuration_audit_log"] == 30
    after = archive_bytes(archive)
    assert kept(before, after)
    assert verify([archive], hmac_key(renamed.settings)).ok
    assert_exactly_once_in_order(ids(shipped(archive)), expected_ids(150, 6, 2))


@pytest.mark.parametrize("behind", ["new database", "restored from an older backup"])
def test_a_database_without_the_sinks_state_adopts_the_archive(
    make_rt: object, tmp_path: Path, behind: str
) -> None:
    archive = tmp_path / "archive"
    rt = make_rt(ONE % ("archive", archive))  # type: ignore[operator]
    add_events(rt, 100)
    ship(rt)
    with rt.sessions() as session:
        old_state = [
            (s.seq, s.head_hash, s.segment, s.offset)
            for s in session.scalars(select(AuditSinkState))
        ]
        old_cursors = [(c.source, c.last_id) for c in session.scalars(select(AuditCursor))]
    add_events(rt, 40, start=100)
    ship(rt)
    before = archive_bytes(archive)
    forget_state(rt)
    if behind != "new database":
        with rt.sessions.begin() as session:
            seq, head, segment, offset = old_state[0]
            session.add(
                AuditSinkState(
                    sink="archive",
                    seq=seq,
                    head_hash=head,
                    segment=segment,
                    offset=offset,
                    updated_at=datetime.now(UTC),
                )
            )
            for source, last in old_cursors:
                session.add(
                    AuditCursor(
                        source=source,
                        sink="archive",
                        last_id=last,
                        updated_at=datetime.now(UTC),
                    )
                )
    add_events(rt, 10, start=140)
    ship(rt)
    assert kept(before, archive_bytes(archive))
    assert verify([archive], hmac_key(rt.settings)).ok
    assert_exactly_once_in_order(ids(shipped(archive)), expected_ids(150, 9, 3))


def test_a_partial_last_line_is_the_only_cut(make_rt: object, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    rt = make_rt(ONE % ("archive", archive))  # type: ignore[operator]
    add_events(rt, 60)
    ship(rt)
    last = sorted(archive.glob("*.jsonl"))[-1]
    complete = last.read_bytes()
    with open(last, "ab") as handle:  # a crash in the middle of a write
        handle.write(b'{"event_id": "configuration_audit_log:61", "sou')
    add_events(rt, 5, start=60)
    ship(rt)
    assert last.read_bytes().startswith(complete)
    assert verify([archive], hmac_key(rt.settings)).ok
    assert_exactly_once_in_order(ids(shipped(archive)), expected_ids(65, 6, 2))


def test_sinks_sharing_a_directory_are_refused(make_rt: object, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    for inner in (archive, archive / "inner"):
        rt = make_rt(TWO % ("a", archive, "b", inner))  # type: ignore[operator]
        add_events(rt, 5)
        with pytest.raises(PermanentError, match="audit sinks a and b share"):
            ship(rt)
        assert not archive.exists() or not list(archive.rglob("*.jsonl"))


def sink_row(rt: Runtime, sink: str) -> FleetHealth | None:
    with rt.sessions() as session:
        return session.get(FleetHealth, ("audit_sink", sink))


def test_files_that_do_not_continue_the_chain_stop_only_their_sink(
    make_rt: object, tmp_path: Path
) -> None:
    foreign, good = tmp_path / "foreign", tmp_path / "good"
    foreign.mkdir()
    planted = foreign / "audit-20260101-000001.jsonl"
    planted.write_bytes(b'{"seq": 7, "event_id": "x:1", "hash": "nope"}\n')
    rt = make_rt(TWO % ("foreign", foreign, "good", good))  # type: ignore[operator]
    add_events(rt, 20)
    result = ship(rt)["sinks"]
    assert "does not continue" in result["foreign"]["error"] or "hash" in result["foreign"]["error"]
    assert (
        result["good"]["error"] is None
        and result["good"]["shipped"]["configuration_audit_log"] == 20
    )
    assert planted.read_bytes() == b'{"seq": 7, "event_id": "x:1", "hash": "nope"}\n'
    assert fleet_gauge(rt.sessions, "fleet_audit_sink_up", {"sink": "foreign"}) == 0
    assert fleet_gauge(rt.sessions, "fleet_audit_sink_up", {"sink": "good"}) == 1
    row = sink_row(rt, "foreign")
    assert row is not None and (row.detail or "").startswith("unusable:")
    assert str(foreign) in (row.detail or "")


def test_a_sink_whose_writes_fail_leaves_the_others_shipping(
    make_rt: object, tmp_path: Path
) -> None:
    """A disk that refuses the sink's writes (here: its directory's parent is a file)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    good = tmp_path / "good"
    rt = make_rt(TWO % ("broken", blocker / "archive", "good", good))  # type: ignore[operator]
    add_events(rt, 20)
    result = ship(rt)["sinks"]
    assert "NotADirectoryError" in result["broken"]["error"]
    assert result["good"]["shipped"]["configuration_audit_log"] == 20
    assert fleet_gauge(rt.sessions, "fleet_audit_sink_up", {"sink": "broken"}) == 0
    backlog = fleet_gauge(
        rt.sessions,
        "fleet_audit_backlog_events",
        {"source": "configuration_audit_log", "sink": "broken"},
    )
    assert backlog == 20
    row = sink_row(rt, "broken")
    assert row is not None and (row.detail or "").startswith("io:")


# Fencing: a shipper paused past its lease cannot write beside its successor -----------------


def shipper_env(rt: Runtime) -> dict[str, str]:
    settings = rt.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_HOME=str(settings.home),
        FLEET_DATABASE_URL=settings.database_url or "",
        FLEET_REDIS_URL=settings.redis_url or "",
        FLEET_CONFIG_DIR=str(settings.configuration_dir),
        FLEET_AUDIT_BATCH_SIZE="50",
        FLEET_AUDIT_LOCK_TTL="2",
        FLEET_AUDIT_HMAC_KEY=AUDIT_KEY,
        FLEET_LOG_FORMAT="json",
        PYTHONPATH=str(ROOT),
    )
    return env


def start_shipper(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", "run", "audit.ship"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


@pytest.mark.parametrize("trial", [1, 2, 3])
def test_a_shipper_stopped_past_its_lease_cannot_fork_the_chain(
    make_rt: object, tmp_path: Path, redis_client: redis.Redis, trial: int
) -> None:
    archive = tmp_path / "archive"
    rt = make_rt(ONE % ("archive", archive))  # type: ignore[operator]
    add_events(rt, 3000)
    env = shipper_env(rt)
    first = start_shipper(env, tmp_path / "first.log")
    try:
        # Stopped once it has shipped something: at some point of a batch, or between two.
        wait_for(
            lambda: sum(p.stat().st_size for p in archive.glob("*.jsonl")) > 2000 * trial,
            timeout=60,
            what="the first shipper to write",
            interval=0.01,
        )
        first.send_signal(signal.SIGSTOP)
        wait_for(
            lambda: not redis_client.exists(LOCK_PREFIX + "audit:archive"),
            timeout=30,
            what="the first shipper's lease to run out",
        )
        second = subprocess.run(
            [sys.executable, "-m", "workers", "run", "audit.ship"],
            env=env,
            capture_output=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert second.returncode == 0, second.stderr.decode()[-2000:]
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(120) == 0, (tmp_path / "first.log").read_text()[-2000:]
    ship(rt)  # whatever is left
    assert verify([archive], hmac_key(rt.settings)).ok
    assert_exactly_once_in_order(ids(shipped(archive)), expected_ids(3000, 3, 1))


def test_every_run_ends_with_a_checkpoint(make_rt: object, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    rt = make_rt(ONE % ("archive", archive))  # type: ignore[operator]
    interval = rt.settings.audit_checkpoint_interval  # an hour: never due again in this test

    def last_sources(count: int) -> list[str]:
        return [r["source"] for r in shipped(archive)][-count:]

    add_events(rt, 120)  # three batches of 50: the first carries the first checkpoint
    assert ship(rt)["sinks"]["archive"]["checkpoints"] == 2  # and the end is signed
    assert last_sources(1) == ["checkpoint"]
    checkpoints = ship(rt)["sinks"]["archive"]["checkpoints"]
    assert checkpoints == 0  # idle, and the head is signed: nothing to add
    add_events(rt, 5, start=120)
    assert ship(rt)["sinks"]["archive"]["checkpoints"] == 1
    assert last_sources(2)[0] != "checkpoint" and last_sources(1) == ["checkpoint"]
    assert [r["source"] for r in shipped(archive)].count("checkpoint") == 3
    assert verify([archive], hmac_key(rt.settings), interval=interval).ok


# One key per fleet --------------------------------------------------------------------------


def test_a_shared_database_needs_the_fleets_one_key(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    config = config_with(tmp_path, ONE % ("archive", tmp_path / "archive"))
    settings = FleetSettings(
        home=tmp_path / "home", database_url=postgres_url, redis_url=redis_url, config_dir=config
    )
    rt = install(Runtime(settings))
    try:
        with pytest.raises(PermanentError, match="FLEET_AUDIT_HMAC_KEY"):
            ship(rt)
        assert not (tmp_path / "home" / "audit-hmac.key").exists()  # no key of its own
        # The key may live in the fleet's secret store instead.
        from tasks.secrets.stores import open_store

        open_store(settings, rt.engine).write("audit/hmac", {"key": "stored-fleet-key-0042"})
        from_store = settings.model_copy(update={"audit_hmac_key_path": "audit/hmac"})
        assert hmac_key(from_store, rt.engine) == b"stored-fleet-key-0042"
    finally:
        rt.close()


def test_a_shipper_with_another_key_is_refused_until_the_key_is_rotated(
    make_rt: object, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    rt = make_rt(ONE % ("archive", archive))  # type: ignore[operator]
    add_events(rt, 20)
    ship(rt)
    before = archive_bytes(archive)
    other = rt.settings.model_copy(update={"audit_hmac_key": SecretStr("another-hosts-key-9999")})
    rt_other = install(Runtime(other))
    try:
        add_events(rt_other, 5, start=20)
        result = ship(rt_other)["sinks"]["archive"]
        assert "signed with key" in result["error"]
        assert archive_bytes(archive) == before  # nothing written with the wrong key
        row = sink_row(rt_other, "archive")
        assert row is not None and (row.detail or "").startswith("key:")
        # Rotating: the old key listed as an old one, the new one signs from now on.
        rotated = other.model_copy(update={"audit_hmac_keys": SecretStr(AUDIT_KEY)})
        rt_rotated = install(Runtime(rotated))
        try:
            assert ship(rt_rotated)["sinks"]["archive"]["error"] is None
            assert verify([archive], [b"another-hosts-key-9999", AUDIT_KEY.encode()]).ok
        finally:
            rt_rotated.close()
    finally:
        rt_other.close()
    assert_exactly_once_in_order(ids(shipped(archive)), expected_ids(25, 6, 2))


# Verification that catches truncation and rewrites ------------------------------------------


def relink(records: list[dict[str, object]], seq: int = 0, head: str = GENESIS) -> list[bytes]:
    """Records chained anew from ``seq``/``head``, as a forger without the key would."""
    chain = Chain(seq, head)
    return [
        chain.link({k: v for k, v in r.items() if k not in ("seq", "prev_hash", "hash")})
        for r in records
    ]


def _edit_first(directory: Path, change: Callable[[list[bytes]], None]) -> None:
    first = sorted(directory.glob("*.jsonl"))[0]
    lines = first.read_bytes().splitlines(keepends=True)
    change(lines)
    first.write_bytes(b"".join(lines))


def _swap(lines: list[bytes]) -> None:
    lines[3], lines[4] = lines[4], lines[3]


def _cut_end(directory: Path, before_checkpoint: bool) -> None:
    last = sorted(directory.glob("*.jsonl"))[-1]
    lines = last.read_bytes().splitlines(keepends=True)
    keep = len(lines) - 2
    if before_checkpoint:
        sources = [orjson.loads(line)["source"] for line in lines]
        keep = max(i for i, source in enumerate(sources) if source == "checkpoint")
    last.write_bytes(b"".join(lines[:keep]))


def _rewrite(directory: Path, forge: bool) -> None:
    files = sorted(directory.glob("*.jsonl"))
    lines = [line for f in files for line in f.read_bytes().splitlines(keepends=True)]
    records = [orjson.loads(line) for line in lines]
    if forge:  # the last checkpoint signed again with a key that is not the fleet's
        at = max(i for i, r in enumerate(records) if r["source"] == "checkpoint")
        signed = "{sink}:{signed_seq}:{signed_hash}:{signed_at}".format(**records[at])
        mac = hmac.new(b"not-the-fleets-key", signed.encode(), hashlib.sha256)
        records[at]["hmac"] = mac.hexdigest()
        before = records[at - 1]
        rewritten = lines[:at] + relink(records[at:], int(before["seq"]), str(before["hash"]))
    else:  # an event edited, checkpoints (which need the key) dropped, all links redone
        records = [r for r in records if r["source"] != "checkpoint"]
        records[0]["key"] = "key.rewritten"
        rewritten = relink(records)
    for f in files:
        f.unlink()
    (directory / files[0].name).write_bytes(b"".join(rewritten))


def _second(directory: Path) -> Path:
    return sorted(directory.glob("*.jsonl"))[1]


TAMPER: dict[str, Callable[[Path], None]] = {
    "field edited": lambda d: _edit_first(
        d, lambda lines: lines.__setitem__(4, lines[4].replace(b'"SET"', b'"DELETE"'))
    ),
    "line removed": lambda d: _edit_first(d, lambda lines: lines.__delitem__(3)),
    "lines reordered": lambda d: _edit_first(d, _swap),
    "line inserted": lambda d: _edit_first(d, lambda lines: lines.insert(3, lines[5])),
    "segment deleted": lambda d: _second(d).unlink(),
    "segment inserted": lambda d: (
        d / (sorted(d.glob("*.jsonl"))[0].name[:-6] + "a.jsonl")
    ).write_bytes(_second(d).read_bytes()),
    "tail cut": lambda d: _cut_end(d, before_checkpoint=False),
    "cut before the last checkpoint": lambda d: _cut_end(d, before_checkpoint=True),
    "chain rewritten without the key": lambda d: _rewrite(d, forge=False),
    "checkpoint forged with another key": lambda d: _rewrite(d, forge=True),
}


def test_every_kind_of_tampering_is_reported(make_rt: object, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    sinks = f"sinks:\n  - {{name: archive, type: file, path: {archive}, max_bytes: 4096}}\n"
    rt = make_rt(sinks)  # type: ignore[operator]
    rt = Runtime(rt.settings.model_copy(update={"audit_checkpoint_interval": timedelta(0)}))
    try:
        add_events(rt, 80)
        ship(rt)
        add_events(rt, 10, start=80)
        ship(rt)
        keys = [AUDIT_KEY.encode()]

        def problem(directory: Path) -> str | None:
            verdict = verify([directory], keys, interval=rt.settings.audit_checkpoint_interval)
            if verdict.ok:
                verdict, compared = against_state(verdict, rt, "archive")
                assert compared == "archive"
            return verdict.problem

        assert len(list(archive.glob("*.jsonl"))) >= 3
        assert problem(archive) is None  # untouched: it verifies
        found = {}
        for kind, tamper in TAMPER.items():
            copy = tmp_path / kind.replace(" ", "-")
            shutil.copytree(archive, copy)
            tamper(copy)
            found[kind] = problem(copy)
        assert [kind for kind, reported in found.items() if not reported] == []
        assert "cut from the end" in (found["tail cut"] or "")
        assert "cut from the end" in (found["cut before the last checkpoint"] or "")
        assert "signature is wrong" in (found["checkpoint forged with another key"] or "")
    finally:
        rt.close()
