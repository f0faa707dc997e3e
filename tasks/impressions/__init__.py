"""``impressions.aggregate`` and ``impressions.rollup``: feature-flag impressions counted
exactly once, per minute, and kept within their retention.

A run first takes over batches whose worker died, then drains the list batch by batch
until it is empty or the time budget is spent. Each batch: aggregate (pure), commit counts
with the batch id (once), add users to the day's sketches (idempotent), then push its dead
letters and forget it (once). Killing the worker between any two of these steps loses and
doubles nothing: see :mod:`tasks.impressions.queue` and :mod:`tasks.impressions.store`.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import Field

from tasks.impressions.queue import Batch, ImpressionQueue
from tasks.impressions.records import Counted, Tally
from tasks.impressions.rollup import fold_minutes
from tasks.impressions.store import AlreadyApplied, Prepared, apply_batches
from tasks.impressions.users import UserSketches, persist_users
from workers.jobs import RetryPolicy, job
from workers.logs import get_logger
from workers.runtime import Runtime, runtime

log = get_logger("fleet.impressions")

TIME_LIMIT = 60


@dataclass
class DrainSummary:
    batches: int = 0
    impressions: int = 0
    counted: int = 0  # in batches this run applied (a recovered batch may have been applied)
    dead_letters: Counter[str] = field(default_factory=Counter)
    recovered_batches: int = 0
    already_applied: int = 0
    users_sketches_saved: int = 0
    seconds: float = 0.0

    def as_dict(self, queue: ImpressionQueue) -> dict[str, Any]:
        rate = self.counted / self.seconds if self.seconds else 0.0
        return {
            "batches": self.batches,
            "impressions": self.impressions,
            "counted": self.counted,
            "dead_lettered": sum(self.dead_letters.values()),
            "dead_letters_by_reason": dict(sorted(self.dead_letters.items())),
            "recovered_batches": self.recovered_batches,
            "batches_already_applied": self.already_applied,
            "users_sketches_saved": self.users_sketches_saved,
            "seconds": round(self.seconds, 3),
            "impressions_per_second": round(rate),
            "left_in_queue": queue.depth(),
            "in_flight_batches": queue.in_flight(),
        }


# Under a backlog (full batches), or while the committer is busy, batches are gathered and
# committed together, up to this many impressions: one transaction, each batch in the
# ledger, their counts summed first, so a backlog writes far fewer rows per impression.
# A batch that empties the list is committed at once, with what was gathered before it.
GROUP_IMPRESSIONS = 200_000

Taken = tuple[Batch, Counted]


def process(
    rt: Runtime,
    queue: ImpressionQueue,
    sketches: UserSketches,
    batch: Batch,
    summary: DrainSummary,
) -> None:
    """Count one batch, start to finish, in this thread."""
    tally = Tally()
    counted = count(rt, tally, batch)
    commit(rt, queue, sketches, [(batch, counted)], summary, prepare(rt, tally))


def count(rt: Runtime, tally: Tally, batch: Batch) -> Counted:
    """The batch classified against the time it was taken, whoever counts it and when."""
    return tally.add(batch.items, decided_at(batch), rt.settings.impressions_future_skew)


def decided_at(batch: Batch) -> datetime:
    """The moment a batch's outcome is judged at: its take time (the counting worker's
    clock only for a batch whose id carries none)."""
    taken = batch.taken_at
    return datetime.now(UTC) if taken is None else datetime.fromtimestamp(taken, UTC)


def prepare(rt: Runtime, tally: Tally) -> Prepared:
    """A group's sum, ready to write."""
    return Prepared.of(tally.total(), rt.engine.dialect.name)


