"""Structured logging for every fleet process, with secrets scrubbed on the way out.

Log events are lower_snake_case names with fields. Context (job, task id, schedule) is
bound through ``structlog.contextvars`` by the run bookkeeping, so every line a task logs
carries it. The last processor before rendering is :class:`Redactor`: it hides the values
of secret-looking fields and any occurrence of a value registered as secret.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

REDACTED = "***"

SECRET_FIELD = re.compile(
    r"pass(word|wd|phrase)?$|secret|token|api[_-]?key|authori[sz]ation|private[_-]?key"
    r"|credential|cookie|signing[_-]?key|fernet",
    re.IGNORECASE,
)

# Values shorter than this are not registered: masking "a" everywhere helps nobody.
_MIN_SECRET_LENGTH = 4


class Redactor:
    """Scrubs secrets from log events, error texts and anything else about to leave."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        for value in known:
            self.add(value)

    def add(self, value: str | None) -> None:
        """Register a value that must never appear in clear."""
        if not value or len(value) < _MIN_SECRET_LENGTH:
            return
        with self._lock:
            if value in self._known:
                return
            self._known.add(value)
            # Longest first, so a secret that contains another is hidden whole.
            ordered = sorted(self._known, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def text(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(REDACTED, text)

    def value(self, value: Any, field: str | None = None) -> Any:
        if field is not None and SECRET_FIELD.search(field) and value not in (None, "", {}, []):
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, BaseException):
            return self.text(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            event_dict[key] = self.value(event_dict[key], None if key == "event" else key)
        return event_dict


# The process's redactor. Jobs that read a secret register it here before doing anything
# that could log it; the settings' own secrets are registered by configure_logging.
REDACTOR = Redactor()


def register_secret(value: str | None) -> None:
    REDACTOR.add(value)


def redact(text: str) -> str:
    return REDACTOR.text(text)


def _orjson_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _console_wanted(log_format: str | None, stream: TextIO) -> bool:
    if log_format is not None:
        return log_format == "console"
    return bool(getattr(stream, "isatty", lambda: False)())


def configure_logging(
    *,
    level: str = "INFO",
    log_format: str | None = None,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Route structlog and the standard library (Celery, APScheduler) to one renderer."""
    stream = stream or sys.stderr
    for value in secrets:
        register_secret(value)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        REDACTOR,
    ]
    renderer: Any
    if _console_wanted(log_format, stream):
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty libraries stay at WARNING unless the fleet itself is at DEBUG.
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("apscheduler", "kombu", "amqp", "urllib3", "alembic", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet)


def get_logger(name: str | None = None) -> Any:
    return structlog.stdlib.get_logger(name)
