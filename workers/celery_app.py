"""The Celery app, made by a factory from the settings (never at import).

Choices that keep work from being lost:

- JSON only, for messages and results: pickle is refused even if someone sends it.
- ``acks_late`` with ``reject_on_worker_lost`` and a prefetch of one: a message is
  acknowledged after its run, so a worker that dies mid-run leaves it to another.
- The broker's visibility timeout is above every job's hard time limit (checked here):
  a slow but alive run is never handed to a second worker while it still runs.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer
from kombu.entity import Queue

from workers.jobs import JOBS, QUEUES, JobSpec
from workers.runtime import Runtime
from workers.settings import SettingsError

# Job families, found by module name so that this package never imports them directly.
JOB_MODULES: tuple[str, ...] = (
    "tasks.heartbeat",
    "tasks.drift",
    "tasks.impressions",
    "tasks.secrets",
    "tasks.audit",
    "tasks.canary",
    "tasks.rollouts",
)


def job_modules(rt: Runtime) -> tuple[str, ...]:
    return JOB_MODULES + tuple(rt.settings.extra_job_modules)


def load_jobs(modules: tuple[str, ...]) -> dict[str, JobSpec]:
    """Import the job modules; returns the jobs they declare."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SettingsError(f"job module {name!r} cannot be imported: {exc}") from None
    return {name: spec for name, spec in JOBS.items() if spec.func.__module__ in modules}


class JobTimeLimits:
    """Celery annotation: each job's soft and hard limits, from its spec or the settings."""

    def __init__(self, overrides: dict[str, tuple[float, float]]) -> None:
        self._overrides = overrides

    def limits(self, spec: JobSpec) -> tuple[float, float]:
        """The job's own entry, else the ``"*"`` entry, else what the job declares."""
        default = self._overrides.get("*", (spec.soft_time_limit, spec.time_limit))
        return self._overrides.get(spec.name, default)

    def annotate(self, task: Any) -> dict[str, float] | None:
        spec = JOBS.get(task.name)
        if spec is None:
            return None
        soft, hard = self.limits(spec)
        return {"soft_time_limit": soft, "time_limit": hard}


def route_by_job(name: str, *_args: Any, **_kwargs: Any) -> dict[str, str] | None:
    spec = JOBS.get(name)
    return {"queue": spec.queue} if spec is not None else None


# A message unacknowledged this long after the longest run could have lasted is given
# to another worker: the run's worker is gone.
VISIBILITY_MARGIN = 120


def longest_hard_limit(limits: JobTimeLimits, jobs: dict[str, JobSpec]) -> tuple[str, float]:
    longest = max(jobs.values(), key=lambda spec: limits.limits(spec)[1])
    return longest.name, limits.limits(longest)[1]


def visibility_timeout(
    limits: JobTimeLimits, jobs: dict[str, JobSpec], configured: int | None
) -> int:
    """The configured timeout (checked), or the longest a message may stay unacknowledged
    with a live worker (a run's hard limit, or a retry's countdown: Redis gives a message
    held for its countdown to another worker too) plus the margin."""
    if configured is not None:
        check_time_limits(limits, jobs, configured)
        return configured
    if not jobs:
        return VISIBILITY_MARGIN
    longest_wait = max(spec.retry.backoff_cap for spec in jobs.values())
    held = max(longest_hard_limit(limits, jobs)[1], longest_wait)
    return math.ceil(held) + VISIBILITY_MARGIN


def check_time_limits(
    limits: JobTimeLimits, jobs: dict[str, JobSpec], visibility_timeout: int
) -> None:
    if not jobs:
        return
    name, hard = longest_hard_limit(limits, jobs)
    if hard >= visibility_timeout:
        raise SettingsError(
            f"FLEET_VISIBILITY_TIMEOUT={visibility_timeout} must exceed the longest hard "
            f"time limit ({name}: {hard:g}s), or a slow run is given to a second worker"
        )


def refusal_reason(exc: BaseException) -> str:
    """Why a worker refused a message, as a metric label."""
    from kombu.exceptions import ContentDisallowed, DecodeError

    if isinstance(exc, ContentDisallowed):
        # With signing on, a plain JSON message is an unsigned one.
        return "unsigned" if "json" in str(exc) else "content_not_accepted"
    if isinstance(exc, DecodeError) and "SecurityError" in repr(exc):
        return "bad_signature"  # unknown certificate, or a signature that does not verify
    if isinstance(exc, DecodeError):
        return "undecodable"
    return "invalid"


def _refused(message: Any, exc: BaseException) -> None:
    from monitoring import metrics
    from workers.logs import get_logger

    reason = refusal_reason(exc)
    headers = getattr(message, "headers", None) or {}
    metrics.MESSAGES_REFUSED.labels(reason).inc()
    get_logger("fleet.worker").error(
        "message_refused",
        reason=reason,
        task=headers.get("task"),
        task_id=headers.get("id"),
        content_type=getattr(message, "content_type", None),
        error=type(exc).__name__,
    )


class FleetConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, counting and logging every message it refuses (unsigned, wrongly
    signed, undecodable, invalid) before Celery drops it."""

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        _refused(message, exc)
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        _refused(message, exc)
        super().on_invalid_task(body, message, exc)


def sign_messages(app: Celery, settings: Any) -> None:
    """Celery's message signing: every message this app sends is signed with the fleet's
    key; a worker of it accepts only messages signed by a certificate of the store (others
    are refused before they are decoded, counted and logged, never run). Results stay
    JSON."""
    store = str(settings.signing_cert_store)
    app.conf.update(
        task_serializer="auth",
        accept_content=["auth"],
        event_serializer="json",
        result_serializer="json",
        result_accept_content=["json"],
        security_key=str(settings.signing_key),
        security_certificate=str(settings.signing_cert),
        security_cert_store=store,
        security_digest="sha256",
    )
    app.setup_security(allowed_serializers=["json"], serializer="json")


def create_app(rt: Runtime) -> Celery:
    settings = rt.settings
    modules = job_modules(rt)
    jobs = load_jobs(modules)
    limits = JobTimeLimits(settings.time_limits)
    visibility = visibility_timeout(limits, jobs, settings.visibility_timeout)

    app = Celery("fleet", set_as_current=True)
    transport = {
        **rt.broker_options,
        "visibility_timeout": visibility,
        # How often a worker looks for messages whose worker died (their visibility
        # timeout passed). Frequent enough that a short timeout in tests is honoured.
        "unacked_restore_interval": max(1, min(10, visibility // 4)),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        broker_url=rt.broker_url,
        result_backend=rt.broker_url,
        broker_transport_options=transport,
        result_backend_transport_options={**rt.broker_options, "visibility_timeout": visibility},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_consumer="workers.celery_app:FleetConsumer",
        task_queues=[Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        task_default_queue="default",
        task_routes=(route_by_job,),
        task_annotations=(limits,),
        result_expires=settings.result_expires,
        result_extended=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
        timezone="UTC",
        include=list(modules),
    )
    if settings.signing:
        sign_messages(app, settings)
    app.fleet_runtime = rt
    from workers.bookkeeping import connect_bookkeeping

    connect_bookkeeping()
    app.finalize(auto=True)
    return app


def queue_depths(rt: Runtime) -> dict[str, int]:
    """Messages waiting per queue, all priority levels included."""
    from workers.backlog import read_backlog

    return read_backlog(rt.redis).queues
