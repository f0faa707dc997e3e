"""``fleet audit verify`` and ``fleet audit resume``."""

from __future__ import annotations

from pathlib import Path

import click

from workers.cli.common import FleetCliError, emit_json, json_option, settings_or_exit


@click.group()
def audit() -> None:
    """Audit shipping: verify what was shipped, resume a stopped sink."""


@audit.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--no-key", is_flag=True, help="Skip checkpoint signatures (no key at hand).")
@click.option(
    "--partial",
    is_flag=True,
    help="The files may start mid-chain (older segments archived elsewhere).",
)
@json_option
def verify(paths: tuple[Path, ...], no_key: bool, partial: bool, as_json: bool) -> None:
    """Check a file sink's directory or files: every hash, every link, every checkpoint.

    Exits 1 naming the first broken record if any event was altered, removed, reordered
    or inserted. Checkpoints are checked with the fleet's audit key (FLEET_AUDIT_HMAC_KEY
    or FLEET_HOME/audit-hmac.key) unless --no-key.
    """
    from tasks.audit import hmac_key
    from tasks.audit.verify import verify as check

    key = None if no_key else hmac_key(settings_or_exit())
    verdict = check(list(paths), key, from_start=not partial)
    if as_json:
        emit_json(
            {
                "ok": verdict.ok,
                "records": verdict.records,
                "checkpoints": verdict.checkpoints,
                "problem": verdict.problem,
                "head_seq": verdict.head_seq,
            }
        )
    if not verdict.ok:
        raise FleetCliError(f"audit chain broken at {verdict.problem}")
    if not as_json:
        click.echo(
            f"ok: {verdict.records} records, {verdict.checkpoints} checkpoints, "
            f"head seq {verdict.head_seq}"
        )


@audit.command()
@click.argument("sink")
def resume(sink: str) -> None:
    """Resume a sink stopped after a permanent refusal (fix the cause first)."""
    from workers.cli.common import start_runtime
    from workers.db.models import AuditSinkState

    rt = start_runtime(start_embedded=False)
    with rt.sessions.begin() as session:
        state = session.get(AuditSinkState, sink)
        if state is None or state.stopped_reason is None:
            raise FleetCliError(f"sink {sink!r} is not stopped")
        reason, state.stopped_reason = state.stopped_reason, None
    click.echo(f"sink {sink} resumed (it was stopped: {reason})")


def register(group: click.Group) -> None:
    group.add_command(audit)
