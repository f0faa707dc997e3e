"""A Prometheus of the demo's own: Debian's ``prometheus`` on a loopback port, its data
and log in a directory, scraping and evaluating every second."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml


class PrometheusProcess:
    """``scrape_configs`` as in prometheus.yml; ``rule_files`` loaded as they are."""

    def __init__(
        self,
        binary: str,
        home: Path,
        scrape_configs: list[dict[str, Any]],
        port: int,
        rule_files: Sequence[Path] = (),
    ) -> None:
        home.mkdir(parents=True, exist_ok=True)
        config = home / "prometheus.yml"
        document: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": scrape_configs,
        }
        if rule_files:
            document["rule_files"] = [str(path) for path in rule_files]
        config.write_text(yaml.safe_dump(document, sort_keys=False))
        self.url = f"http://127.0.0.1:{port}"
        self.log = home / "prometheus.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={home / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return False

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's result (raises httpx errors, and ValueError on a refusal)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=5)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"{expression}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts it holds now, pending or firing."""
        response = httpx.get(f"{self.url}/api/v1/alerts", timeout=5)
        response.raise_for_status()
        alerts: list[dict[str, Any]] = response.json()["data"]["alerts"]
        return alerts

    def tail(self, characters: int = 300) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
