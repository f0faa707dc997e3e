"""``fleet rollout start|status|pause|resume|abort``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from tasks.canary.cli import metrics_from_flags
from workers.cli.common import (
    FleetCliError,
    console,
    emit_json,
    json_option,
    notifier,
    start_runtime,
)


@click.group()
def rollout() -> None:
    """Guarded feature-flag rollouts: start one, watch them, pause, resume or abort one."""


def _spec_from_flags(options: dict[str, Any]) -> dict[str, Any]:
    missing = [f"--{k}" for k in ("name", "flag", "environment") if options.get(k) is None]
    if missing or not options["metric"]:
        raise FleetCliError(f"give a spec file, or {', '.join(missing) or '--metric'}", exit_code=2)
    metrics = metrics_from_flags(options["metric"])
    spec: dict[str, Any] = {
        "name": options["name"],
        "flag": options["flag"],
        "environment": options["environment"],
        "metrics": metrics,
    }
    if options.get("steps"):
        try:
            spec["steps"] = [float(s) for s in options["steps"].split(",")]
        except ValueError:
            raise FleetCliError(
                f"--steps {options['steps']}: give percentages, e.g. 1,5,25,50,100", exit_code=2
            ) from None
    for option in ("min_step", "min_impressions"):
        if options.get(option) is not None:
            spec[option] = options[option]
    return spec


@rollout.command()
@click.argument(
    "spec_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--name")
@click.option("--flag", help="Feature flag key.")
@click.option("--environment")
@click.option("--steps", help="Percentages, e.g. 1,5,25,50,100 (the default).")
@click.option("--min-step", help="How long each step lasts at least, e.g. 10m.")
@click.option("--min-impressions", type=int, help="Impressions of each variant per step.")
@click.option(
    "--metric",
    multiple=True,
    metavar="NAME=PROMQL[:increase|decrease]",
    help='A metric to judge; PROMQL contains $selector (flag_variant="on" / "off").',
)
def start(spec_file: Path | None, **options: Any) -> None:
    """Start rolling a flag out from SPEC_FILE (YAML) or from the flags."""
    import yaml
    from pydantic import ValidationError

    from tasks.rollouts import RolloutRefused, start_rollout
    from tasks.rollouts.spec import RolloutSpec
    from workers.yamlio import load_yaml

    try:
        raw = load_yaml(spec_file.read_text()) if spec_file else _spec_from_flags(options)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise FleetCliError(f"{spec_file}: not valid YAML{line}", exit_code=2) from None
    try:
        spec = RolloutSpec.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "spec"
        raise FleetCliError(f"rollout spec: {where}: {error['msg']}", exit_code=2) from None
    rt = start_runtime(start_embedded=False)
    rt.require_migrated()
    from sqlalchemy.exc import IntegrityError

    try:
        with rt.sessions.begin() as session:
            row = start_rollout(session, spec, datetime.now(UTC), "cli", notify=notifier(rt))
            said = (
                f"rollout {row.name} started: {row.environment} {row.flag_key} at "
                f"{row.steps[0]:g}% ({row.treatment_variant} against {row.control_variant}); "
                f"steps {', '.join(f'{s:g}' for s in row.steps)}"
            )
    except IntegrityError:
        raise FleetCliError(f"a rollout named {spec.name!r} exists already", exit_code=2) from None
    except RolloutRefused as exc:
        raise FleetCliError(str(exc), exit_code=2) from None
    click.echo(said)


@rollout.command()
@json_option
def status(as_json: bool) -> None:
    """Every rollout: its state, its step and its last look."""
    from rich.table import Table
    from sqlalchemy import select

    from workers.db.models import FeatureFlag, FlagRollout, FlagRolloutStep

    rt = start_runtime(start_embedded=False)
    rt.require_migrated()
    now = datetime.now(UTC)
    with rt.sessions() as session:
        rows = session.scalars(select(FlagRollout).order_by(FlagRollout.id.desc())).all()
        last = {
            s.rollout_id: s
            for s in session.scalars(select(FlagRolloutStep).order_by(FlagRolloutStep.id))
        }
        flags = {
            (f.key, f.environment): f.rollout_percentage
            for f in session.scalars(select(FeatureFlag))
        }
    report: list[dict[str, Any]] = [
        {
            "name": r.name,
            "flag": r.flag_key,
            "environment": r.environment,
            "state": r.state,
            "step": r.steps[r.step_index],
            "steps": r.steps,
            "flag_percentage": flags.get((r.flag_key, r.environment)),
            "step_seconds": int((now - r.step_started_at).total_seconds()),
            "last_decision": last[r.id].decision if r.id in last else None,
            "last_verdict": last[r.id].verdict if r.id in last else None,
            "reason": r.reason or (last[r.id].reason if r.id in last else None),
            "conflict": r.conflict,
        }
        for r in rows
    ]
    if as_json:
        emit_json(report)
        return
    table = Table(title=f"Flag rollouts ({len(report)})", title_justify="left")
    for column in ("name", "state", "flag", "step", "flag now", "in step", "last", "why"):
        table.add_column(column)
    for r in report:
        table.add_row(
            str(r["name"]),
            str(r["state"]),
            f"{r['environment']} {r['flag']}",
            f"{r['step']:g}%",
            "-" if r["flag_percentage"] is None else f"{r['flag_percentage']:g}%",
            f"{r['step_seconds']}s",
            str(r["last_decision"] or "-"),
            str(r["reason"] or ""),
        )
    console().print(table)


def _change(name: str, action: str) -> None:
    from tasks.rollouts import RolloutRefused, set_state

    rt = start_runtime(start_embedded=False)
    rt.require_migrated()
    try:
        with rt.sessions.begin() as session:
            row = set_state(session, name, action, datetime.now(UTC), notifier(rt))
            said = f"rollout {name} {row.state}: {row.reason}; flag at {row.written_percentage:g}%"
    except RolloutRefused as exc:
        raise FleetCliError(str(exc)) from None
    click.echo(said)


@rollout.command()
@click.argument("name")
def pause(name: str) -> None:
    """Hold NAME at its step: no judging, no change to the flag."""
    _change(name, "pause")


@rollout.command()
@click.argument("name")
def resume(name: str) -> None:
    """Go on with NAME; after a conflict, from the flag as it now stands."""
    _change(name, "resume")


@rollout.command()
@click.argument("name")
def abort(name: str) -> None:
    """Stop NAME and roll the flag back (to 0, or the step before with on_failure)."""
    _change(name, "abort")


def register(group: click.Group) -> None:
    group.add_command(rollout)
