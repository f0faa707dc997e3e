"""Jobs that exist only for tests: retries, permanent failures, counting attempts.

Loaded by in-process tests by import and by worker subprocesses through
``FLEET_EXTRA_JOB_MODULES=["tests.jobs_for_tests"]``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from workers.jobs import PermanentError, RetryPolicy, TransientError, job

ATTEMPTS: Counter[str] = Counter()

FAST_RETRY = RetryPolicy(max_retries=3, backoff_base=0.01, backoff_cap=0.02, jitter=False)


@job("test.flaky", queue="default", soft_time_limit=5, time_limit=10, retry=FAST_RETRY)
def flaky(*, key: str, fail_times: int) -> dict[str, Any]:
    """Fails with a transient error ``fail_times`` times, then succeeds."""
    ATTEMPTS[key] += 1
    if ATTEMPTS[key] <= fail_times:
        raise TransientError(f"attempt {ATTEMPTS[key]} of {key} failed")
    return {"attempts": ATTEMPTS[key]}


@job("test.refused", queue="default", soft_time_limit=5, time_limit=10, retry=FAST_RETRY)
def refused(*, key: str) -> None:
    """Fails with a permanent error: must never be retried."""
    ATTEMPTS[key] += 1
    raise PermanentError(f"{key}: the record is malformed")


@job("test.bug", queue="default", soft_time_limit=5, time_limit=10, retry=FAST_RETRY)
def bug(*, key: str) -> None:
    """Fails with an error that is not declared transient: never retried."""
    ATTEMPTS[key] += 1
    raise ValueError(f"{key}: unexpected")


@job("test.secretive", queue="secrets", soft_time_limit=5, time_limit=10)
def secretive(*, value: str) -> None:
    """Fails with the secret value in its error message."""
    raise TransientError(f"could not use {value}")


@job("test.chained", queue="default", soft_time_limit=5, time_limit=10)
def chained() -> dict[str, Any]:
    """Sends another job from inside a worker, as ``secrets.check_rotation`` sends
    ``secrets.rotate``: a chained send."""
    from celery import current_app

    sent = current_app.send_task("fleet.heartbeat", kwargs={}, queue="default")
    return {"sent": sent.id}