def commit(
    rt: Runtime,
    queue: ImpressionQueue,
    sketches: UserSketches,
    group: list[Taken],
    summary: DrainSummary,
    prepared: Prepared,
) -> None:
    """Counts committed with the batch ids (once), users added (idempotent), then each
    batch's dead letters pushed and the batch forgotten (once): in this order, always."""
    from monitoring import metrics

    started = time.perf_counter()
    now = datetime.now(UTC)
    try:
        # Safe to repeat: each batch id goes into impression_batches first, and a batch
        # applied before raises AlreadyApplied with nothing written. A lost COMMIT answer
        # fails the run; the take-over finds the batch applied.
        with rt.engine.begin() as connection:
            apply_batches(connection, [(b.id, counted) for b, counted in group], prepared, now)
    except AlreadyApplied:  # rolled back; never for batches taken fresh
        if len(group) == 1:  # taken over, and its first worker committed it after all
            # Its first worker may have died before adding users or pushing dead letters:
            # both are decided by the batch alone (see count), so add and push them again
            # (users are a set, and finish runs once).
            sketches.add(prepared.agg.users)
            _finish(queue, *group[0], False, summary)
            return
        for batch, counted in group:  # one at a time: the others still count
            again = queue.reread(batch)
            if again is None:  # taken over, and finished by the worker that took it
                _finish(queue, batch, counted, False, summary)
            else:
                process(rt, queue, sketches, again, summary)
        return
    sketches.add(prepared.agg.users)
    for batch, counted in group:
        _finish(queue, batch, counted, True, summary)
    metrics.IMPRESSIONS_BATCH_SECONDS.observe(time.perf_counter() - started)


def _finish(
    queue: ImpressionQueue,
    batch: Batch,
    counts: Counted,
    applied: bool,
    summary: DrainSummary,
) -> None:
    from monitoring import metrics

    at = decided_at(batch)  # the same letters, byte for byte, whoever pushes them
    pushed = queue.finish(batch, [letter.encode(batch.id, at) for letter in counts.dead])
    summary.batches += 1
    summary.impressions += counts.impressions + len(counts.dead)
    if applied:
        summary.counted += counts.impressions
        metrics.IMPRESSIONS_PROCESSED.inc(counts.impressions)
    else:
        summary.already_applied += 1
    if pushed and counts.dead:
        reasons = counts.dead_by_reason
        summary.dead_letters.update(reasons)
        for reason, number in reasons.items():
            metrics.IMPRESSIONS_DEAD_LETTERED.labels(reason).inc(number)
        first = counts.dead[0]
        log.warning(
            "impressions_dead_lettered",
            batch=batch.id,
            count=len(counts.dead),
            reasons=dict(reasons),
            first_reason=first.reason,
            first_detail=first.detail,
        )


def recover(
    rt: Runtime, queue: ImpressionQueue, sketches: UserSketches, summary: DrainSummary
) -> None:
    from monitoring import metrics

    timeout = rt.settings.impressions_inflight_timeout.total_seconds()
    # A dead worker can leave two groups of batches in flight: take them all, ten at a time
    # (a batch taken over, or finished meanwhile, is not listed again).
    while orphans := queue.orphans(time.time(), timeout):
        for batch_id in orphans:
            batch = queue.take_over(batch_id, time.time(), timeout)
            if batch is None:
                continue  # another worker took it first
            log.warning("impressions_batch_recovered", batch=batch.id, impressions=len(batch.items))
            summary.recovered_batches += 1
            metrics.IMPRESSIONS_RECOVERED_BATCHES.inc()
            process(rt, queue, sketches, batch, summary)


def drain(
    rt: Runtime, batch_size: int, budget_seconds: float, max_batches: int | None = None
) -> dict[str, Any]:
    """Recover orphans, then drain until empty or out of time.

    Two stages overlap: while one thread commits, this one takes and counts the next
    batches. Batches are gathered into groups of up to :data:`GROUP_IMPRESSIONS` while the
    list has more or the committer is busy; groups go through :func:`commit` in order, one
    at a time, so at most two groups are in flight.
    """
    with few_collections():
        return _drain(rt, batch_size, budget_seconds, max_batches)


# Objects a drain allocates per young collection of the cyclic garbage collector: Python's
# default (700) starts one every few records; the drain's objects are freed by their
# reference counts (they make no cycles), so those collections find next to nothing. On
# 500,000 impressions drained in one process: 0.20-0.31 s in about 340 collections, of
# 3.5 s of CPU time, against 0.08-0.10 s in one collection with this setting.
YOUNG_COLLECTION_EVERY = 100_000


_collections_lock = threading.Lock()
_collections_raised = 0  # drains running with the threshold raised (a thread pool runs several)
_collections_before: tuple[int, int, int] = (700, 10, 10)


