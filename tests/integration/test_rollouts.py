"""rollouts.advance end to end: a real Prometheus scrapes two flags' variants (one
treatment as fast as its control, one three times slower); services evaluate the flags
through the platform's cache and invalidation channel and push impressions in the
platform's format; ``impressions.aggregate`` counts them, and those counts gate each step.
One rollout reaches 100 %, the other is rolled back at its first step; every change is
the platform's write (row, audit row, invalidation), and a human's change is never
overwritten."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from tasks.canary.demo import ExpositionServer
from tasks.canary.prometheus import PrometheusSource
from tasks.impressions import drain
from tasks.rollouts import RolloutRefused, advance, set_state, start_rollout
from tasks.rollouts.demo import FlagService, latency_rollout, variants_exposition
from tests.flags import ENV, add_flags, human_update
from tests.helpers import free_port, run_fleet, wait_for
from tests.prometheus_server import prometheus, samples_in
from workers.db.models import (
    FeatureFlag,
    FeatureFlagAuditLog,
    FlagRollout,
    FlagRolloutStep,
    FleetAuditLog,
)
from workers.flagstore import CHANNEL
from workers.runtime import Runtime, install
from workers.settings import FleetSettings


@pytest.fixture(scope="module")
def scraped() -> Iterator[str]:
    """Each flag's app serves its variants' latency: new_search's treatment is 3x slower."""
    apps = {
        "checkout": ExpositionServer(
            {"metrics": variants_exposition("new_checkout", {"on": 0.1, "off": 0.1}, seed=1)}
        ),
        "search": ExpositionServer(
            {"metrics": variants_exposition("new_search", {"on": 0.3, "off": 0.1}, seed=2)}
        ),
    }
    with prometheus({job: [app.address] for job, app in apps.items()}) as url:
        query = 'count_over_time(app_latency_seconds{flag="new_search",flag_variant="on"}[20s])'
        wait_for(lambda: samples_in(url, query) >= 12, timeout=60, what="samples", interval=0.5)
        yield url
    for app in apps.values():
        app.close()


