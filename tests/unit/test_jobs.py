from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

import tasks.heartbeat  # noqa: F401 - declares fleet.heartbeat
from tests import jobs_for_tests
from workers.celery_app import (
    VISIBILITY_MARGIN,
    JobTimeLimits,
    check_time_limits,
    create_app,
    route_by_job,
    visibility_timeout,
)
from workers.jobs import (
    JOBS,
    JobArgumentError,
    PermanentError,
    RetryPolicy,
    UnknownJobError,
    get_job,
    job,
    parse_cli_arguments,
)
from workers.runtime import Runtime
from workers.settings import FleetSettings, SettingsError


@pytest.fixture
def app(tmp_path: Any) -> Iterator[Celery]:
    settings = FleetSettings(home=tmp_path, extra_job_modules=["tests.jobs_for_tests"])
    # No broker is contacted: apply() runs in-process; the URL only has to parse.
    application = create_app(Runtime(settings, redis_url="redis://127.0.0.1:1/0"))
    yield application
    application.close()


def test_retry_policy_backoff_is_bounded_and_jittered() -> None:
    policy = RetryPolicy(backoff_base=2, backoff_cap=60)
    assert [policy.countdown(n, rand=lambda: 1.0) for n in range(7)] == [2, 4, 8, 16, 32, 60, 60]
    assert policy.countdown(3, rand=lambda: 0.25) == 4
    assert RetryPolicy(jitter=False).countdown(1, rand=lambda: 0.0) == 4


@pytest.mark.parametrize(
    "options",
    [{"max_retries": -1}, {"backoff_base": 0}, {"backoff_base": 10, "backoff_cap": 5}],
)
def test_retry_policy_refuses_nonsense(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**options)


def test_transient_errors_are_retried_until_success(app: Celery) -> None:
    result = app.tasks["test.flaky"].apply(kwargs={"key": "a", "fail_times": 2})
    assert result.successful(), result.result
    assert result.result == {"attempts": 3}


def test_transient_errors_stop_after_max_retries(app: Celery) -> None:
    result = app.tasks["test.flaky"].apply(kwargs={"key": "b", "fail_times": 10})
    assert result.failed()
    assert jobs_for_tests.ATTEMPTS["b"] == 1 + jobs_for_tests.FAST_RETRY.max_retries


@pytest.mark.parametrize("name", ["test.refused", "test.bug"])
def test_permanent_and_undeclared_errors_are_never_retried(app: Celery, name: str) -> None:
    key = f"once-{name}"
    result = app.tasks[name].apply(kwargs={"key": key})
    assert result.failed()
    assert jobs_for_tests.ATTEMPTS[key] == 1


def test_bad_arguments_in_a_message_fail_permanently(app: Celery) -> None:
    result = app.tasks["test.flaky"].apply(kwargs={"key": "c", "fail_times": "many"})
    assert result.failed()
    assert isinstance(result.result, JobArgumentError)
    assert "argument fail_times='many'" in str(result.result)
    assert jobs_for_tests.ATTEMPTS["c"] == 0


def test_positional_arguments_are_refused(app: Celery) -> None:
    result = app.tasks["fleet.heartbeat"].apply(args=(1,))
    assert isinstance(result.result, JobArgumentError)


def test_jobs_route_to_their_queue_and_get_their_limits(app: Celery) -> None:
    assert route_by_job("test.secretive") == {"queue": "secrets"}
    assert route_by_job("fleet.heartbeat") == {"queue": "default"}
    assert route_by_job("not.a.job") is None
    task = app.tasks["fleet.heartbeat"]
    spec = JOBS["fleet.heartbeat"]
    assert (task.soft_time_limit, task.time_limit) == (spec.soft_time_limit, spec.time_limit)
    assert task.acks_late and task.reject_on_worker_lost
    assert app.conf.task_serializer == "json" and app.conf.accept_content == ["json"]


def test_time_limits_can_be_overridden_by_settings(tmp_path: Any) -> None:
    settings = FleetSettings(
        home=tmp_path,
        time_limits={"fleet.heartbeat": (1.5, 2.0), "*": (3.0, 4.0)},
        visibility_timeout=5,
    )
    application = create_app(Runtime(settings, redis_url="redis://127.0.0.1:1/0"))
    task = application.tasks["fleet.heartbeat"]
    assert (task.soft_time_limit, task.time_limit) == (1.5, 2.0)
    other = application.tasks["drift.detect"]
    assert (other.soft_time_limit, other.time_limit) == (3.0, 4.0)
    assert application.conf.broker_transport_options["visibility_timeout"] == 5


