"""Worker heartbeats, and runs left ``running`` by a worker that stopped beating.

Each ``fleet worker`` runs a small companion process (``python -m workers.liveness``; a
process, not a thread, since the worker forks its pool children and a thread holding a lock
at that moment would leave the child deadlocked) that records, every
``worker_heartbeat_interval``, the time in the Redis
sorted set ``fleet:workers:heartbeats`` under its node name (the name ``task_runs.worker``
holds), and removes it on a warm shutdown. At each beat it also looks for runs still
``running`` whose worker has not beaten for ``worker_lost_after`` (or never did, for runs
started that long ago): they are marked ``lost`` at once, counted in
``fleet_task_runs_total{outcome="lost"}`` and logged, without waiting for the visibility
timeout to bring the message back. Every live worker does this; the update only takes rows
still ``running``, so two workers never count the same run twice. A run marked lost whose
worker was only cut off from Redis and finishes after all gets its real outcome then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import select, update

from workers.db.models import TaskRun
from workers.logs import get_logger

log = get_logger("fleet.liveness")

HEARTBEATS = "fleet:workers:heartbeats"  # node -> unix time of its last beat
FORGET_AFTER = 86400.0  # beats older than this are removed from the set


def beat(client: redis.Redis, node: str, at: float) -> None:
    client.zadd(HEARTBEATS, {node: at})


def last_beats(client: redis.Redis) -> dict[str, float]:
    pairs: list[tuple[bytes | str, float]] = client.zrange(HEARTBEATS, 0, -1, withscores=True)  # type: ignore[assignment]
    return {
        (node.decode() if isinstance(node, bytes) else str(node)): float(at) for node, at in pairs
    }


def mark_lost(rt: Any, now: datetime, lost_after: timedelta) -> dict[str, int]:
    """Mark ``running`` rows of silent workers ``lost``; returns how many, by job."""
    from monitoring import metrics

    client: redis.Redis = rt.redis
    beats = last_beats(client)
    cutoff = now - lost_after
    with rt.sessions.begin() as session:
        candidates = session.execute(
            select(TaskRun.id, TaskRun.job, TaskRun.worker).where(
                TaskRun.outcome == "running",
                TaskRun.started_at < cutoff,
                TaskRun.worker.is_not(None),
            )
        ).all()
        silent = [
            row for row in candidates if beats.get(row.worker or "", 0.0) < cutoff.timestamp()
        ]
        if not silent:
            return {}
        marked = session.execute(
            update(TaskRun)
            .where(TaskRun.id.in_([row.id for row in silent]), TaskRun.outcome == "running")
            .values(
                outcome="lost",
                finished_at=now,
                error=(
                    f"worker stopped its heartbeat for over {lost_after.total_seconds():g}s "
                    "before the run finished"
                ),
            )
            .returning(TaskRun.job, TaskRun.worker)
        ).all()
    by_job = Counter(job for job, _ in marked)
    for job, count in by_job.items():
        metrics.TASK_RUNS.labels(job, "lost").inc(count)
    if marked:
        log.warning(
            "task_runs_lost",
            runs=len(marked),
            workers=sorted({worker for _, worker in marked if worker}),
            jobs=dict(by_job),
        )
    client.zremrangebyscore(HEARTBEATS, "-inf", now.timestamp() - FORGET_AFTER)
    return dict(by_job)


class Heartbeat:
    """The beating loop of one worker (run in its companion process)."""

    def __init__(
        self,
        rt: Any,
        node: str,
        interval: float,
        lost_after: timedelta,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.rt, self.node, self.interval, self.lost_after = rt, node, interval, lost_after
        self.clock = clock
        self.stopped = threading.Event()

    def tick(self) -> None:
        now = self.clock()
        try:
            beat(self.rt.redis, self.node, now.timestamp())
        except redis.RedisError as exc:
            log.warning("worker_heartbeat_failed", node=self.node, error=str(exc))
            return
        try:
            mark_lost(self.rt, now, self.lost_after)
        except Exception as exc:  # the check must never stop the beating
            log.warning("lost_run_check_failed", error=f"{type(exc).__name__}: {exc}")

    def run(self, parent: int | None = None) -> bool:
        """Beat until stopped (True) or until the parent process is gone (False)."""
        while not self.stopped.is_set():
            if parent is not None and os.getppid() != parent:
                return False
            started = time.monotonic()
            self.tick()
            self.stopped.wait(max(0.0, self.interval - (time.monotonic() - started)))
        return True


def companion(node: str) -> subprocess.Popen[bytes]:
    """Start the beating process of worker ``node`` (this process): same environment,
    same output. It stops on SIGTERM (leaving the set), or by itself once this process
    is gone (leaving its last beat to grow old)."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.liveness", node, str(os.getpid())],
        stdin=subprocess.DEVNULL,
    )


def stop_companion(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str]) -> int:
    from datetime import timedelta

    from workers.cli.common import start_runtime

    node, parent = argv[0], int(argv[1])
    rt = start_runtime(start_embedded=False)
    settings = rt.settings
    heartbeat = Heartbeat(
        rt, node, settings.worker_heartbeat_interval, timedelta(seconds=settings.worker_lost_after)
    )
    signal.signal(signal.SIGTERM, lambda *_: heartbeat.stopped.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker's Ctrl-C is the worker's
    if heartbeat.run(parent):
        try:
            rt.redis.zrem(HEARTBEATS, node)
        except redis.RedisError as exc:
            log.warning("worker_heartbeat_failed", node=node, error=str(exc))
        return 0
    log.warning("worker_gone", node=node, parent=parent)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
