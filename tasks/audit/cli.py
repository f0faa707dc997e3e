"""``fleet audit verify`` and ``fleet audit resume``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from workers.cli.common import (
    FleetCliError,
    emit_json,
    json_option,
    settings_or_exit,
    start_runtime,
)


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
@click.option(
    "--sink",
    help="The sink these files belong to (default: the one its checkpoints name), to compare "
    "the archive's end with the sink's state in the database.",
)
@click.option("--no-db", is_flag=True, help="Do not compare with the database's state.")
@click.option(
    "--as-of",
    type=click.DateTime(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"]),
    help="When these files were copied (UTC unless an offset is given), for an archive kept "
    "elsewhere: its last checkpoint must be recent as of then. Default: now.",
)
@json_option
def verify(
    paths: tuple[Path, ...],
    no_key: bool,
    partial: bool,
    sink: str | None,
    no_db: bool,
    as_of: datetime | None,
    as_json: bool,
) -> None:
    """Check a file sink's directory or files: every hash, every link, every checkpoint,
    and that the archive ends where the database says the sink's chain ends.

    Exits 1 naming the first broken record if any event was altered, removed, reordered
    or inserted, or if records were cut from the end (the sink's state in the database is
    further on). Checkpoints are checked with the fleet's audit key (FLEET_AUDIT_HMAC_KEY
    or FLEET_AUDIT_HMAC_KEY_PATH, or FLEET_HOME/audit-hmac.key on the embedded default) and
    the older keys in FLEET_AUDIT_HMAC_KEYS (comma-separated), each checkpoint with the key it
    names, unless --no-key.
    """
    from tasks.audit import hmac_key, old_hmac_keys
    from tasks.audit.verify import against_state
    from tasks.audit.verify import verify as check

    rt = start_runtime(start_embedded=False) if not (no_key and no_db) else None
    settings = rt.settings if rt is not None else settings_or_exit()
    keys: list[bytes] = []
    if rt is not None and not no_key:
        keys = [hmac_key(rt.settings, rt.engine), *old_hmac_keys(rt.settings)]
    if as_of is not None and as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    verdict = check(
        list(paths),
        keys,
        from_start=not partial,
        interval=settings.audit_checkpoint_interval,
        as_of=as_of,
    )
    compared = None
    if verdict.ok and rt is not None and not no_db:
        verdict, compared = against_state(verdict, rt, sink)
    if as_json:
        emit_json(
            {
                "ok": verdict.ok,
                "records": verdict.records,
                "checkpoints": verdict.checkpoints,
                "problem": verdict.problem,
                "head_seq": verdict.head_seq,
                "compared_with_database": compared,
            }
        )
    if not verdict.ok:
        raise FleetCliError(f"audit chain broken at {verdict.problem}")
    if not as_json:
        click.echo(
            f"ok: {verdict.records} records, {verdict.checkpoints} checkpoints, "
            f"head seq {verdict.head_seq}"
            + (f"; the database's state of sink {compared} agrees" if compared else "")
        )


@audit.command()
@click.argument("sink")
def resume(sink: str) -> None:
    """Resume a sink stopped after a permanent refusal (fix the cause first)."""

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
