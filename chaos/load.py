"""The load of a chaos run: impressions pushed as the platform's services push them, and
audit rows written by concurrent transactions, some rolled back. Each producer keeps its
own tally of what it did, which the checks compare with what the fleet did."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import redis

from workers.backlog import IMPRESSIONS

FLAGS = ("new_ui_enabled", "model_configuration", "checkout_v2")
VARIANTS = {"new_ui_enabled": ("on", "off"), "model_configuration": ("standard", "premium")}
ENVIRONMENTS = ("production", "staging")
MALFORMED = (
    b"{not json",
    b'{"flag_key": "new_ui_enabled"}',
    b'{"flag_key": "", "environment": "x", "variant": "on", "timestamp": "2026-01-01T00:00:00"}',
)
# Minute key of the counts: (flag, environment, variant, minute as naive UTC ISO).
CountKey = tuple[str, str, str, str]


class ImpressionProducer(threading.Thread):
    """``rate`` impressions a second in the platform's format (``LPUSH`` of JSON), about
    1 % malformed and 0.5 % stamped ten minutes ahead (dead-lettered ``future_timestamp``).
    Redis faults are injected while it holds no command in flight: the injector takes
    :attr:`gate` for the fault's length, so the tally never has to guess whether a push
    whose answer was lost happened."""

    def __init__(self, url: str, rate: int, seed: int) -> None:
        super().__init__(name="chaos-impressions", daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=10)
        self.rate = rate
        self.rng = random.Random(seed)
        self.gate = threading.Lock()
        self.stopping = threading.Event()
        self.counts: Counter[CountKey] = Counter()
        self.pushed = 0
        self.malformed = 0
        self.future = 0
        self.errors: list[str] = []

    def _one(self, now: datetime) -> tuple[bytes, CountKey | None, str]:
        roll = self.rng.random()
        if roll < 0.01:
            return self.rng.choice(MALFORMED), None, "malformed"
        flag = self.rng.choice(FLAGS)
        variant = self.rng.choice(VARIANTS.get(flag, ("control", "treatment")))
        environment = self.rng.choice(ENVIRONMENTS)
        at = now + timedelta(minutes=10) if roll < 0.015 else now
        stamp = at.replace(tzinfo=None)
        user = f"user-{self.rng.randrange(5000)}"
        tenant = f"tenant-{self.rng.randrange(20)}"
        record = {
            "flag_key": flag,
            "environment": environment,
            "variant": variant,
            "user_id": user,
            "tenant_id": tenant,
            "timestamp": stamp.isoformat(),
            "context": {"user_id": user, "tenant_id": tenant},
        }
        if roll < 0.015:
            return orjson.dumps(record), None, "future"
        minute = stamp.replace(second=0, microsecond=0).isoformat()
        return orjson.dumps(record), (flag, environment, variant, minute), "good"

    def run(self) -> None:
        tick = 0.05
        per_tick = max(1, int(self.rate * tick))
        next_at = time.monotonic()
        while not self.stopping.is_set():
            now = datetime.now(UTC)
            made = [self._one(now) for _ in range(per_tick)]
            with self.gate:
                try:
                    self.client.lpush(IMPRESSIONS, *(body for body, _, _ in made))
                except redis.RedisError as exc:  # not pushed: a fault outside the gate
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    time.sleep(0.2)
                    continue
            for _, key, kind in made:
                self.pushed += 1
                if key is not None:
                    self.counts[key] += 1
                elif kind == "malformed":
                    self.malformed += 1
                else:
                    self.future += 1
            next_at += tick
            time.sleep(max(0.0, next_at - time.monotonic()))

    @property
    def good(self) -> int:
        return sum(self.counts.values())


class AuditProducer(threading.Thread):
    """Transactions on the platform's audit tables, each of 1-3 rows, about one in six
    rolled back. Its connection is named ``chaos-producer``: PostgreSQL faults spare it,
    so every commit's outcome is known."""

    def __init__(self, url: str, seed: int, index: int) -> None:
        super().__init__(name=f"chaos-audit-{index}", daemon=True)
        self.url = url
        self.rng = random.Random(seed * 100 + index)
        self.index = index
        self.stopping = threading.Event()
        self.committed: dict[str, list[int]] = {
            "configuration_audit_log": [],
            "feature_flag_audit_log": [],
        }
        self.rolled_back = 0
        self.errors: list[str] = []

    def _insert(self, cursor: Any, table: str, n: int, mark: str) -> list[int]:
        now = datetime.now(UTC)
        ids = []
        for _ in range(n):
            if table == "configuration_audit_log":
                cursor.execute(
                    "INSERT INTO configuration_audit_log (action, key, environment, scope,"
                    " user_id, timestamp, sensitive, metadata) VALUES ('SET', %s, 'production',"
                    " 'environment', %s, %s, false, '{}') RETURNING id",
                    (f"chaos.key{self.rng.randrange(50)}", mark, now),
                )
            else:
                cursor.execute(
                    "INSERT INTO feature_flag_audit_log (flag_key, action, user_id, timestamp,"
                    " metadata) VALUES (%s, 'UPDATE', %s, %s, '{}') RETURNING id",
                    (self.rng.choice(FLAGS), mark, now),
                )
            ids.append(int(cursor.fetchone()[0]))
        return ids

    def run(self) -> None:
        try:
            connection = psycopg.connect(self.url, application_name="chaos-producer")
        except psycopg.Error as exc:
            self.errors.append(f"connect: {exc}")
            return
        with connection:
            while not self.stopping.is_set():
                table = self.rng.choice(tuple(self.committed))
                rollback = self.rng.random() < 1 / 6
                mark = "chaos-rolledback" if rollback else f"chaos-{self.index}"
                try:
                    with connection.cursor() as cursor:
                        ids = self._insert(cursor, table, self.rng.randint(1, 3), mark)
                    # Hold the transaction a moment: shippers meet ids not yet committed.
                    time.sleep(self.rng.uniform(0, 0.03))
                    if rollback:
                        connection.rollback()
                        self.rolled_back += len(ids)
                    else:
                        connection.commit()
                        self.committed[table].extend(ids)
                except psycopg.Error as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                time.sleep(self.rng.uniform(0.01, 0.05))
