"""Where audit events go: a JSONL file sink and an HTTP sink, configured in
``FLEET_CONFIG_DIR/audit-sinks.yaml``.

A sink confirms a batch by returning from :meth:`deliver`; only then does the shipper move
its cursors. The file sink writes at the committed offset of its current segment and
``fsync``\\ s. It never removes a shipped record: on start (:meth:`FileSink.recover`) the
records found past the committed position (a crash between the write and the commit; a sink
renamed, a database new or restored, so that no state or an old one is known) are verified
to continue the chain and *adopted*: the position moves past them and the shipper's cursors
move past their events, so nothing is shipped twice. The one cut ever made is a partial last
line (a crash in the middle of a write). Records that do not continue the chain make the
sink refuse to start (:class:`SinkUnusable`), naming the file and what to do. The HTTP sink
is at-least-once (a crash between delivery and commit sends the batch again, with the same
``event_id``\\ s).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.errors import FleetError
from workers.jobs import TransientError
from workers.yamlio import load_yaml


class SinkUnavailable(TransientError):
    """The sink did not confirm (down, timing out, 5xx, 408, 429): try again later."""


class SinkRefused(FleetError):
    """A permanent refusal (4xx): the sink is stopped until an operator resumes it."""


class SinkConfigError(FleetError):
    pass


class SinkUnusable(FleetError):
    """The sink's files do not continue its chain (or are behind its committed state): it
    refuses to start rather than write beside, or over, an archive it cannot vouch for."""


@dataclass(frozen=True)
class Position:
    """Where a sink's chain stands: its head, and for a file sink the committed segment and
    offset. ``shipped``: for records adopted on recovery, the highest id of each source."""

    seq: int
    head: str
    segment: str | None = None
    offset: int = 0
    shipped: Mapping[str, int] = field(default_factory=dict)
    adopted: int = 0


class _FileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    type: Literal["file"]
    path: str
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)


class _HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    type: Literal["http"]
    url: str = Field(pattern=r"^https?://")
    format: Literal["jsonl", "loki"] = "jsonl"
    timeout_seconds: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=20)
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    backoff_cap_seconds: float = Field(default=30.0, gt=0)


class _SinksFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sensitive_keys: list[str] | None = None
    sinks: list[_FileConfig | _HttpConfig] = Field(min_length=1)


@dataclass(frozen=True)
class SinksConfig:
    sinks: list[_FileConfig | _HttpConfig]
    sensitive_keys: list[str] | None


def load_sinks(config_dir: Path) -> SinksConfig:
    path = config_dir / "audit-sinks.yaml"
    try:
        document = load_yaml(path.read_text())
    except OSError:
        raise SinkConfigError(f"{path}: cannot be read (no audit sinks configured)") from None
    except Exception as exc:
        raise SinkConfigError(f"{path}: not valid YAML ({type(exc).__name__})") from None
    try:
        parsed = _SinksFile.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise SinkConfigError(f"{path}: {where}: {error['msg']}") from None
    names = [sink.name for sink in parsed.sinks]
    if len(set(names)) != len(names):
        raise SinkConfigError(f"{path}: sink names must be unique")
    return SinksConfig(parsed.sinks, parsed.sensitive_keys)


class AuditSink(Protocol):
    name: str

    def recover(self, position: Position) -> Position:
        """The true end of the sink's chain, from the committed ``position`` (file sinks:
        adopting what was written past it; see the module docstring)."""

    def deliver(
        self,
        data: bytes,
        segment: str | None,
        offset: int,
        now: datetime,
    ) -> tuple[str | None, int]:
        """Write and confirm; returns the new committed position."""


_SEGMENT = re.compile(r"^audit-(\d{8})-(\d{6})\.jsonl$")


class FileSink:
    def __init__(self, name: str, directory: Path, max_bytes: int) -> None:
        self.name = name
        self.directory = directory
        self.max_bytes = max_bytes

    def _segments(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("audit-*.jsonl") if _SEGMENT.match(p.name))

    def recover(self, position: Position) -> Position:
        """Adopt every complete record written past ``position``, after checking that it
        continues the chain; cut only a partial last line. Raises SinkUnusable."""
        self.directory.mkdir(parents=True, exist_ok=True)
        segments = [p.name for p in self._segments()]
        where = f"audit sink {self.name} ({self.directory})"
        if position.segment is None:
            start, offset = 0, 0  # no state: the files, if any, are the chain from its start
        elif position.segment not in segments:
            raise SinkUnusable(
                f"{where}: the committed segment {position.segment} is missing: restore it, "
                "or move the directory away to start a new archive"
            )
        else:
            start, offset = segments.index(position.segment), position.offset
            size = (self.directory / position.segment).stat().st_size
            if size < offset:
                raise SinkUnusable(
                    f"{where}: {position.segment} holds {size} bytes, fewer than the "
                    f"{offset} committed: records were removed; restore it from a copy"
                )
        found = _Walk(position.seq, position.head)
        for index in range(start, len(segments)):
            name = segments[index]
            path = self.directory / name
            partial = found.read(
                path, offset if index == start else 0, last=index == len(segments) - 1
            )
            if found.problem:
                raise SinkUnusable(
                    f"{where}: {found.problem}; the records there do not continue this sink's "
                    "chain: verify them with `fleet audit verify`, then move them away"
                )
            if partial is not None:
                with open(path, "r+b") as handle:  # a crash mid-write: the only cut
                    handle.truncate(partial)
                    os.fsync(handle.fileno())
        if not found.adopted:
            return position
        return replace(
            position,
            seq=found.seq,
            head=found.head,
            segment=found.segment,
            offset=found.offset,
            shipped=found.shipped,
            adopted=found.adopted,
        )

    def _next_segment(self, now: datetime) -> str:
        """Numbered across days, so that name order is chain order."""
        last = self._segments()
        match = _SEGMENT.match(last[-1].name) if last else None
        number = int(match.group(2)) + 1 if match else 1
        return f"audit-{now:%Y%m%d}-{number:06d}.jsonl"

    def deliver(
        self,
        data: bytes,
        segment: str | None,
        offset: int,
        now: datetime,
    ) -> tuple[str | None, int]:
        day_changed = segment is not None and not segment.startswith(f"audit-{now:%Y%m%d}-")
        too_big = segment is not None and offset > 0 and offset + len(data) > self.max_bytes
        if segment is None or day_changed or too_big:
            segment, offset = self._next_segment(now), 0
            (self.directory / segment).touch()
            _fsync_directory(self.directory)
        with open(self.directory / segment, "r+b") as handle:
            handle.seek(offset)
            handle.write(data)
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
        return segment, offset + len(data)


class _Walk:
    """Reads records from a position on, checking that each continues the chain."""

    def __init__(self, seq: int, head: str) -> None:
        self.seq, self.head = seq, head
        self.segment: str | None = None
        self.offset = 0
        self.shipped: dict[str, int] = {}
        self.adopted = 0
        self.problem: str | None = None

    def read(self, path: Path, offset: int, last: bool) -> int | None:
        """Walk ``path`` from ``offset``; returns the offset of a partial last line to cut
        (only in the last segment), sets ``problem`` at the first record that breaks."""
        from tasks.audit.events import line_hash

        with open(path, "rb") as handle:
            handle.seek(offset)
            position = offset
            for line in handle:
                if not line.endswith(b"\n"):
                    if last:
                        return position
                    self.problem = f"{path.name}: a partial record at byte {position}"
                    return None
                label = f"{path.name} at byte {position}"
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.problem = f"{label}: not a JSON record"
                    return None
                stated = line_hash(line)
                if stated is None or event.get("hash") != stated:
                    self.problem = f"{label}: its hash does not match"
                    return None
                if event.get("seq") != self.seq + 1 or event.get("prev_hash") != self.head:
                    self.problem = f"{label}: does not follow seq {self.seq}"
                    return None
                self.seq, self.head = int(event["seq"]), str(event["hash"])
                position += len(line)
                self.segment, self.offset = path.name, position
                self.adopted += 1
                source, _, number = str(event.get("event_id", "")).rpartition(":")
                if event.get("source") != "checkpoint" and number.isdigit():
                    self.shipped[source] = max(self.shipped.get(source, 0), int(number))
        return None


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class HttpSink:
    def __init__(
        self,
        config: _HttpConfig,
        headers: Mapping[str, str],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = config.name
        self.config = config
        self.sleep = sleep
        self.client = httpx.Client(timeout=config.timeout_seconds, headers=dict(headers))

    def recover(self, position: Position) -> Position:
        return position  # a receiver keeps its own records (and drops repeats by event_id)

    def _body(self, data: bytes) -> tuple[bytes, str]:
        if self.config.format == "jsonl":
            return data, "application/x-ndjson"
        streams: dict[str, list[list[str]]] = {}
        now_ns = str(time.time_ns())
        for line in data.split(b"\n")[:-1]:
            event = orjson.loads(line)
            stamp = event.get("timestamp")
            nanos = now_ns
            if isinstance(stamp, str):
                with contextlib.suppress(ValueError):
                    nanos = str(int(datetime.fromisoformat(stamp).timestamp() * 1e9))
            streams.setdefault(str(event.get("source")), []).append([nanos, line.decode()])
        body = {
            "streams": [
                {
                    "stream": {"job": "config-fleet-audit", "sink": self.name, "source": source},
                    "values": values,
                }
                for source, values in streams.items()
            ]
        }
        return orjson.dumps(body), "application/json"

    def deliver(
        self,
        data: bytes,
        segment: str | None,
        offset: int,
        now: datetime,
    ) -> tuple[str | None, int]:
        body, content_type = self._body(data)
        attempt, last = 0, "no attempt"
        while attempt < self.config.max_attempts:
            if attempt:
                ceiling = min(
                    self.config.backoff_cap_seconds,
                    self.config.backoff_base_seconds * 2 ** (attempt - 1),
                )
                self.sleep(random.uniform(0, ceiling))
            attempt += 1
            try:
                response = self.client.post(
                    self.config.url, content=body, headers={"Content-Type": content_type}
                )
            except httpx.TimeoutException:
                last = "timeout"
                continue
            except httpx.TransportError as exc:
                last = f"unreachable ({type(exc).__name__})"
                continue
            if 200 <= response.status_code < 300:
                return segment, offset
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                raise SinkRefused(
                    f"audit sink {self.name}: refused with HTTP {response.status_code}"
                )
            last = f"HTTP {response.status_code}"
        raise SinkUnavailable(f"audit sink {self.name}: {last} after {attempt} attempts")
