"""``fleet canary start|status|abort``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from workers.cli.common import (
    FleetCliError,
    console,
    emit_json,
    json_option,
    notifier,
    start_runtime,
)


@click.group()
def canary() -> None:
    """Configuration canaries: start one, watch them, abort one."""


def metrics_from_flags(texts: tuple[str, ...]) -> list[dict[str, Any]]:
    """``--metric NAME=PROMQL[:increase|decrease|either]`` options as spec metrics."""
    metrics = []
    for text in texts:
        name, _, query = text.partition("=")
        direction = "increase"
        for suffix in ("increase", "decrease", "either"):
            if query.endswith(f":{suffix}"):
                query, direction = query[: -len(suffix) - 1], suffix
        metrics.append({"name": name, "query": query, "direction": direction})
    return metrics


def _spec_from_flags(options: dict[str, Any]) -> dict[str, Any]:
    missing = [
        f"--{k.replace('_', '-')}"
        for k in ("name", "key", "environment", "value", "canary_selector", "baseline_selector")
        if options.get(k) is None
    ]
    if missing or not options["metric"]:
        raise FleetCliError(f"give a spec file, or {', '.join(missing) or '--metric'}", exit_code=2)
    metrics = metrics_from_flags(options["metric"])
    import orjson

    try:
        value = orjson.loads(options["value"])
    except orjson.JSONDecodeError:
        value = options["value"]
    return {
        "name": options["name"],
        "canary": options["canary_selector"],
        "baseline": options["baseline_selector"],
        "metrics": metrics,
        "change": {
            "key": options["key"],
            "environment": options["environment"],
            "scope": options["scope"],
            "value": value,
        },
    }


@canary.command()
@click.argument(
    "spec_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--name")
@click.option("--key", help="Configuration key (dotted path).")
@click.option("--environment")
@click.option("--scope", default="environment", show_default=True)
@click.option("--value", help="The new value (JSON, or text).")
@click.option("--canary-selector", help='Label matchers of the canary, e.g. instance="c1"')
@click.option("--baseline-selector", help="Label matchers of the baseline.")
@click.option(
    "--metric",
    multiple=True,
    metavar="NAME=PROMQL[:increase|decrease]",
    help="A metric to judge; PROMQL contains $selector.",
)
def start(spec_file: Path | None, **options: Any) -> None:
    """Start judging a configuration change from SPEC_FILE (YAML) or from the flags."""
    import yaml
    from pydantic import ValidationError

    from tasks.canary import CanaryRefused, create_deployment
    from tasks.canary.spec import CanarySpec
    from workers.yamlio import load_yaml

    try:
        raw = load_yaml(spec_file.read_text()) if spec_file else _spec_from_flags(options)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise FleetCliError(f"{spec_file}: not valid YAML{line}", exit_code=2) from None
    try:
        spec = CanarySpec.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise FleetCliError(f"canary spec: {where}: {error['msg']}", exit_code=2) from None
    rt = start_runtime(start_embedded=False)
    rt.require_migrated()
    from sqlalchemy.exc import IntegrityError

    try:
        with rt.sessions.begin() as session:
            deployment = create_deployment(
                session, spec, datetime.now(UTC), "cli", notify=notifier(rt)
            )
            replaced = deployment.replaces_version
            written = len(deployment.overrides or [])
    except IntegrityError:
        raise FleetCliError(f"a canary named {spec.name!r} exists already", exit_code=2) from None
    except CanaryRefused as exc:
        raise FleetCliError(str(exc), exit_code=2) from None
    subset = (
        f"; candidate written for its subset ({written} override{'s' * (written != 1)})"
        if written
        else "; no subset named: give the candidate to the canary instances yourself"
    )
    click.echo(
        f"canary {spec.name} started: {spec.change.environment} {spec.change.key} "
        f"(replacing {replaced or 'nothing'}){subset}"
    )


@canary.command()
@json_option
def status(as_json: bool) -> None:
    """Every deployment, its state and its last analysis."""
    from rich.table import Table
    from sqlalchemy import select

    from workers.db.models import CanaryAnalysis, CanaryDeployment

    rt = start_runtime(start_embedded=False)
    rt.require_migrated()
    with rt.sessions() as session:
        rows = session.scalars(select(CanaryDeployment).order_by(CanaryDeployment.id.desc())).all()
        last = {
            a.deployment_id: a
            for a in session.scalars(select(CanaryAnalysis).order_by(CanaryAnalysis.id))
        }
    report: list[dict[str, Any]] = [
        {
            "name": r.name,
            "state": r.state,
            "key": r.key,
            "environment": r.environment,
            "passes": r.passes,
            "failures": r.failures,
            "inconclusives": r.inconclusives,
            "last_verdict": last[r.id].verdict if r.id in last else None,
            "last_score": last[r.id].score if r.id in last else None,
            "decision_reason": r.decision_reason,
            "subset": r.subset,
            "conflict": r.conflict,
        }
        for r in rows
    ]
    if as_json:
        emit_json(report)
        return
    table = Table(title=f"Canary deployments ({len(report)})", title_justify="left")
    for column in ("name", "state", "change", "passes", "fails", "inconclusive", "last", "why"):
        table.add_column(column)
    for r in report:
        last_text = (
            "-"
            if r["last_verdict"] is None
            else (
                f"{r['last_verdict']}"
                + (f" {r['last_score']:.0f}" if r["last_score"] is not None else "")
            )
        )
        table.add_row(
            str(r["name"]),
            str(r["state"]),
            f"{r['environment']} {r['key']}",
            str(r["passes"]),
            str(r["failures"]),
            str(r["inconclusives"]),
            last_text,
            str(r["decision_reason"] or ""),
        )
    console().print(table)


@canary.command()
@click.argument("name")
def abort(name: str) -> None:
    """Stop judging NAME and take the candidate away from its canary subset."""
    from sqlalchemy import select

    from tasks.canary import apply_decision
    from tasks.canary.machine import Progress
    from tasks.canary.machine import abort as aborted
    from workers.db.models import CanaryDeployment

    rt = start_runtime(start_embedded=False)
    rt.require_migrated()
    now = datetime.now(UTC)
    with rt.sessions.begin() as session:
        row = session.scalars(
            select(CanaryDeployment).where(CanaryDeployment.name == name).with_for_update()
        ).first()
        if row is None:
            raise FleetCliError(f"no canary named {name!r}")
        step = aborted(
            Progress(
                row.state, row.passes, row.failures, row.inconclusives, row.prometheus_down_since
            )
        )
        if step.decision is None:
            raise FleetCliError(f"canary {name} is {row.state} already")
        apply_decision(session, row, step, now, notifier(rt))
        state, why = row.state, row.decision_reason
    if state == "conflict":
        raise FleetCliError(f"canary {name}: {why}")
    click.echo(f"canary {name} aborted; the canary subset's overrides of {row.key} removed")


def register(group: click.Group) -> None:
    group.add_command(canary)
