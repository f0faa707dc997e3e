"""Is the platform still counting impressions itself?

The platform's own ``track_flag_impression`` runs ``UPDATE feature_flags SET
impression_count = impression_count + 1`` per evaluation. The fleet adds the same
impressions to ``impression_count`` when it commits their counts, so with both on, the
column grows twice as fast as the fleet's counts. ``fleet impressions report`` samples, per
flag, ``impression_count`` and the fleet's own total (minute and hourly rows) in one
statement, keeps the sample in Redis, and on the next report compares how much each grew.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import redis
from sqlalchemy import Connection, func, select

from workers.db.models import FeatureFlag, FlagImpressionCount, FlagImpressionHourly

SAMPLES = "fleet:impressions:count-samples"
# A sample younger than this is kept, not compared: too little happened in between.
MIN_SECONDS = 60
# impression_count may grow by this much more than the fleet counted before it is reported
# (impressions being drained in the moment of the sample): 1%, and at least 10.
SLACK_SHARE, SLACK_FLOOR = 0.01, 10


@dataclass(frozen=True)
class Doubling:
    flag_key: str
    environment: str
    impression_count_grew: int
    fleet_counted: int
    seconds: float

    @property
    def message(self) -> str:
        return (
            f"{self.flag_key} ({self.environment}): impression_count grew by "
            f"{self.impression_count_grew:,} in {self.seconds:,.0f} s while the fleet counted "
            f"{self.fleet_counted:,}; the platform seems to count impressions too (switch off "
            "its per-evaluation UPDATE of feature_flags.impression_count)"
        )


def _totals(connection: Connection) -> dict[tuple[str, str], tuple[int, int]]:
    """Per flag: (impression_count, the fleet's all-time count), from one snapshot."""

    def fleet_total(table: type[FlagImpressionCount] | type[FlagImpressionHourly]) -> Any:
        return (
            select(func.coalesce(func.sum(table.count), 0))
            .where(table.flag_key == FeatureFlag.key, table.environment == FeatureFlag.environment)
            .scalar_subquery()
        )

    statement = select(
        FeatureFlag.key,
        FeatureFlag.environment,
        FeatureFlag.impression_count,
        fleet_total(FlagImpressionCount),
        fleet_total(FlagImpressionHourly),
    )
    return {
        (key, env): (int(count or 0), int(minutes) + int(hours))
        for key, env, count, minutes, hours in connection.execute(statement)
    }


def check(connection: Connection, client: redis.Redis, now: datetime) -> list[Doubling]:
    """Compare with the last sample (when at least :data:`MIN_SECONDS` old) and keep a new
    one. Returns the flags whose impression_count outgrew the fleet's counts."""
    totals = _totals(connection)
    stored = client.hgetall(SAMPLES)
    found: list[Doubling] = []
    fresh: dict[str, bytes] = {}
    moment = now.timestamp()
    for (key, env), (count, fleet) in totals.items():
        field = f"{key}\x1f{env}"
        raw = stored.get(field.encode())
        previous = orjson.loads(raw) if raw else None
        if previous is not None and moment - previous["at"] < MIN_SECONDS:
            continue  # too recent: keep it, compare next time
        if previous is not None:
            grew, counted = count - previous["count"], fleet - previous["fleet"]
            if counted >= 0 and grew > counted + max(SLACK_FLOOR, SLACK_SHARE * counted):
                found.append(Doubling(key, env, grew, counted, moment - previous["at"]))
        fresh[field] = orjson.dumps({"count": count, "fleet": fleet, "at": moment})
    if fresh:
        client.hset(SAMPLES, mapping=fresh)  # type: ignore[arg-type]
    return found
