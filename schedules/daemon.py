"""``fleet scheduler``: APScheduler's cron triggers, each fire sent to Celery once.

APScheduler decides *when*; :class:`Dispatcher` decides *whether*: a fire later than its
misfire grace is counted and dropped, a fire another replica claimed is counted and left,
and a fire this replica wins is sent with the schedule's name and time in its headers and
an ``expires`` (the next fire or the grace, whichever comes first: a message a worker sees
later is dropped and counted ``expired``, so fires queued during a worker outage never
pile up). At start, :meth:`Dispatcher.catch_up` makes up for fires missed while every
replica was down, per the schedule's ``catch_up``: ``once`` sends one run for the latest
missed fire, ``none`` only counts them.
APScheduler calls us through :class:`FireExecutor`, which hands over the scheduled time
of each fire (a plain job function would only learn the wall-clock time it ran at).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from schedules.claims import ClaimStore, Fire
from schedules.table import Schedule
from workers.logs import get_logger

log = get_logger("fleet.scheduler")

Send = Callable[[Schedule, Fire], None]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Dispatcher:
    def __init__(
        self,
        schedules: Iterable[Schedule],
        claims: ClaimStore,
        send: Send,
        *,
        clock: Callable[[], datetime] = utcnow,
        count: Callable[[str, str], None] = lambda schedule, result: None,
    ) -> None:
        self.schedules = {s.name: s for s in schedules}
        self._claims = claims
        self._send = send
        self._clock = clock
        self._count = count

    def fire(self, name: str, at: datetime) -> str:
        """Handle one fire of schedule ``name`` due at ``at``; returns the result."""
        schedule = self.schedules[name]
        fire = Fire(name, at, expires=at + schedule.expiry(at))
        late = self._clock() - at
        grace = schedule.misfire_grace_seconds
        if grace is not None and late > timedelta(seconds=grace):
            result = "misfired"
        elif not self._claims.claim(fire):
            result = "already_claimed"
        else:
            result = self._send_claimed(schedule, fire)
        self._count(name, result)
        log.info(
            "schedule_fired",
            schedule=name,
            job=schedule.job,
            fire=fire.stamp,
            result=result,
            late_seconds=round(late.total_seconds(), 3),
        )
        return result

    def _send_claimed(self, schedule: Schedule, fire: Fire) -> str:
        # A lost publish answer can send the fire twice: its task id is the fire's, and the
        # worker's bookkeeping drops the second message (fleet:schedule:ran:<task id>).
        try:
            self._send(schedule, fire)
        except Exception as exc:
            # The claim stays pending: after the lease a replica (maybe this one) sends it.
            log.error("schedule_send_failed", schedule=schedule.name, error=str(exc))
            return "error"
        self._claims.confirm(fire)
        return "enqueued"

    def recover(self) -> int:
        """Send fires whose claiming replica died or failed before sending."""
        recovered = 0
        for stale in self._claims.stale():
            schedule = self.schedules.get(stale.schedule)
            if schedule is None or not self._claims.take_over(stale):
                continue
            fire = replace(stale, expires=stale.at + schedule.expiry(stale.at))
            if self._send_claimed(schedule, fire) == "enqueued":
                recovered += 1
                self._count(fire.schedule, "recovered")
                log.warning("schedule_fire_recovered", schedule=fire.schedule, fire=fire.stamp)
        return recovered

    def catch_up(self) -> dict[str, int]:
        """Fires missed since each schedule's latest enqueued fire, up to now: with
        ``catch_up: once`` the latest one is sent (claimed, so one replica sends it, and
        none if a live replica has it already) and the others counted ``missed``; with
        ``none`` all are counted ``missed`` (a fire a live replica is sending at that very
        moment included). Returns the misses by schedule."""
        now = self._clock()
        report: dict[str, int] = {}
        for schedule in self.schedules.values():
            last = self._claims.last_fire(schedule.name) if schedule.enabled else None
            if last is None:
                continue  # never fired here: nothing was missed
            fires, more = schedule.missed(last, now)
            if not fires:
                continue
            dropped = fires
            if schedule.catch_up == "once":
                dropped, at = fires[:-1], fires[-1]
                fire = Fire(schedule.name, at, expires=now + schedule.expiry(at))
                if self._claims.claim(fire):
                    result = self._send_claimed(schedule, fire)
                    self._count(schedule.name, "caught_up" if result == "enqueued" else result)
                else:
                    self._count(schedule.name, "already_claimed")
            for _ in dropped:
                self._count(schedule.name, "missed")
            self._claims.skip_to(schedule.name, fires[-1])  # counted once, by one replica
            report[schedule.name] = len(dropped)
            log.warning(
                "schedule_fires_missed",
                schedule=schedule.name,
                missed=len(dropped),
                more_not_counted=more,
                since=last.isoformat(),
                catch_up=schedule.catch_up,
            )
        return report


class FireExecutor(BaseExecutor):  # type: ignore[misc]
    """APScheduler executor that passes each fire's scheduled time to the dispatcher."""

    def __init__(self, on_fire: Callable[[str, datetime], Any], workers: int = 4) -> None:
        super().__init__()
        self._on_fire = on_fire
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "fire")

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        def work() -> None:
            for run_time in run_times:
                self._on_fire(job.id, run_time)

        def done(future: concurrent.futures.Future[None]) -> None:
            exc = future.exception()
            if exc is None:
                self._run_job_success(job.id, [])
            else:
                self._run_job_error(job.id, exc, exc.__traceback__)

        self._pool.submit(work).add_done_callback(done)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _noop() -> None:  # APScheduler wants a callable; FireExecutor never calls it
    return None


def build_scheduler(
    dispatcher: Dispatcher,
    recover_every: float,
    on_next_fire: Callable[[str, datetime], None] = lambda name, at: None,
) -> BackgroundScheduler:
    def on_fire(name: str, at: datetime) -> None:
        dispatcher.fire(name, at)
        upcoming = dispatcher.schedules[name].next_fires(at)
        if upcoming:
            on_next_fire(name, upcoming[0])

    scheduler = BackgroundScheduler(
        timezone=UTC,
        executors={"fires": FireExecutor(on_fire), "default": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": False, "max_instances": 8, "misfire_grace_time": None},
    )
    for schedule in dispatcher.schedules.values():
        if schedule.enabled:
            scheduler.add_job(_noop, schedule.trigger, id=schedule.name, executor="fires")
    scheduler.add_job(
        dispatcher.recover,
        IntervalTrigger(seconds=recover_every),
        id="fleet:recover-pending-fires",
        executor="default",
    )
    return scheduler


def run_until_signalled(scheduler: BackgroundScheduler) -> None:
    """Run until SIGTERM or SIGINT; fires being sent are finished before returning."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("scheduler_stopping", signal=signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        scheduler.start()
        for job in scheduler.get_jobs():
            log.info("schedule_loaded", schedule=job.id, next_fire=str(job.next_run_time))
        stop.wait()
    finally:
        if scheduler.running:
            scheduler.shutdown(wait=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("scheduler_stopped")