@pytest.fixture
def rt(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    made = install(
        Runtime(FleetSettings(home=tmp_path, database_url=postgres_url, redis_url=redis_url))
    )
    yield made
    made.close()


class Channel:
    """A subscriber on flag_cache_invalidation, as every service instance has."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.messages: list[dict[str, Any]] = []
        self.pubsub.subscribe(**{CHANNEL: lambda m: self.messages.append(json.loads(m["data"]))})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def close(self) -> None:
        self.thread.stop()
        self.thread.join(timeout=5)
        self.client.close()


@pytest.fixture
def channel(redis_url: str) -> Iterator[Channel]:
    listening = Channel(redis_url)
    yield listening
    listening.close()


def flag_percentage(rt: Runtime, key: str) -> float:
    with rt.sessions() as session:
        flag = session.get(FeatureFlag, (key, ENV))
        assert flag is not None
        return flag.rollout_percentage


class NeverAsked:
    """A metrics source for looks that must decide before asking Prometheus."""

    def range_samples(self, query: str, start: datetime, end: datetime, step: float) -> list[float]:
        raise AssertionError(f"Prometheus asked ({query}) when the look should not judge")


def test_one_rollout_reaches_100_and_the_bad_one_is_rolled_back_at_its_first_step(
    scraped: str, rt: Runtime, channel: Channel
) -> None:
    source = PrometheusSource(scraped)
    add_flags(rt, "new_checkout", "new_search")
    # A service whose cached flags never expire: only the invalidations refresh it.
    service = FlagService(rt.engine, rt.redis, clock=lambda: 0.0)
    try:
        with rt.sessions.begin() as session:
            for name, key in (("checkout", "new_checkout"), ("search", "new_search")):
                spec = latency_rollout(name, key, ENV)
                start_rollout(session, spec, datetime.now(UTC), "t", notify=rt.redis)
        assert flag_percentage(rt, "new_checkout") == flag_percentage(rt, "new_search") == 1.0

        # No impressions yet: the step waits, and Prometheus is not even asked.
        waited = advance(rt, NeverAsked())
        assert [look["decision"] for look in waited["looks"]] == ["wait", "wait"]
        assert "0 on and 0 off impressions at 1%" in waited["looks"][0]["reason"]

        paths: dict[str, list[float]] = {"new_checkout": [1.0], "new_search": [1.0]}
        shares: dict[float, float] = {}
        user = 0
        for _ in range(12):
            with rt.sessions() as session:
                active = [
                    r.flag_key
                    for r in session.scalars(
                        select(FlagRollout).where(FlagRollout.state == "active")
                    )
                ]
            if not active:
                break
            for key in active:
                served = service.evaluate_many(
                    key, ENV, (f"user-{i}" for i in range(user, user + 6000))
                )
                if key == "new_checkout":
                    shares[paths[key][-1]] = served["on"] / sum(served.values())
            user += 6000
            counted = drain(rt, batch_size=5000, budget_seconds=60)
            assert counted["dead_lettered"] == 0
            advance(rt, source)
            for key in paths:
                now_at = flag_percentage(rt, key)
                if now_at != paths[key][-1]:
                    paths[key].append(now_at)
            expected = len(paths["new_checkout"]) + len(paths["new_search"])
            # Every change reaches the services before they evaluate again.
            wait_for(
                lambda n=expected: len(service.invalidations) >= n,
                timeout=10,
                what="the invalidations",
            )
    finally:
        service.close()
    assert paths == {"new_checkout": [1.0, 5.0, 25.0, 50.0, 100.0], "new_search": [1.0, 0.0]}
    # The services served each step's share: the cache was dropped at every change.
    for step, share in shares.items():
        assert abs(share * 100 - step) <= max(2.0, step * 0.2), (step, share)
    with rt.sessions() as session:
        rows = {r.name: r for r in session.scalars(select(FlagRollout))}
        assert rows["checkout"].state == "completed"
        assert rows["search"].state == "rolled_back"
        assert "1% failed" in (rows["search"].reason or "")
        looks = session.scalars(
            select(FlagRolloutStep)
            .where(FlagRolloutStep.rollout_id == rows["checkout"].id)
            .order_by(FlagRolloutStep.id)
        ).all()
        judged = [s for s in looks if s.verdict is not None]
        assert [s.decision for s in judged] == ["advance", "advance", "advance", "complete"]
        assert all(s.treatment_impressions >= 50 and s.control_impressions >= 50 for s in judged)
        # Each step's impressions are its own: about its share of the 6,000 a round.
        own = [s.treatment_impressions / 6000 * 100 for s in judged]
        assert all(
            abs(got - step) <= max(1.0, step / 10)
            for got, step in zip(own, [1, 5, 25, 50], strict=True)
        ), own
        writes = session.scalars(
            select(FeatureFlagAuditLog)
            .where(FeatureFlagAuditLog.flag_key == "new_checkout")
            .order_by(FeatureFlagAuditLog.id)
        ).all()
        assert [w.action for w in writes] == ["UPDATE"] * 5
        assert {w.user_id for w in writes} == {"config-fleet-rollout"}
        flag_data = [json.loads(w.meta or "")["flag_data"] for w in writes]
        assert [d["rollout_percentage"] for d in flag_data] == [1.0, 5.0, 25.0, 50.0, 100.0]
        fleet = set(session.scalars(select(FleetAuditLog.action)))
        assert {"rollout_started", "rollout_completed", "rollout_rolled_back"} <= fleet
    wait_for(lambda: len(channel.messages) >= 7, timeout=10, what="7 invalidations")
    assert sorted((m["flag_key"], m["environment"]) for m in channel.messages) == sorted(
        [("new_checkout", ENV)] * 5 + [("new_search", ENV)] * 2
    )


def test_a_human_change_stops_it_in_conflict_and_is_never_overwritten(
    rt: Runtime, channel: Channel
) -> None:
    add_flags(rt, "new_checkout")
    spec = latency_rollout("checkout", "new_checkout", ENV)
    with rt.sessions.begin() as session:
        start_rollout(session, spec, datetime.now(UTC), "t", notify=rt.redis)
    human_update(rt, "new_checkout", 30.0)
    result = advance(rt, NeverAsked())
    assert [look["decision"] for look in result["looks"]] == ["conflict"]
    assert "changed by alice to 30%" in result["looks"][0]["reason"]
    assert flag_percentage(rt, "new_checkout") == 30.0
    assert advance(rt, NeverAsked())["looks"] == []  # stopped: never looked at again
    with rt.sessions() as session:
        row = session.scalars(select(FlagRollout)).one()
        assert row.state == "conflict"
        assert row.conflict is not None and row.conflict["changed_by"] == "alice"
        by_rollout = session.scalars(
            select(FeatureFlagAuditLog.id).where(
                FeatureFlagAuditLog.user_id == "config-fleet-rollout"
            )
        ).all()
        assert len(by_rollout) == 1  # the start, nothing since
    # Resuming adopts the flag as it stands: at 25 %, the last step under 30 %.
    with rt.sessions.begin() as session:
        set_state(session, "checkout", "resume", datetime.now(UTC), rt.redis)
    with rt.sessions() as session:
        row = session.scalars(select(FlagRollout)).one()
        assert (row.state, row.steps[row.step_index], row.written_percentage) == (
            "active",
            25.0,
            30.0,
        )
    assert advance(rt, NeverAsked())["looks"][0]["decision"] == "wait"  # no conflict now
    # A second change, then abort: stops without writing over it.
    human_update(rt, "new_checkout", 40.0, who="bob")
    advance(rt, NeverAsked())
    with rt.sessions.begin() as session:
        set_state(session, "checkout", "abort", datetime.now(UTC), rt.redis)
    assert flag_percentage(rt, "new_checkout") == 40.0
    wait_for(lambda: len(channel.messages) >= 1, timeout=10, what="the start's invalidation")
    assert len(channel.messages) == 1


def test_pause_resume_abort_and_what_start_refuses(rt: Runtime, channel: Channel) -> None:
    add_flags(rt, "new_checkout")
    spec = latency_rollout("checkout", "new_checkout", ENV)
    now = datetime.now(UTC)
    with rt.sessions.begin() as session:
        start_rollout(session, spec, now, "t", notify=rt.redis)
    for bad, said in (
        (spec, "exists already"),
        (spec.model_copy(update={"name": "again"}), "rollout checkout still holds"),
        (spec.model_copy(update={"name": "x", "flag": "nope"}), "no feature flag 'nope'"),
    ):
        with pytest.raises(RolloutRefused, match=said), rt.sessions.begin() as session:
            start_rollout(session, bad, now, "t")
    with rt.sessions.begin() as session:
        set_state(session, "checkout", "pause", now, rt.redis)
    assert advance(rt, NeverAsked())["looks"] == []  # paused: not looked at
    with pytest.raises(RolloutRefused, match="paused, not active"), rt.sessions.begin() as s:
        set_state(s, "checkout", "pause", now, rt.redis)
    with rt.sessions.begin() as session:
        set_state(session, "checkout", "resume", now, rt.redis)
        set_state(session, "checkout", "abort", now, rt.redis)
    assert flag_percentage(rt, "new_checkout") == 0.0
    with pytest.raises(RolloutRefused, match="aborted already"), rt.sessions.begin() as s:
        set_state(s, "checkout", "resume", now, rt.redis)
    wait_for(lambda: len(channel.messages) >= 2, timeout=10, what="start and abort")
    # A disabled flag serves nobody: refused.
    with rt.sessions.begin() as session:
        flag = session.get(FeatureFlag, ("new_checkout", ENV))
        assert flag is not None
        flag.enabled = False
    with pytest.raises(RolloutRefused, match="disabled"), rt.sessions.begin() as s:
        start_rollout(s, spec.model_copy(update={"name": "third"}), now, "t")


def test_no_data_waits_then_fails_closed(scraped: str, rt: Runtime) -> None:
    add_flags(rt, "new_checkout")
    spec = latency_rollout(
        "checkout",
        "new_checkout",
        ENV,
        min_impressions=0,
        treatment={"selector": 'flag="new_checkout",flag_variant="missing"'},
        metrics=[{"name": "latency", "query": "app_latency_seconds{$selector}"}],
        analysis={"window": 20, "step": 1, "min_samples": 8, "inconclusive_limit": 2},
    )
    with rt.sessions.begin() as session:
        start_rollout(session, spec, datetime.now(UTC), "t")
    source = PrometheusSource(scraped)
    first = advance(rt, source)["looks"][0]
    assert (first["verdict"], first["decision"]) == ("nodata", "wait")
    assert flag_percentage(rt, "new_checkout") == 1.0
    second = advance(rt, source)["looks"][0]
    assert second["decision"] == "rollback" and "missing data is not health" in second["reason"]
    assert flag_percentage(rt, "new_checkout") == 0.0


def test_prometheus_down_waits_for_the_deadline_then_rolls_back(rt: Runtime) -> None:
    add_flags(rt, "new_checkout")
    spec = latency_rollout(
        "checkout",
        "new_checkout",
        ENV,
        min_impressions=0,
        on_failure="previous_step",
        steps=[10, 100],
        analysis={"window": 20, "step": 1, "prometheus_deadline": 60},
    )
    t0 = datetime.now(UTC)
    with rt.sessions.begin() as session:
        start_rollout(session, spec, t0, "t")
    down = PrometheusSource(f"http://127.0.0.1:{free_port()}", attempts=1, sleep=lambda _: None)
    first = advance(rt, down, now=t0)["looks"][0]
    assert first["decision"] == "wait" and "Prometheus unreachable" in first["reason"]
    assert advance(rt, down, now=t0 + timedelta(seconds=30))["looks"][0]["decision"] == "wait"
    last = advance(rt, down, now=t0 + timedelta(seconds=61))["looks"][0]
    assert last["decision"] == "rollback" and "deadline 60s" in last["reason"]
    assert flag_percentage(rt, "new_checkout") == 0.0  # the step before the first is 0


def test_min_step_time_is_waited_with_the_clock_given(rt: Runtime) -> None:
    add_flags(rt, "new_checkout")
    spec = latency_rollout("checkout", "new_checkout", ENV, min_step="10m", min_impressions=0)
    t0 = datetime.now(UTC)
    with rt.sessions.begin() as session:
        start_rollout(session, spec, t0, "t")
    look = advance(rt, NeverAsked(), now=t0 + timedelta(minutes=9))["looks"][0]
    assert look["decision"] == "wait" and "lasted 540s of 600s" in look["reason"]


def test_cli_start_status_pause_resume_abort(
    fleet_env: dict[str, str], tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    rt = install(
        Runtime(FleetSettings(home=tmp_path / "rt", database_url=postgres_url, redis_url=redis_url))
    )
    add_flags(rt, "new_checkout")
    rt.close()
    spec_file = tmp_path / "rollout.yaml"
    spec_file.write_text(
        "name: checkout\nflag: new_checkout\nenvironment: production\n"
        "steps: [2, 10, 100]\nmin_step: 5m\nmin_impressions: 500\n"
        "metrics:\n  - {name: errors, query: 'rate(app_errors_total{$selector}[1m])'}\n"
    )
    started = run_fleet("rollout", "start", str(spec_file), env=fleet_env)
    assert started.returncode == 0, started.stderr
    assert "rollout checkout started: production new_checkout at 2% (on against off)" in (
        started.stdout
    )
    again = run_fleet("rollout", "start", str(spec_file), env=fleet_env)
    assert again.returncode == 2 and "exists already" in again.stderr
    status = json.loads(run_fleet("rollout", "status", "--json", env=fleet_env).stdout)
    assert [(s["name"], s["state"], s["step"], s["flag_percentage"]) for s in status] == [
        ("checkout", "active", 2.0, 2.0)
    ]
    for action, state in (("pause", "paused"), ("resume", "active"), ("abort", "aborted")):
        done = run_fleet("rollout", action, "checkout", env=fleet_env)
        assert done.returncode == 0, done.stderr
        assert f"rollout checkout {state}" in done.stdout
    status = json.loads(run_fleet("rollout", "status", "--json", env=fleet_env).stdout)
    assert (status[0]["state"], status[0]["flag_percentage"]) == ("aborted", 0.0)
    missing = run_fleet("rollout", "abort", "nope", env=fleet_env)
    assert missing.returncode == 1 and "no rollout named 'nope'" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec_file.read_text().replace("[2, 10, 100]", "[10, 5, 100]"))
    refused = run_fleet("rollout", "start", str(bad), env=fleet_env)
    assert refused.returncode == 2 and "steps must increase" in refused.stderr
    flags = run_fleet(
        "rollout",
        "start",
        "--name",
        "by-flags",
        "--flag",
        "nope",
        "--environment",
        "production",
        "--metric",
        "errors=rate(app_errors_total{$selector}[1m])",
        env=fleet_env,
    )
    assert flags.returncode == 2 and "no feature flag 'nope' in production" in flags.stderr


def test_a_step_whose_commit_answer_is_lost_is_taken_once(
    scraped: str, postgres_url: str, redis_url: str, tmp_path: Path, channel: Channel
) -> None:
    """PostgreSQL commits a step (the flag at 5 %, its audit row, the rollout's state) but
    the answer is cut on the way back (a proxy in front of it: a fault a real server cannot
    be made to produce). The run reports an error; the next reads back one consistent
    state, no step taken twice, and goes on."""
    from sqlalchemy.engine import make_url

    from tests.cutting_proxy import cutting_proxy

    url = make_url(postgres_url)
    direct = install(
        Runtime(FleetSettings(home=tmp_path, database_url=postgres_url, redis_url=redis_url))
    )
    add_flags(direct, "new_checkout")
    spec = latency_rollout("checkout", "new_checkout", ENV, min_impressions=0, steps=[1, 5, 100])
    with direct.sessions.begin() as session:
        start_rollout(session, spec, datetime.now(UTC), "t", notify=direct.redis)
    source = PrometheusSource(scraped)
    with cutting_proxy((url.host or "127.0.0.1", url.port or 5432), b"COMMIT", times=0) as proxy:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        proxied = install(
            Runtime(FleetSettings(home=tmp_path, database_url=through, redis_url=redis_url))
        )
        proxy.arm(b"COMMIT")
        lost = advance(proxied, source)["looks"]
        assert proxy.cuts == 1
        assert [look["decision"] for look in lost] == ["error"]
        proxied.close()
    rt = install(direct)
    assert flag_percentage(rt, "new_checkout") == 5.0  # the step was taken, once
    looks = advance(rt, source)["looks"]
    assert [(look["percentage"], look["decision"]) for look in looks] == [(5.0, "complete")]
    with rt.sessions() as session:
        writes = session.scalars(
            select(FeatureFlagAuditLog.meta).where(
                FeatureFlagAuditLog.user_id == "config-fleet-rollout"
            )
        ).all()
        assert [json.loads(w or "")["flag_data"]["rollout_percentage"] for w in writes] == [
            1.0,
            5.0,
            100.0,
        ]
    # The lost commit's invalidation was never sent (services pick 5 % up within their
    # 30 s TTL); the start's and the completion's were.
    wait_for(lambda: len(channel.messages) >= 2, timeout=10, what="two invalidations")
    assert len(channel.messages) == 2
    rt.close()
