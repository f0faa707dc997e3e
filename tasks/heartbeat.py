"""``fleet.heartbeat``: proves the whole path works, from a schedule fire to a stored run.

A run checks that Redis and the database answer from inside a worker and reports how
fast. ``hold_seconds`` keeps the run busy for a while: for shutdown and failover drills
(`fleet enqueue fleet.heartbeat --arg hold_seconds=30`, then stop or kill the worker).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Annotated, Any

from pydantic import Field
from sqlalchemy import text

from workers.jobs import RetryPolicy, job
from workers.runtime import runtime


@job(
    "fleet.heartbeat",
    queue="default",
    soft_time_limit=540,
    time_limit=600,
    retry=RetryPolicy(max_retries=3, backoff_base=1.0, backoff_cap=30.0),
)
def heartbeat(*, hold_seconds: Annotated[float, Field(ge=0, le=500)] = 0.0) -> dict[str, Any]:
    """Check that Redis and the database answer from a worker."""
    rt = runtime()
    started = time.perf_counter()
    rt.redis.ping()
    redis_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    with rt.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    database_ms = (time.perf_counter() - started) * 1000
    if hold_seconds:
        # A drill's stand-in for real work: an Event wait is interrupted by the soft
        # time limit like any other work would be.
        threading.Event().wait(hold_seconds)
    return {
        "host": socket.gethostname(),
        "redis_ms": round(redis_ms, 2),
        "database_ms": round(database_ms, 2),
        "held_seconds": hold_seconds,
    }
