"""A real Alertmanager (Debian's ``prometheus-alertmanager``), started by tests on loopback,
and a webhook receiver recording the alerts it sends."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import yaml

from tests.helpers import free_port, installed
from tests.prometheus_server import serving

Alert = dict[str, Any]


class WebhookReceiver:
    """Records every alert of the Alertmanager webhook (v4) payloads POSTed to :attr:`url`.

    Each alert is kept as sent (status, labels, annotations, startsAt, endsAt, ...), in the
    order received; :meth:`wait_for` blocks on a condition notified per payload.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received = threading.Condition(self._lock)
        self._alerts: list[Alert] = []
        self._errors: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/alerts"

    def start(self) -> WebhookReceiver:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-receiver", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def alerts(self) -> list[Alert]:
        with self._lock:
            return list(self._alerts)

    def wait_for(self, predicate: Callable[[Alert], bool], timeout: float, what: str) -> Alert:
        """The first received alert satisfying ``predicate``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._received:
            checked = 0  # alerts already tested: each is tested once
            while True:
                for alert in self._alerts[checked:]:
                    if predicate(alert):
                        return alert
                checked = len(self._alerts)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._received.wait(remaining)
            summary = self._summary()
        pytest.fail(
            f"timed out after {timeout}s waiting for {what}; received: {summary}", pytrace=False
        )

    def _summary(self) -> str:
        seen = [
            f"{alert.get('labels', {}).get('alertname')}/{alert.get('status')}"
            for alert in self._alerts
        ]
        text = ", ".join(seen[-20:]) or "nothing"
        if len(seen) > 20:
            text = f"{len(seen)} alerts, the last 20: {text}"
        if self._errors:
            text += f"; bad payloads: {self._errors[-3:]}"
        return text

    def _record(self, body: bytes) -> bool:
        try:
            payload = json.loads(body)
            alerts = payload["alerts"]
            if not isinstance(alerts, list):
                raise TypeError(f"alerts is a {type(alerts).__name__}")
        except (ValueError, KeyError, TypeError) as exc:
            with self._received:
                self._errors.append(f"{type(exc).__name__}: {exc}: {body[:200]!r}")
                self._received.notify_all()
            return False
        with self._received:
            self._alerts.extend(alerts)
            self._received.notify_all()
        return True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200 if receiver._record(body) else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per notification on stderr is noise in test output

        return Handler


def alertmanager_binary() -> str:
    return installed("prometheus-alertmanager", "prometheus-alertmanager")


def alertmanager_config(webhook_url: str) -> dict[str, Any]:
    """Every alert to ``webhook_url`` at once, each in its own group, resolutions too."""
    return {
        "route": {
            "receiver": "webhook",
            "group_by": ["..."],  # every label set is its own group: no batching to wait on
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "webhook",
                "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
            }
        ],
    }


@contextmanager
def alertmanager(webhook_url: str) -> Iterator[str]:
    """An Alertmanager sending every alert to ``webhook_url``; yields its URL."""
    binary = alertmanager_binary()
    directory = Path(tempfile.mkdtemp(prefix="fleet-am-"))
    try:
        config = directory / "alertmanager.yml"
        config.write_text(yaml.safe_dump(alertmanager_config(webhook_url), sort_keys=False))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            # No cluster: no gossip port on 0.0.0.0:9094 (taken by a second instance or
            # another test) and no wait for peers to settle before notifying.
            "--cluster.listen-address=",
            "--log.level=warn",
        ]
        with serving(command, url, directory / "alertmanager.log", "alertmanager"):
            yield url
    finally:
        shutil.rmtree(directory, ignore_errors=True)
