"""The process's connections, built from the settings on first use.

One :class:`Runtime` per process: the CLI (or a test) builds it from the settings and
installs it; tasks and the run bookkeeping reach it with :func:`runtime`. Pools are not
shared across ``fork``: a prefork child drops the parent's connections and opens its own.
"""

from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import unquote

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from workers.db import make_engine, make_session_factory
from workers.embedded import EmbeddedRedis, EmbeddedRedisError
from workers.settings import FleetSettings, SettingsError


class Runtime:
    def __init__(
        self,
        settings: FleetSettings,
        redis_url: str | None = None,
        *,
        start_embedded: bool = True,
    ) -> None:
        """``start_embedded=False``: use the embedded Redis only if some other fleet
        process already runs it (a message sent to a server that stops with the sender
        would be lost)."""
        self.settings = settings
        self._embedded: EmbeddedRedis | None = None
        self._redis_url = redis_url or settings.redis_url
        self._start_embedded = start_embedded
        self._lock = threading.Lock()

    # Redis ---------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        """The Redis URL, starting the embedded server the first time it is needed."""
        with self._lock:
            if self._redis_url is None:
                embedded = EmbeddedRedis(self.settings.home)
                if not self._start_embedded:
                    if not embedded.answers():
                        raise EmbeddedRedisError(
                            "the embedded Redis is not running: start `fleet worker` or "
                            "`fleet demo` first, or set FLEET_REDIS_URL"
                        )
                    self._redis_url = embedded.url
                    return self._redis_url
                self._embedded = embedded
                self._redis_url = embedded.ensure()
                atexit.register(self.close)
            return self._redis_url

    @property
    def broker_url(self) -> str:
        """The same Redis in kombu's spelling (unix sockets are ``redis+socket://``,
        Sentinel is ``sentinel://host:port;sentinel://...`` with the master's name in
        :attr:`broker_options`)."""
        url = self.redis_url
        if url.startswith("unix://"):
            return "redis+socket://" + url[len("unix://") :]
        sentinel = parse_sentinel_url(url)
        if sentinel is not None:
            auth = f":{sentinel.password}@" if sentinel.password else ""
            return ";".join(
                f"sentinel://{auth}{host}:{port}/{sentinel.db}" for host, port in sentinel.nodes
            )
        return url

    @property
    def broker_options(self) -> dict[str, Any]:
        """Transport options the broker URL needs (Sentinel's master name)."""
        sentinel = parse_sentinel_url(self.redis_url)
        return {"master_name": sentinel.master} if sentinel is not None else {}

    @cached_property
    def redis(self) -> redis.Redis:
        return redis_client(self.redis_url)

    # Database ------------------------------------------------------------------------

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.sqlalchemy_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    def require_migrated(self) -> None:
        """Stop with one line when the database is not at the newest schema."""
        from workers.db import current_revision, head_revision

        try:
            current = current_revision(self.engine)
        except Exception as exc:
            raise SettingsError(f"database unreachable: {type(exc).__name__}") from None
        if current != head_revision():
            raise SettingsError(
                f"database schema is at {current or 'nothing'}, not {head_revision()}: "
                "run `fleet migrate`"
            )

    # Lifecycle -----------------------------------------------------------------------

    def after_fork(self) -> None:
        """In a forked child: forget the parent's pools without closing its sockets."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.dispose(close=False)
        self.__dict__.pop("sessions", None)
        self.__dict__.pop("redis", None)
        self._embedded = None  # the parent owns the embedded server

    def close(self) -> None:
        client = self.__dict__.pop("redis", None)
        if client is not None:
            client.close()
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.dispose()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None


_current: Runtime | None = None


def install(rt: Runtime) -> Runtime:
    global _current
    _current = rt
    return rt


def runtime() -> Runtime:
    if _current is None:
        raise RuntimeError("no fleet runtime installed in this process")
    return _current


def installed() -> Runtime | None:
    return _current


def _after_fork_in_child() -> None:
    if _current is not None:
        _current.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[:password@]host:port[,host:port...]/MASTER[/DB]``: the master
    that the Sentinels at ``nodes`` name, found again after a failover."""

    nodes: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelURL | None:
    if not url.startswith("redis+sentinel://"):
        return None
    rest = url[len("redis+sentinel://") :]
    password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[-1]) or None
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError("a Sentinel URL is redis+sentinel://host:port[,host:port]/MASTER[/DB]")
    nodes = []
    for node in hosts.split(","):
        host, _, port = node.rpartition(":")
        nodes.append((host or node, int(port) if host else 26379))
    db = int(parts[1]) if len(parts) > 1 else 0
    return SentinelURL(tuple(nodes), parts[0], db, password)


def redis_client(url: str, *, socket_timeout: float = 10, retries: int = 5) -> redis.Redis:
    """The one way the fleet builds a Redis client for its own keys: a command whose
    connection fails or times out is sent again (up to ``retries`` times, with exponential
    backoff and jitter, 10 ms to 2 s). That is safe because every command and script the
    fleet sends has the effect of one when repeated, or its outcome is read back (the
    README's "exactly once" notes name which, step by step)."""
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    retry = Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.01), retries)
    sentinel = parse_sentinel_url(url)
    if sentinel is not None:
        from redis.sentinel import Sentinel

        watchers = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            list(sentinel.nodes),
            socket_timeout=socket_timeout,
            sentinel_kwargs={"socket_timeout": 2},
        )
        master: redis.Redis = watchers.master_for(  # type: ignore[no-untyped-call,unused-ignore]
            sentinel.master,
            db=sentinel.db,
            password=sentinel.password,
            socket_timeout=socket_timeout,
            health_check_interval=30,
            retry=retry,
        )
        return master
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        health_check_interval=30,
        retry=retry,
    )
