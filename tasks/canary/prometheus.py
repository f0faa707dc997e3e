"""Reading canary and baseline series from Prometheus's HTTP API (``query_range``)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import httpx

from workers.errors import FleetError
from workers.jobs import TransientError


class PrometheusUnavailable(TransientError):
    """Prometheus could not be asked (down, timing out, 5xx) after the retries."""


class QueryError(FleetError):
    """Prometheus refused the query itself (bad PromQL, 4xx): retrying will not help."""


class MetricsSource(Protocol):
    def range_samples(self, query: str, start: datetime, end: datetime, step: float) -> list[float]:
        """Every value of every series the query returns over the range."""


class PrometheusSource:
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._url = url.rstrip("/") + "/api/v1/query_range"
        self._client = httpx.Client(timeout=timeout)
        self._attempts = attempts
        self._backoff = backoff
        self._sleep = sleep

    def range_samples(self, query: str, start: datetime, end: datetime, step: float) -> list[float]:
        params = {
            "query": query,
            "start": f"{start.timestamp():.3f}",
            "end": f"{end.timestamp():.3f}",
            "step": f"{step:g}",
        }
        last = "no attempt"
        for attempt in range(self._attempts):
            if attempt:
                self._sleep(random.uniform(0, self._backoff * 2**attempt))
            try:
                response = self._client.get(self._url, params=params)
            except httpx.HTTPError as exc:
                last = type(exc).__name__
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                continue
            body = response.json()
            if response.status_code >= 400 or body.get("status") != "success":
                raise QueryError(
                    f"Prometheus refused {query!r}: {body.get('error', response.status_code)}"
                )
            return [
                float(value) for series in body["data"]["result"] for _, value in series["values"]
            ]
        raise PrometheusUnavailable(
            f"Prometheus at {self._url}: {last} after {self._attempts} attempts"
        )

    def close(self) -> None:
        self._client.close()
