"""A TCP proxy that loses an answer: the fault no real server can be made to produce.

It forwards both ways between a client and a server (PostgreSQL, Redis, an HTTP server)
until the client sends bytes containing ``trigger``. Those bytes are forwarded; the proxy
then waits for the server's answer (so the server has done the work), throws it away and
cuts both connections. The client sees its connection drop after the server acted: the
"did it happen?" that the fleet must resolve by reading back, never by assuming.

Plain TCP only: clients must not negotiate TLS through it (PostgreSQL's default
``sslmode=prefer`` falls back to plain text when the server has no TLS, as test clusters do).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator


class CuttingProxy:
    def __init__(self, target: tuple[str, int], trigger: bytes, times: int = 1) -> None:
        self.target = target
        self.trigger = trigger
        self.remaining = times  # how many answers to lose; then it only forwards
        self.passing = 0  # matching sends to let through before the first cut
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def arm(self, trigger: bytes | None = None, times: int = 1, after: int = 0) -> None:
        """Lose the answers to the next ``times`` sends holding ``trigger``, once ``after``
        of them have gone through untouched."""
        with self._lock:
            self.trigger = trigger or self.trigger
            self.remaining = times
            self.passing = after

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _take_cut(self, data: bytes) -> bool:
        with self._lock:
            if self.remaining > 0 and self.trigger in data:
                if self.passing > 0:
                    self.passing -= 1
                    return False
                self.remaining -= 1
                self.cuts += 1
                return True
        return False

    def _pipe(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        try:
            self._forward(client, server)
        except OSError:
            pass  # either end reset or gone (a process killed, a server restarted): cut both
        finally:
            for end in (client, server):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def _forward(self, client: socket.socket, server: socket.socket) -> None:
        ends = {client: server, server: client}
        while not self._closed.is_set():
            ready, _, _ = select.select(list(ends), [], [], 0.5)
            for source in ready:
                data = source.recv(65536)
                if not data:
                    return
                if source is client and self._take_cut(data):
                    server.sendall(data)
                    self._await_answer(server)
                    return  # the answer is lost: both connections are cut
                ends[source].sendall(data)

    @staticmethod
    def _await_answer(server: socket.socket) -> None:
        """Wait until the server answers (it has acted), then drop what it said."""
        server.settimeout(30)
        with contextlib.suppress(OSError):
            server.recv(65536)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


@contextlib.contextmanager
def cutting_proxy(
    target: tuple[str, int], trigger: bytes, times: int = 1
) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(target, trigger, times)
    try:
        yield proxy
    finally:
        proxy.close()