@contextmanager
def few_collections() -> Iterator[None]:
    """The collector's young generation collected every :data:`YOUNG_COLLECTION_EVERY`
    allocations while drains run; the process's thresholds as they were once the last one
    ends. Left alone when the process asks for fewer collections, or for none (0)."""
    global _collections_raised, _collections_before
    with _collections_lock:
        if _collections_raised == 0:
            before = gc.get_threshold()
            _collections_before = (before[0], before[1], before[2])
            if 0 < before[0] < YOUNG_COLLECTION_EVERY:
                gc.set_threshold(YOUNG_COLLECTION_EVERY, before[1], before[2])
        _collections_raised += 1
    try:
        yield
    finally:
        with _collections_lock:
            _collections_raised -= 1
            if _collections_raised == 0:
                gc.set_threshold(*_collections_before)


def _drain(
    rt: Runtime, batch_size: int, budget_seconds: float, max_batches: int | None
) -> dict[str, Any]:
    queue = ImpressionQueue(rt.redis)
    sketches = UserSketches(rt.redis, rt.engine)
    summary = DrainSummary()
    started = time.monotonic()
    recover(rt, queue, sketches, summary)
    taken = 0
    with ThreadPoolExecutor(1, thread_name_prefix="impressions-commit") as committer:
        pending: Future[None] | None = None
        group: list[Taken] = []
        tally, gathered = Tally(), 0
        while time.monotonic() - started < budget_seconds:
            if max_batches is not None and taken >= max_batches:
                break
            batch = queue.take(batch_size, time.time())
            if batch is None:
                break
            taken += 1
            group.append((batch.counted(), count(rt, tally, batch)))
            gathered += len(batch.items)
            if pending is not None and pending.done():
                pending.result()  # the previous commit's error, if any, at once
                pending = None
            if gathered < GROUP_IMPRESSIONS and (
                len(batch.items) == batch_size or pending is not None
            ):
                continue  # a backlog, or the committer busy: gather
            if pending is not None:
                pending.result()  # the previous commit, and its error if any
            # Summed and made ready here, while the committer is busy with the database.
            ready = prepare(rt, tally)
            pending = committer.submit(commit, rt, queue, sketches, group, summary, ready)
            group, tally, gathered = [], Tally(), 0
        if pending is not None:
            pending.result()
        if group:
            commit(rt, queue, sketches, group, summary, prepare(rt, tally))
    summary.users_sketches_saved = persist_users(rt.redis, rt.engine)
    summary.seconds = time.monotonic() - started
    result = summary.as_dict(queue)
    log.info(
        "impressions_drained", **{k: v for k, v in result.items() if k != "dead_letters_by_reason"}
    )
    return result


@job(
    "impressions.aggregate",
    queue="impressions",
    soft_time_limit=TIME_LIMIT - 10,
    time_limit=TIME_LIMIT,
    retry=RetryPolicy(max_retries=3, backoff_base=1, backoff_cap=10),
)
def aggregate_impressions(
    *,
    budget_seconds: Annotated[float, Field(gt=0, le=40)] = 8.0,
    batch_size: Annotated[int, Field(ge=1, le=100_000)] | None = None,
    max_batches: Annotated[int, Field(ge=1)] | None = None,
) -> dict[str, Any]:
    """Drain feature_flag_impressions into per-minute counts, exactly once."""
    rt = runtime()
    return drain(rt, batch_size or rt.settings.impressions_batch_size, budget_seconds, max_batches)


@job(
    "impressions.rollup",
    queue="impressions",
    soft_time_limit=540,
    time_limit=600,
    retry=RetryPolicy(max_retries=3, backoff_base=5, backoff_cap=60),
)
def rollup_impressions() -> dict[str, Any]:
    """Fold minute counts older than the retention into hourly rows."""
    from monitoring import metrics

    rt = runtime()
    now = datetime.now(UTC)
    result = fold_minutes(rt.engine, now - rt.settings.impressions_minute_retention, now)
    metrics.IMPRESSIONS_FOLDED.inc(result["minute_rows_folded"])
    log.info("impressions_rolled_up", **result)
    return result