def test_visibility_timeout_must_exceed_every_hard_limit() -> None:
    longest = max(JOBS.values(), key=lambda spec: spec.time_limit)
    expected = (
        rf"^FLEET_VISIBILITY_TIMEOUT=60 must exceed the longest hard time limit \({longest.name}: "
    )
    with pytest.raises(SettingsError, match=expected):
        check_time_limits(JobTimeLimits({}), JOBS, visibility_timeout=60)
    check_time_limits(JobTimeLimits({}), JOBS, visibility_timeout=7200)
    shortened = JobTimeLimits({"fleet.heartbeat": (1.0, 2.0)})
    check_time_limits(shortened, {"fleet.heartbeat": JOBS["fleet.heartbeat"]}, 3)


def test_the_default_visibility_timeout_is_the_longest_hard_limit_plus_a_margin(
    tmp_path: Any,
) -> None:
    longest = max(max(spec.time_limit, spec.retry.backoff_cap) for spec in JOBS.values())
    assert visibility_timeout(JobTimeLimits({}), JOBS, None) == longest + VISIBILITY_MARGIN
    shortened = {"fleet.heartbeat": JOBS["fleet.heartbeat"]}  # retries wait up to 30 s
    assert visibility_timeout(JobTimeLimits({"*": (3.0, 4.5)}), shortened, None) == 30 + 120
    application = create_app(
        Runtime(FleetSettings(home=tmp_path), redis_url="redis://127.0.0.1:1/0")
    )
    transport = application.conf.broker_transport_options
    # the longest: heartbeat's and aggregate's 600 s runs, secrets.rotate's 600 s countdown
    assert transport["visibility_timeout"] == 600 + 120
    with pytest.raises(SettingsError, match="must exceed the longest hard time limit"):
        visibility_timeout(JobTimeLimits({}), JOBS, 60)


def test_pickle_is_refused(app: Celery) -> None:
    assert "pickle" not in app.conf.accept_content
    assert "pickle" not in app.conf.result_accept_content


def test_unknown_job_names_the_known_ones() -> None:
    with pytest.raises(UnknownJobError, match=r"unknown job 'x\.y' \(known: .*fleet\.heartbeat"):
        get_job("x.y")


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([], {}),
        (["hold_seconds=2.5"], {"hold_seconds": 2.5}),
        (["hold_seconds=3"], {"hold_seconds": 3.0}),
    ],
)
def test_cli_arguments_are_parsed_and_checked(pairs: list[str], expected: dict[str, Any]) -> None:
    assert parse_cli_arguments(get_job("fleet.heartbeat"), pairs) == expected


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["hold_seconds"], "argument 'hold_seconds' is not of the form key=value"),
        (["=3"], "argument '=3' is not of the form key=value"),
        (["nope=1"], "unknown argument 'nope'"),
        (["hold_seconds=soon"], "argument hold_seconds='soon': Input should be a valid number"),
        (["hold_seconds=-1"], "argument hold_seconds=-1: Input should be greater than or equal"),
    ],
)
def test_bad_cli_arguments_are_one_line(pairs: list[str], message: str) -> None:
    with pytest.raises(JobArgumentError) as caught:
        parse_cli_arguments(get_job("fleet.heartbeat"), pairs)
    assert str(caught.value) == f"fleet.heartbeat: {message}" or message in str(caught.value)
    assert str(caught.value).startswith("fleet.heartbeat: ")


def test_text_arguments_stay_text() -> None:
    assert parse_cli_arguments(get_job("test.refused"), ["key=123"]) == {"key": "123"}


def test_job_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="queue 'bulk'"):
        job("x.bad_queue", queue="bulk", soft_time_limit=1, time_limit=2)
    with pytest.raises(ValueError, match="soft_time_limit < time_limit"):
        job("x.bad_limits", queue="default", soft_time_limit=2, time_limit=2)

    def positional(value: int) -> None: ...

    with pytest.raises(TypeError, match="must be keyword-only"):
        job("x.positional", queue="default", soft_time_limit=1, time_limit=2)(positional)


def test_permanent_errors_are_not_in_the_transient_set() -> None:
    assert not issubclass(PermanentError, RetryPolicy().transient)
