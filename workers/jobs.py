"""Jobs as data: name, queue, time limits, retry policy and the arguments they accept.

A job family declares its jobs with :func:`job`; the decorator records a :class:`JobSpec`
and makes a Celery task out of the plain function. The Celery app reads the specs for
routing and time limits, the CLI and the scheduler for argument checks, so a bad
argument is refused before anything is sent.
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import orjson
import redis
import sqlalchemy.exc
from celery import Task, shared_task
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from workers.errors import FleetError

QUEUES = ("secrets", "impressions", "drift", "canary", "audit", "default")


class PermanentError(FleetError):
    """A failure that retrying cannot fix (bad input, a refused request): never retried."""


class TransientError(Exception):
    """A failure worth retrying later (a service briefly away)."""


class UnknownJobError(PermanentError):
    pass


class JobArgumentError(PermanentError):
    pass


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientError,
    ConnectionError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    sqlalchemy.exc.OperationalError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Which errors are transient and how long to wait between tries.

    The n-th retry waits a random time up to ``min(cap, base * 2**n)`` seconds (full
    jitter), at most ``max_retries`` times; anything not transient fails at once.
    """

    transient: tuple[type[BaseException], ...] = TRANSIENT_ERRORS
    max_retries: int = 5
    backoff_base: float = 2.0
    backoff_cap: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_cap")

    def countdown(self, retries: int, rand: Callable[[], float] = random.random) -> float:
        ceiling = min(self.backoff_cap, self.backoff_base * 2**retries)
        return float(ceiling * rand()) if self.jitter else float(ceiling)

    def celery_options(self) -> dict[str, Any]:
        if not self.transient or self.max_retries == 0:
            return {"max_retries": 0}
        return {
            "autoretry_for": self.transient,
            "dont_autoretry_for": (PermanentError,),
            "max_retries": self.max_retries,
            "retry_backoff": self.backoff_base,
            "retry_backoff_max": self.backoff_cap,
            "retry_jitter": self.jitter,
        }


NO_RETRY = RetryPolicy(transient=(), max_retries=0)


@dataclass(frozen=True)
class JobSpec:
    name: str
    queue: str
    soft_time_limit: float
    time_limit: float
    retry: RetryPolicy
    func: Callable[..., Any]
    arguments: type[BaseModel] = field(repr=False)
    description: str = ""

    def parse(self, kwargs: Mapping[str, Any]) -> BaseModel:
        """Check ``kwargs`` against the job's signature; raises JobArgumentError (one line)."""
        try:
            return self.arguments.model_validate(dict(kwargs))
        except ValidationError as exc:
            raise JobArgumentError(f"{self.name}: {_argument_problem(exc)}") from None

    def validate(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The checked arguments, JSON-ready, as they travel in a message."""
        return self.parse(kwargs).model_dump(mode="json", exclude_unset=True)

    def accepted(self) -> list[str]:
        return list(self.arguments.model_fields)


def _argument_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    name = ".".join(str(part) for part in error["loc"]) or "arguments"
    if error["type"] == "extra_forbidden":
        return f"unknown argument {name!r}"
    return f"argument {name}={error.get('input')!r}: {error['msg']}"


JOBS: dict[str, JobSpec] = {}


def _arguments_model(name: str, func: Callable[..., Any]) -> type[BaseModel]:
    hints = get_type_hints(func, include_extras=True)
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(func).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"job {name}: parameter {parameter.name} must be keyword-only")
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (hints.get(parameter.name, Any), default)
    model: type[BaseModel] = create_model(
        f"{name}.arguments", __config__=ConfigDict(extra="forbid"), **fields
    )
    return model


class FleetTask(Task):  # type: ignore[misc]
    """Checks arguments against the job's spec before running: bad ones never retry."""

    typing = False  # argument checking is ours, with a clearer message
    # Expected failures: recorded as failures, logged without a traceback.
    throws = (PermanentError,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spec = JOBS.get(self.name)
        if args:
            raise JobArgumentError(f"{self.name}: takes keyword arguments only")
        if spec is not None:
            kwargs = spec.parse(kwargs).model_dump(exclude_unset=True)
        from workers.bookkeeping import is_duplicate

        if is_duplicate(getattr(self.request, "id", None)):
            return skipped("a second message of a fire that another run took", duplicate=True)
        return super().__call__(**kwargs)


def job(
    name: str,
    *,
    queue: str,
    soft_time_limit: float,
    time_limit: float,
    retry: RetryPolicy = RetryPolicy(),
) -> Callable[[Callable[..., Any]], Any]:
    """Declare a job; the function must take keyword-only, JSON-friendly arguments."""
    if queue not in QUEUES:
        raise ValueError(f"job {name}: queue {queue!r} is not one of {', '.join(QUEUES)}")
    if not 0 < soft_time_limit < time_limit:
        raise ValueError(f"job {name}: need 0 < soft_time_limit < time_limit")

    def declare(func: Callable[..., Any]) -> Any:
        spec = JobSpec(
            name=name,
            queue=queue,
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            retry=retry,
            func=func,
            arguments=_arguments_model(name, func),
            description=(inspect.getdoc(func) or "").split("\n\n")[0],
        )
        JOBS[name] = spec
        return shared_task(name=name, base=FleetTask, **retry.celery_options())(func)

    return declare


def get_job(name: str) -> JobSpec:
    try:
        return JOBS[name]
    except KeyError:
        known = ", ".join(sorted(JOBS)) or "none"
        raise UnknownJobError(f"unknown job {name!r} (known: {known})") from None


def parse_cli_arguments(spec: JobSpec, pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``k=v`` pairs from the command line, checked against the job's arguments.

    A value is taken as JSON when the argument is not a string and the value parses
    (``limit=10``, ``tags=["a","b"]``), else as the literal text.
    """
    raw: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobArgumentError(f"{spec.name}: argument {pair!r} is not of the form key=value")
        raw[key] = value
    fields = spec.arguments.model_fields
    for key, value in raw.items():
        if key in fields and fields[key].annotation is not str:
            with contextlib.suppress(orjson.JSONDecodeError):
                raw[key] = orjson.loads(value)
    return spec.validate(raw)


def skipped(reason: str, **details: Any) -> dict[str, Any]:
    """The result of a run that chose not to work (a lock held elsewhere, say)."""
    return {"skipped": True, "reason": reason, **details}
