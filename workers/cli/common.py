"""What every ``fleet`` command shares: one-line errors, settings, runtime, output."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO, Any, TypeVar

import click
import orjson

from workers.logs import configure_logging, redact
from workers.runtime import Runtime, install
from workers.settings import FleetSettings, SettingsError, load_settings

F = TypeVar("F", bound=Callable[..., Any])


class FleetCliError(click.ClickException):
    """Printed as ``fleet: error: <one line>`` on stderr; exit code 1 (2 for bad usage)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(" ".join(redact(message).split()))
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"fleet: error: {self.format_message()}", err=True, file=file)


def service_error(exc: BaseException) -> str | None:
    """A one-line reason for a service that cannot be reached, or None."""
    import redis
    import sqlalchemy.exc

    if isinstance(exc, redis.exceptions.ConnectionError):
        return f"Redis unreachable: {exc}"
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        return f"database unreachable: {str(exc.orig).strip().splitlines()[0]}"
    return None


def settings_or_exit() -> FleetSettings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise FleetCliError(str(exc), exit_code=2) from None


def start_runtime(settings: FleetSettings | None = None, *, start_embedded: bool = True) -> Runtime:
    """Settings, logging and the process's runtime, in that order."""
    settings = settings or settings_or_exit()
    configure_logging(
        level=settings.log_level,
        log_format=settings.log_format,
        secrets=settings.secret_values(),
    )
    return install(Runtime(settings, start_embedded=start_embedded))


def emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode())
    sys.stdout.write("\n")
    sys.stdout.flush()


def console() -> Any:
    """A rich console; wide when writing to a file or pipe, where nothing wraps for us."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=200)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON, not a table.")(func)


def notifier(rt: Runtime) -> Any:
    """Where cache invalidations and change events go (the Redis client); None, said on
    stderr, when Redis cannot be reached: the writes are still made, unannounced."""
    try:
        client = rt.redis
        client.ping()
    except Exception as exc:
        click.echo(
            f"warning: Redis unreachable ({type(exc).__name__}): written without cache "
            "invalidation or change event",
            err=True,
        )
        return None
    return client
