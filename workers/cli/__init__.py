"""The ``fleet`` command.

Import discipline: nothing here (or in a command module listed in ``COMMAND_MODULES``)
may import ``prometheus_client`` at module level. ``fleet worker`` must switch
prometheus-client to multiprocess mode before its first import; heavy imports happen
inside the command functions.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from workers.cli.common import FleetCliError, service_error
from workers.errors import FleetError

# Command groups contributed by other packages, found by module name (the same way the
# Celery app finds jobs), so that this package imports none of them directly.
COMMAND_MODULES: tuple[str, ...] = (
    "workers.cli.core",
    "schedules.cli",
    "workers.demo",
    "tasks.drift.cli",
    "tasks.impressions.cli",
    "tasks.secrets.cli",
    "tasks.audit.cli",
    "tasks.canary.cli",
    "tasks.rollouts.cli",
)


class FleetGroup(click.Group):
    """Turns expected failures into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FleetError as exc:
            raise FleetCliError(str(exc), exit_code=2 if _is_usage(exc) else 1) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            reason = service_error(exc)
            if reason is not None:
                raise FleetCliError(reason) from None
            raise FleetCliError(
                f"unexpected {type(exc).__name__}: {exc} (FLEET_LOG_LEVEL=DEBUG for details)"
            ) from exc


def _is_usage(exc: FleetError) -> bool:
    from workers.jobs import JobArgumentError, UnknownJobError
    from workers.settings import SettingsError

    return isinstance(exc, SettingsError | JobArgumentError | UnknownJobError)


@click.group(cls=FleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="config-fleet", prog_name="fleet")
def cli() -> None:
    """The config-fleet worker fleet: scheduler, workers and the jobs they run.

    Settings come from FLEET_* environment variables (and .env); with none set the fleet
    runs on its embedded default (SQLite under .fleet/, a Redis it starts itself).
    """


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(cli)


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="fleet")
