"""``fleet drift report``: the findings as a table (or JSON), worst first."""

from __future__ import annotations

import click

from workers.cli.common import console, emit_json, json_option, start_runtime

_STYLE = {"critical": "bold red", "warning": "yellow", "info": "dim"}


@click.group()
def drift() -> None:
    """Configuration drift: findings of drift.detect."""


@drift.command()
@click.option("-e", "--environment", help="Only this environment's findings.")
@click.option("--all", "include_resolved", is_flag=True, help="Resolved findings too.")
@json_option
def report(environment: str | None, include_resolved: bool, as_json: bool) -> None:
    """Open findings (expected ones marked), worst first."""
    from rich.table import Table

    from tasks.drift.store import findings, row_dict

    rt = start_runtime(start_embedded=False)
    rt.require_migrated()
    with rt.sessions() as session:
        rows = findings(session, environment=environment, include_resolved=include_resolved)
    if as_json:
        emit_json([row_dict(row) for row in rows])
        return
    table = Table(title=f"Drift findings ({len(rows)})", title_justify="left")
    for column in ("severity", "kind", "environment", "key", "declared", "live", "note", "commit"):
        table.add_column(column, overflow="fold")
    for row in rows:
        note = f"expected: {row.reason}" if row.expected else row.message
        if row.resolved_at is not None:
            note = f"resolved {row.resolved_at:%Y-%m-%d %H:%M}; {note}"
        table.add_row(
            f"[{_STYLE.get(row.severity, '')}]{row.severity}[/]",
            row.kind,
            row.environment,
            row.key,
            row.before or "",
            row.after or "",
            note,
            (row.desired_commit or "")[:10],
        )
    console().print(table)


def register(group: click.Group) -> None:
    group.add_command(drift)
