"""A drainer process for the impression tests: drains until the list is empty, and can
kill itself with SIGKILL at a chosen point of a chosen batch.

    python -m tests.impression_drainer [--crash-at POINT] [--on-batch N] [--batch-size S]

Points: after_take, mid_aggregation, mid_transaction, after_commit, before_finish,
after_finish; and mid_users_save (the user sketches taken to be saved and read, not
written). Settings come from FLEET_* as for any fleet process.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
from typing import Any

import tasks.impressions as job
import tasks.impressions.users as users
from tasks.impressions.queue import ImpressionQueue
from workers.logs import configure_logging
from workers.runtime import Runtime, install
from workers.settings import load_settings

POINTS = (
    "after_take",
    "mid_aggregation",
    "mid_transaction",
    "after_commit",
    "before_finish",
    "after_finish",
)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# point -> (where the step lives, its name, die before it runs or after it returns)
STEPS: dict[str, list[tuple[Any, str, bool]]] = {
    "mid_aggregation": [(job.Tally, "add", False), (job.Tally, "total", False)],
    # rows written, not yet committed: one batch alone, or a group committed together
    "mid_transaction": [(job, "apply_batches", False)],
    "after_commit": [(job.UserSketches, "add", True)],
    "before_finish": [(ImpressionQueue, "finish", True)],
    "after_finish": [(ImpressionQueue, "finish", False)],
    "mid_users_save": [(users, "read_sketches", False)],
}


def arm(point: str, on_batch: int) -> None:
    """Count batches as they are taken; die at ``point`` the first time it is reached once
    batch number ``on_batch`` has been taken (the commit of a batch runs beside the taking
    of the next ones, so it may be reached a few batches later)."""
    seen = {"batches": 0}
    original_take = ImpressionQueue.take

    def take(self: ImpressionQueue, *args: Any, **kwargs: Any) -> Any:
        batch = original_take(self, *args, **kwargs)
        if batch is not None:
            seen["batches"] += 1
            if point == "after_take" and seen["batches"] == on_batch:
                die()
        return batch

    ImpressionQueue.take = take  # type: ignore[method-assign]
    for owner, name, before in STEPS.get(point, []):
        setattr(owner, name, _dying(getattr(owner, name), before, seen, on_batch))


def _dying(original: Any, before: bool, seen: dict[str, int], on_batch: int) -> Any:
    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        if before and seen["batches"] >= on_batch:
            die()
        result = original(*args, **kwargs)
        if not before and seen["batches"] >= on_batch:
            die()
        return result

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crash-at", choices=(*POINTS, "mid_users_save"))
    parser.add_argument("--on-batch", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=200)
    options = parser.parse_args()
    settings = load_settings()
    configure_logging(level="WARNING", log_format="json")
    rt = install(Runtime(settings))
    if options.crash_at:
        arm(options.crash_at, options.on_batch)
    while True:
        summary = job.drain(rt, options.batch_size, budget_seconds=30)
        if summary["batches"] == 0 and summary["left_in_queue"] == 0:
            break
    rt.close()


if __name__ == "__main__":
    main()
