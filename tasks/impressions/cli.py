"""``fleet impressions``: what the counts say, and dead letters sent back after a fix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click

from workers.cli.common import console, emit_json, json_option, start_runtime


@click.group()
def impressions() -> None:
    """Feature-flag impressions: counts, users, dead letters."""


@impressions.command(name="replay-dead")
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=100_000,
    show_default=True,
    help="Most dead letters to send back.",
)
@click.option("--reason", help="Only dead letters of this reason (e.g. future_timestamp).")
def replay_dead(limit: int, reason: str | None) -> None:
    """Send dead letters back to feature_flag_impressions (after fixing their cause).
    Those still bad come back to the dead letters on the next drain."""
    from tasks.impressions.queue import DEAD, replay_dead_letters
    from tasks.impressions.records import REASONS

    if reason is not None and reason not in REASONS:
        raise click.BadParameter(
            f"{reason!r} is not one of {', '.join(REASONS)}", param_hint="--reason"
        )
    from rich.console import Console
    from rich.progress import Progress

    rt = start_runtime(start_embedded=False)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("dead letters looked at", total=None)

        def show(looked: int, total: int, moved: int) -> None:
            bar.update(task, completed=looked, total=total, description=f"{moved} re-queued")

        moved = replay_dead_letters(rt.redis, limit, reason, progress=show)
    left = rt.redis.llen(DEAD)
    click.echo(f"re-queued {moved} dead letters; {left} remain in {DEAD}")


@impressions.command()
@click.option("--hours", type=click.IntRange(1, 24 * 7), default=24, show_default=True)
@click.option("--flag", "flag_key", help="Only this flag.")
@json_option
def report(hours: int, flag_key: str | None, as_json: bool) -> None:
    """Impressions and distinct users per flag, environment and variant."""
    from rich.table import Table
    from sqlalchemy import func, select

    from tasks.impressions.doubling import check
    from workers.db.models import FlagImpressionCount, FlagImpressionUsers

    rt = start_runtime(start_embedded=False)
    rt.require_migrated()
    since = datetime.now(UTC) - timedelta(hours=hours)
    counts = (
        select(
            FlagImpressionCount.flag_key,
            FlagImpressionCount.environment,
            FlagImpressionCount.variant,
            func.sum(FlagImpressionCount.count),
        )
        .where(FlagImpressionCount.bucket_start >= since)
        .group_by(
            FlagImpressionCount.flag_key,
            FlagImpressionCount.environment,
            FlagImpressionCount.variant,
        )
    )
    users = select(
        FlagImpressionUsers.flag_key,
        FlagImpressionUsers.environment,
        FlagImpressionUsers.variant,
        FlagImpressionUsers.users,
    ).where(FlagImpressionUsers.day == datetime.now(UTC).date())
    if flag_key:
        counts = counts.where(FlagImpressionCount.flag_key == flag_key)
        users = users.where(FlagImpressionUsers.flag_key == flag_key)
    with rt.engine.connect() as connection:
        seen = {tuple(row[:3]): int(row[3]) for row in connection.execute(counts)}
        today = {tuple(row[:3]): int(row[3]) for row in connection.execute(users)}
        doubled = check(connection, rt.redis, datetime.now(UTC))
    warnings = [d.message for d in doubled if not flag_key or d.flag_key == flag_key]
    rows = [
        {
            "flag_key": k[0],
            "environment": k[1],
            "variant": k[2],
            "impressions": seen.get(k, 0),
            "users_today": today.get(k),
        }
        for k in sorted(set(seen) | set(today))
    ]
    if as_json:
        emit_json({"hours": hours, "rows": rows, "warnings": warnings})
        return
    table = Table(
        title=f"Impressions, last {hours}h; distinct users today (UTC)", title_justify="left"
    )
    for column in ("flag", "environment", "variant", "impressions", "users today"):
        table.add_column(
            column, justify="right" if column in ("impressions", "users today") else "left"
        )
    for row in rows:
        table.add_row(
            str(row["flag_key"]),
            str(row["environment"]),
            str(row["variant"]),
            f"{row['impressions']:,}",
            "-" if row["users_today"] is None else f"{row['users_today']:,}",
        )
    console().print(table)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


def register(group: click.Group) -> None:
    group.add_command(impressions)
