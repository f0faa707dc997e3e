"""A stand-in for HashiCorp Vault's HTTP API, kept for the benchmark only.

The fleet's Vault code is tested against a real Vault-API server, OpenBao
(tests/openbao_server.py): this double shares the code's assumptions and once hid a
``deletion_time`` bug, so no test of behaviour uses it any more. It stays for what a real
server cannot be made to do: ``bench/secrets.py`` gives every request a fixed latency
(``latency``), so that its figures do not depend on this machine's load. Its policy reader
(:func:`load_policy`, :func:`allowed`) checks the shipped HCL file statically in
tests/unit/test_deploy_files.py; OpenBao enforces the same file in the integration tests.

It follows Vault's documented API for what the fleet uses, status codes and bodies
included:

- ``GET /v1/sys/health``: 200, or 503 with ``"sealed": true`` when sealed;
- ``GET /v1/auth/token/lookup-self``; ``POST /v1/auth/approle/login``;
- KV v2 under a mount (default ``secret``): ``GET|POST|PUT /data/:path`` (``version``
  query; ``options.cas``: 400 "check-and-set parameter did not match the current version"),
  ``GET|POST|DELETE /metadata/:path``, ``LIST /metadata/:path`` (404 ``{"errors": []}`` for
  nothing there);
- 403 ``{"errors": ["permission denied"]}`` for a missing or wrong token, 503
  ``{"errors": ["Vault is sealed"]}`` for everything but health while sealed, the
  ``X-Vault-Namespace`` header honoured.

Failure switches (``sealed``, ``fail_writes``, ``latency``) let tests make it misbehave.

With a ``policy`` (see :func:`load_policy`), the token is held to it as Vault's ACLs would:
each request needs the capability its method implies on its path (``read`` for GET, ``list``
for LIST, ``create`` or ``update`` for POST/PUT as the secret exists or not, ``delete`` for
DELETE); an exact path rule beats a glob, and the longest matching glob wins. Without one,
the token may do anything (a root token).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


Policy = Mapping[str, frozenset[str]]


def load_policy(path: Path) -> dict[str, frozenset[str]]:
    """A Vault policy file (HCL): {path rule: capabilities}."""
    import hcl2

    document = hcl2.loads(path.read_text())
    rules: dict[str, frozenset[str]] = {}
    for block in document.get("path", []):
        for rule, body in block.items():
            name = rule.strip('"')
            if "+" in name or ("*" in name and not name.endswith("*")):
                raise ValueError(f"{path}: {name}: the double knows only trailing '*' globs")
            rules[name] = frozenset(c.strip('"') for c in body["capabilities"])
    return rules


def allowed(policy: Policy, path: str, capability: str) -> bool:
    """Whether ``policy`` grants ``capability`` on ``path`` (Vault's matching, no '+')."""
    granted = policy.get(path)
    if granted is None:
        globs = [r for r in policy if r.endswith("*") and path.startswith(r[:-1])]
        if not globs:
            return False
        granted = policy[max(globs, key=len)]
    return "deny" not in granted and capability in granted


class VaultState:
    def __init__(
        self,
        token: str,
        mount: str = "secret",
        namespace: str | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.token = token
        self.mount = mount
        self.namespace = namespace
        self.policy = policy
        self.denied: list[str] = []  # "CAPABILITY path" of every request the policy refused
        self.sealed = False
        self.fail_writes = False
        self.latency = 0.0
        self.approles: dict[str, str] = {}
        self.lock = threading.Lock()
        # path -> {"versions": {n: {"data", "created_time", "deletion_time", "destroyed"}},
        #          "current_version", "custom_metadata", "created_time", "updated_time"}
        self.secrets: dict[str, dict[str, Any]] = {}
        self.requests = 0

    def put(
        self,
        path: str,
        data: dict[str, str],
        created: str | None = None,
        custom: dict[str, str] | None = None,
    ) -> int:
        """Seed a version directly (tests can backdate it)."""
        with self.lock:
            entry = self.secrets.setdefault(
                path,
                {
                    "versions": {},
                    "current_version": 0,
                    "custom_metadata": {},
                    "created_time": _now(),
                    "updated_time": _now(),
                },
            )
            version = entry["current_version"] + 1
            entry["versions"][version] = {
                "data": dict(data),
                "created_time": created or _now(),
                "deletion_time": "",
                "destroyed": False,
            }
            entry["current_version"] = version
            if custom is not None:
                entry["custom_metadata"] = dict(custom)
            return version


def _envelope(data: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": None,
        **extra,
    }


class _Handler(BaseHTTPRequestHandler):
    state: VaultState
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes

    def log_message(self, *_args: Any) -> None:  # quiet
        return

    def _send(self, status: int, body: Any = None) -> None:
        payload = b"" if body is None else orjson.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> dict[str, Any]:
        return self._payload

    def _read_payload(self) -> None:
        """Read the request body before answering (a refused request included), so that a
        kept-alive connection's next request is not parsed from its leftovers."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self._payload: dict[str, Any] = orjson.loads(raw) if raw else {}

    def _route(self, method: str) -> None:
        self._read_payload()
        state = self.state
        state.requests += 1
        if state.latency:
            time.sleep(state.latency)
        url = urlsplit(self.path)
        path = url.path.removeprefix("/v1/")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if path == "sys/health":
            body = {
                "initialized": True,
                "sealed": state.sealed,
                "standby": False,
                "performance_standby": False,
                "replication_performance_mode": "disabled",
                "replication_dr_mode": "disabled",
                "server_time_utc": int(time.time()),
                "version": "1.15.6",
                "cluster_name": "vault-double",
                "cluster_id": "double",
            }
            self._send(503 if state.sealed else 200, body)
            return
        if not self._admitted(path, method):
            return
        if path == "auth/token/lookup-self":
            self._send(200, _envelope({"id": state.token, "policies": ["fleet"], "ttl": 0}))
            return
        mount = state.mount + "/"
        if not path.startswith(mount):
            self._send(404, {"errors": [f"no handler for route '{path}'"]})
            return
        rest = path[len(mount) :]
        kind, _, secret = rest.partition("/")
        if method == "GET" and query.get("list") == "true":
            method = "LIST"
        if not self._permitted(path, method, secret):
            return
        handler = getattr(self, f"_{kind}_{method.lower()}", None)
        if handler is None:
            self._send(405, {"errors": ["unsupported operation"]})
            return
        handler(secret, query)

    def _admitted(self, path: str, method: str) -> bool:
        """Sealed, AppRole login, token and namespace checks; False when answered here."""
        state = self.state
        if state.sealed:
            self._send(503, {"errors": ["Vault is sealed"]})
            return False
        if path == "auth/approle/login" and method in ("POST", "PUT"):
            self._approle(self._body())
            return False
        token_ok = self.headers.get("X-Vault-Token") == state.token
        namespace_ok = state.namespace is None or (
            self.headers.get("X-Vault-Namespace") == state.namespace
        )
        if not (token_ok and namespace_ok):
            self._send(403, {"errors": ["permission denied"]})
            return False
        return True

    def _permitted(self, path: str, method: str, secret: str) -> bool:
        """The token's policy, if any; False when refused (403 sent)."""
        policy = self.state.policy
        if policy is None:
            return True
        if method == "LIST":
            capability = "list"
            path = path if path.endswith("/") else path + "/"  # as Vault routes a LIST
        elif method == "GET":
            capability = "read"
        elif method == "DELETE":
            capability = "delete"
        else:
            capability = "update" if secret in self.state.secrets else "create"
        if allowed(policy, path, capability):
            return True
        self.state.denied.append(f"{capability} {path}")
        self._send(403, {"errors": ["1 error occurred:\n\t* permission denied\n\n"]})
        return False

    def _approle(self, body: dict[str, Any]) -> None:
        if self.state.approles.get(body.get("role_id", "")) != body.get("secret_id"):
            self._send(400, {"errors": ["invalid role or secret ID"]})
            return
        self._send(
            200,
            _envelope(
                None,
                auth={
                    "client_token": self.state.token,
                    "policies": ["fleet"],
                    "lease_duration": 3600,
                    "renewable": True,
                },
            ),
        )

    # KV v2 ----------------------------------------------------------------------------

    def _data_get(self, secret: str, query: dict[str, str]) -> None:
        entry = self.state.secrets.get(secret)
        if entry is None:
            self._send(404, {"errors": []})
            return
        number = int(query.get("version") or 0) or entry["current_version"]
        version = entry["versions"].get(number)
        if version is None:
            self._send(404, {"errors": []})
            return
        metadata = {
            "created_time": version["created_time"],
            "custom_metadata": entry["custom_metadata"] or None,
            "deletion_time": version["deletion_time"],
            "destroyed": version["destroyed"],
            "version": number,
        }
        if version["deletion_time"] or version["destroyed"]:
            self._send(
                404,
                _envelope(
                    {"data": None, "metadata": metadata}, warnings=["version has been deleted"]
                ),
            )
            return
        self._send(200, _envelope({"data": version["data"], "metadata": metadata}))

    def _data_post(self, secret: str, _query: dict[str, str]) -> None:
        body = self._body()
        if self.state.fail_writes:
            self._send(500, {"errors": ["internal error"]})
            return
        with self.state.lock:
            entry = self.state.secrets.get(secret)
            current = entry["current_version"] if entry else 0
            cas = (body.get("options") or {}).get("cas")
            if cas is not None and int(cas) != current:
                self._send(
                    400, {"errors": ["check-and-set parameter did not match the current version"]}
                )
                return
        version = self.state.put(secret, body.get("data") or {})
        created = self.state.secrets[secret]["versions"][version]["created_time"]
        self._send(
            200,
            _envelope(
                {
                    "created_time": created,
                    "custom_metadata": None,
                    "deletion_time": "",
                    "destroyed": False,
                    "version": version,
                }
            ),
        )

    _data_put = _data_post

    def _metadata_get(self, secret: str, _query: dict[str, str]) -> None:
        entry = self.state.secrets.get(secret)
        if entry is None:
            self._send(404, {"errors": []})
            return
        versions = {
            str(n): {
                "created_time": v["created_time"],
                "deletion_time": v["deletion_time"],
                "destroyed": v["destroyed"],
            }
            for n, v in entry["versions"].items()
        }
        self._send(
            200,
            _envelope(
                {
                    "cas_required": False,
                    "created_time": entry["created_time"],
                    "current_version": entry["current_version"],
                    "custom_metadata": entry["custom_metadata"] or None,
                    "delete_version_after": "0s",
                    "max_versions": 0,
                    "oldest_version": min(entry["versions"]),
                    "updated_time": entry["updated_time"],
                    "versions": versions,
                }
            ),
        )

    def _metadata_post(self, secret: str, _query: dict[str, str]) -> None:
        body = self._body()
        with self.state.lock:
            entry = self.state.secrets.setdefault(
                secret,
                {
                    "versions": {},
                    "current_version": 0,
                    "custom_metadata": {},
                    "created_time": _now(),
                    "updated_time": _now(),
                },
            )
            if "custom_metadata" in body:
                entry["custom_metadata"] = dict(body["custom_metadata"] or {})
            entry["updated_time"] = _now()
        self._send(204)

    _metadata_put = _metadata_post

    def _metadata_delete(self, secret: str, _query: dict[str, str]) -> None:
        with self.state.lock:
            self.state.secrets.pop(secret, None)
        self._send(204)

    def _metadata_list(self, secret: str, _query: dict[str, str]) -> None:
        prefix = secret.rstrip("/") + "/" if secret.strip("/") else ""
        keys: set[str] = set()
        for name in self.state.secrets:
            if name.startswith(prefix):
                head, slash, _ = name[len(prefix) :].partition("/")
                keys.add(head + slash)
        if not keys:
            self._send(404, {"errors": []})
            return
        self._send(200, _envelope({"keys": sorted(keys)}))

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_LIST(self) -> None:
        self._route("LIST")


@contextmanager
def vault_double(token: str = "hvs.test-token", **options: Any) -> Iterator[tuple[str, VaultState]]:
    """A running double on a free loopback port: yields (address, state)."""
    state = VaultState(token, **options)
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    """``python -m tests.vault_double --port P [--seed N] [--latency S]``: serve until killed
    (benchmarks run it in its own process, so that it does not share the client's GIL)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default="hvs.bench")
    parser.add_argument("--seed", type=int, default=0, help="secrets under platform/svc/")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    options = parser.parse_args()
    state = VaultState(options.token)
    for i in range(options.seed):
        state.put(f"platform/svc/s{i}", {"password": "x"}, custom={"rotation_interval_days": "30"})
    state.latency = options.latency
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", options.port), handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
