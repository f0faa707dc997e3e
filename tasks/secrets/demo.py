"""The secrets act of ``fleet demo``: the embedded store seeded with secrets of every
status (versions backdated), and the checks finding them."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, ClassVar

from sqlalchemy import select, update

from tasks.secrets.stores import open_store
from workers.db.models import FleetSecretVersion, SecretRotationStatus
from workers.runtime import Runtime

# path, data, custom metadata, age in days, the status the check must find
SEEDS: list[tuple[str, dict[str, str], dict[str, str], int, str]] = [
    (
        "apis/openai",
        {"api_key": "sk-demo-openai-not-real"},
        {"rotation_interval_days": "90", "owner": "ml-platform"},
        100,
        "overdue",
    ),
    (
        "apis/anthropic",
        {"api_key": "sk-demo-anthropic-not-real"},
        {"rotation_interval_days": "90", "notify_days": "14", "owner": "ml-platform"},
        80,
        "due_soon",
    ),
    (
        "db/chatbot",
        {
            "username": "chatbot",
            "password": "demo-password-not-real",
            "host": "db.internal",
            "port": "5432",
            "database": "chatbot",
        },
        {"rotation_interval_days": "30", "owner": "platform"},
        3,
        "ok",
    ),
    ("svc/legacy-webhook", {"token": "demo-webhook-token"}, {}, 400, "unmanaged"),
    (
        "svc/billing",
        {"token": "demo-billing-token"},
        {"rotation_interval_days": "monthly"},
        10,
        "error",
    ),
]


class SecretsAct:
    name = "secrets"
    expected_successes: ClassVar[dict[str, int]] = {"secrets.check_rotation": 1}
    metrics: ClassVar[tuple[str, ...]] = ("fleet_secrets{", "fleet_secret_store_up")

    def prepare(self, rt: Runtime, now: datetime) -> str:
        store = open_store(rt.settings, rt.engine)
        for path, data, custom, _, _ in SEEDS:
            store.write(path, data)
            if custom:
                store.set_custom_metadata(path, custom)
        with rt.engine.begin() as connection:
            for path, _, _, days, _ in SEEDS:
                connection.execute(
                    update(FleetSecretVersion)
                    .where(FleetSecretVersion.path.endswith("/" + path))
                    .values(created_time=now - timedelta(days=days))
                )
        return f"secrets: {len(SEEDS)} secrets in the embedded (encrypted) store, one per status"

    def tick(self, rt: Runtime, now: datetime, remaining: float) -> str | None:
        return None

    def _seen(self, rt: Runtime) -> dict[str, str]:
        with rt.sessions() as session:
            return {r.path: r.status for r in session.scalars(select(SecretRotationStatus))}

    def status(self, rt: Runtime) -> str:
        seen = self._seen(rt)
        shown = ", ".join(f"{path}={status}" for path, status in sorted(seen.items()))
        return f"secrets: {shown or 'not checked yet'}"

    def problems(self, rt: Runtime) -> list[str]:
        seen = self._seen(rt)
        return [
            f"secrets: {path} is {seen.get(path, 'unchecked')}, expected {want}"
            for path, _, _, _, want in SEEDS
            if seen.get(path) != want
        ]


def act() -> Any:
    return SecretsAct()
