"""``fleet secrets put``, ``status`` and ``unstick``."""

from __future__ import annotations

import sys

import click
import orjson

from workers.cli.common import FleetCliError, console, emit_json, json_option, start_runtime

_STYLE = {"overdue": "bold red", "error": "bold red", "due_soon": "yellow", "unmanaged": "dim"}


@click.group()
def secrets() -> None:
    """Managed secrets: write them, see their rotation status."""


def _pairs(items: tuple[str, ...], what: str) -> dict[str, str]:
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FleetCliError(
                f"{what} {item.split('=')[0]!r} is not of the form key=value", exit_code=2
            )
        found[key] = value
    return found


@secrets.command()
@click.argument("path")
@click.argument("pairs", nargs=-1, metavar="[KEY=VALUE]...")
@click.option(
    "--meta",
    "meta",
    multiple=True,
    metavar="KEY=VALUE",
    help="Custom metadata (rotation_interval_days, notify_days, rotator, owner).",
)
def put(path: str, pairs: tuple[str, ...], meta: tuple[str, ...]) -> None:
    """Write a new version of the secret at PATH (under the managed prefix).

    Values come from KEY=VALUE arguments, or, with none given, from a JSON object on
    standard input (so that they stay out of the shell's history).
    """
    from tasks.secrets.stores import open_store

    data = _pairs(pairs, "value")
    if not data:
        if sys.stdin.isatty():
            raise FleetCliError(
                "give KEY=VALUE arguments or a JSON object on standard input", exit_code=2
            )
        try:
            loaded = orjson.loads(sys.stdin.buffer.read())
        except orjson.JSONDecodeError:
            raise FleetCliError("standard input is not a JSON object", exit_code=2) from None
        if not isinstance(loaded, dict) or not loaded:
            raise FleetCliError("standard input is not a non-empty JSON object", exit_code=2)
        data = {str(k): str(v) for k, v in loaded.items()}
    rt = start_runtime(start_embedded=False)
    if rt.settings.embedded_secrets:
        rt.require_migrated()
    store = open_store(rt.settings, rt.engine)
    version = store.write(path, data)
    custom = _pairs(meta, "metadata")
    if custom:
        store.set_custom_metadata(path, custom)
    click.echo(
        f"{path}: version {version} written to the {store.name} store"
        + (f" with metadata {', '.join(sorted(custom))}" if custom else "")
    )


@secrets.command()
@click.argument("path")
def unstick(path: str) -> None:
    """Clear a stuck rotation of PATH once its stored password logs in again.

    A rotation is stuck when neither the stored nor the pending password logs in: the fleet
    stops rotating that secret until a person has fixed the role (or stored the password
    that works) and run this.
    """
    from datetime import UTC, datetime

    from tasks.secrets.rotate import PostgresRotator
    from tasks.secrets.stores import open_store
    from workers import audit

    rt = start_runtime(start_embedded=False)
    rt.require_migrated()

    def record(action: str, subject: str, **details: object) -> None:
        with rt.sessions.begin() as session:
            audit.record(session, action, subject, datetime.now(UTC), **details)

    click.echo(PostgresRotator(open_store(rt.settings, rt.engine), record).unstick(path))


@secrets.command()
@json_option
def status(as_json: bool) -> None:
    """The last check's view of every managed secret, worst first."""
    from rich.table import Table
    from sqlalchemy import select

    from workers.db.models import SecretRotationStatus

    rt = start_runtime(start_embedded=False)
    rt.require_migrated()
    order = {"overdue": 0, "error": 1, "due_soon": 2, "unmanaged": 3, "ok": 4}
    with rt.sessions() as session:
        rows = sorted(
            session.scalars(select(SecretRotationStatus)),
            key=lambda r: (order.get(r.status, 5), r.path),
        )
    if as_json:
        emit_json(
            [
                {
                    "path": r.path,
                    "status": r.status,
                    "reason": r.reason,
                    "version": r.version,
                    "version_created": r.version_created,
                    "due_at": r.due_at,
                    "rotator": r.rotator,
                    "owner": r.owner,
                    "checked_at": r.checked_at,
                }
                for r in rows
            ]
        )
        return
    table = Table(title=f"Secrets ({len(rows)})", title_justify="left")
    for column in ("status", "path", "version", "created", "due", "rotator", "owner", "reason"):
        table.add_column(column)
    for r in rows:
        style = _STYLE.get(r.status)
        table.add_row(
            f"[{style}]{r.status}[/]" if style else r.status,
            r.path,
            str(r.version or "-"),
            f"{r.version_created:%Y-%m-%d}" if r.version_created else "-",
            f"{r.due_at:%Y-%m-%d}" if r.due_at else "-",
            r.rotator or "-",
            r.owner or "-",
            r.reason or "",
        )
    console().print(table)


def register(group: click.Group) -> None:
    group.add_command(secrets)
