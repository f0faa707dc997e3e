"""``fleet impressions``: what the counts say, and dead letters sent back after a fix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click

from workers.cli.common import console, emit_json, json_option, start_runtime

# Move up to ARGV[1] dead letters (oldest first) back to the platform's list as the
# producers wrote them; with ARGV[2] set, only those of that reason. One atomic step per
# call: a letter is either still dead or queued again, never both or neither.
_REPLAY = """
local moved, kept, seen = 0, {}, 0
local total = redis.call('LLEN', KEYS[1])
while seen < total and moved < tonumber(ARGV[1]) do
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  seen = seen + 1
  local ok, letter = pcall(cjson.decode, raw)
  if ok and type(letter) == 'table' and type(letter['payload']) == 'string'
     and (ARGV[2] == '' or letter['reason'] == ARGV[2]) then
    redis.call('LPUSH', KEYS[2], letter['payload'])
    moved = moved + 1
  else
    table.insert(kept, raw)
  end
end
for i = #kept, 1, -1 do redis.call('RPUSH', KEYS[1], kept[i]) end
return moved
"""


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
    from tasks.impressions.queue import DEAD, SOURCE
    from tasks.impressions.records import REASONS

    if reason is not None and reason not in REASONS:
        raise click.BadParameter(
            f"{reason!r} is not one of {', '.join(REASONS)}", param_hint="--reason"
        )
    rt = start_runtime(start_embedded=False)
    script = rt.redis.register_script(_REPLAY)
    moved = int(script(keys=[DEAD, SOURCE], args=[limit, reason or ""]))
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
        emit_json({"hours": hours, "rows": rows})
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


def register(group: click.Group) -> None:
    group.add_command(impressions)
