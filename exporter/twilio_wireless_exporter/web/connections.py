"""Client connections to the exporter's HTTP server, bounded in number and in patience.

aiohttp by itself waits for a request head as long as its keep-alive timeout (an hour) and
accepts connections until the process runs out of file descriptors, after which it can accept
none (``/-/healthy`` included) and every further attempt logs "Too many open files". Here:

* **Header timeout.** A connection must deliver a complete request head within
  ``header_timeout`` of being established (after the TLS handshake, which has a timeout of the
  same length); otherwise it is cut. Later requests on a kept-alive connection are bounded
  by aiohttp's keep-alive timeout (``idle_timeout``), which also applies to a request head that
  never completes.
* **Connection limit.** At most ``max_connections`` connections are open at once, chosen below
  the open-files limit (``RLIMIT_NOFILE``) so that the poller, the state file and the accept
  itself always find a descriptor. How many connections asyncio accepts in one go, before any
  of them is seen, is sized from what the limit leaves over too. A new connection beyond the
  limit takes the place of the connection least likely to be a working client: the oldest one
  still without a complete request head, else the one that has been silent longest. A health
  check therefore gets in even while the slots are held by clients that send nothing.
* **Counted and logged once per interval.** Every cut connection is counted in
  ``twilio_wireless_http_rejected_total`` and logged by a :class:`RateLimitedLog`.

The limiter wraps aiohttp's protocol (one :class:`GuardedConnection` around each aiohttp
``RequestHandler``) and sees only the bytes the client sends; it needs nothing of aiohttp's
internals. With TLS it runs the handshake itself (``loop.start_tls``), so a connection counts
from its accept, handshake included. :class:`GuardedSite` is a ``TCPSite`` that listens through
it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from aiohttp import web

from twilio_wireless_exporter.web.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

#: File descriptors left for everything but client connections (the poller's connection pool,
#: the state file, log files, the listening sockets, the descriptor accept needs).
FD_RESERVE: Final = 64
MIN_BACKLOG: Final = 16
MAX_BACKLOG: Final = 128
#: The default limit when the open-files limit leaves room for more.
DEFAULT_MAX_CONNECTIONS: Final = 512
DEFAULT_HEADER_TIMEOUT: Final = 10.0
DEFAULT_IDLE_TIMEOUT: Final = 300.0
_HEAD_ENDS: Final = (b"\r\n\r\n", b"\n\n")


class Rejections(Protocol):
    """Counts what the web server cut or refused (``HttpMetrics`` implements it)."""

    def reject(self, reason: str) -> None: ...


class _Uncounted:
    def reject(self, reason: str) -> None:
        pass


def open_files_limit() -> int | None:
    """The soft ``RLIMIT_NOFILE`` of this process, ``None`` when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def connection_limit(requested: int | None, files: int | None) -> int:
    """The connection limit: ``requested`` (or the default), lowered to half the open-files
    limit ``files`` when that is smaller; at most what leaves :data:`FD_RESERVE` descriptors and
    a minimal accept backlog free."""
    if files is None:
        return requested or DEFAULT_MAX_CONNECTIONS
    ceiling = max(1, files - FD_RESERVE - MIN_BACKLOG)
    if requested:
        return min(requested, ceiling)
    return max(1, min(DEFAULT_MAX_CONNECTIONS, files // 2, ceiling))


def accept_backlog(max_connections: int, files: int | None) -> int:
    """How many connections asyncio accepts in one go, before any of them is counted (it is
    the ``backlog`` of ``create_server``): a quarter of what the open-files limit leaves beside
    the connections and the reserve (a connection that makes room frees its descriptor only on a
    later turn of the loop, by which time asyncio may have accepted two more batches), at most
    :data:`MAX_BACKLOG`. The kernel's queue of connections not yet accepted stays
    :data:`MAX_BACKLOG` long."""
    if files is None:
        return MAX_BACKLOG
    return max(1, min(MAX_BACKLOG, (files - FD_RESERVE - max_connections) // 4))


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    """Seconds from connecting (after TLS) to the end of the first request head."""
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    """Seconds a kept-alive connection may wait for its next request (aiohttp's keep-alive)."""
    backlog: int = MAX_BACKLOG
    """Connections accepted in one go (see :func:`accept_backlog`)."""


class ConnectionLimiter:
    """Counts, times out and evicts the connections of one server (all of its sites)."""

    def __init__(
        self,
        settings: ConnectionSettings,
        rejections: Rejections | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        log_interval: float = 60.0,
    ) -> None:
        self.settings = settings
        self._rejections = rejections or _Uncounted()
        self._clock = clock
        self._open: dict[GuardedConnection, None] = {}  # insertion order: oldest first
        self._log = RateLimitedLog(log, log_interval, clock)

    @property
    def open(self) -> int:
        return len(self._open)

    def status(self) -> tuple[int, int]:
        """``(open connections, limit)``, for the metrics."""
        return len(self._open), self.settings.max_connections

    def factory(
        self, inner: Callable[[], asyncio.Protocol], tls: ssl.SSLContext | None = None
    ) -> Callable[[], GuardedConnection]:
        """A protocol factory for ``loop.create_server`` (without ``ssl``: with ``tls``, the
        connections run their handshakes themselves) wrapping ``inner``'s protocols."""

        def make() -> GuardedConnection:
            return GuardedConnection(self, inner(), tls)

        return make

    def stop(self) -> None:
        """End the TLS handshakes still running (the server is stopping)."""
        for conn in list(self._open):
            conn.stop()

    # called by the connections

    def _admit(self, conn: GuardedConnection) -> bool:
        """Make room for ``conn`` (evicting another one if needed); False if there is none."""
        if len(self._open) >= self.settings.max_connections:
            victim = self._victim()
            if victim is None:
                self._reject(
                    "connection_limit",
                    "connection limit of %d reached: refusing a new connection",
                    self.settings.max_connections,
                )
                return False
            self._reject(
                "connection_limit",
                "connection limit of %d reached: cutting the connection from %s that"
                " has waited longest for a request",
                self.settings.max_connections,
                victim.peer,
            )
            victim.cut()
        self._open[conn] = None
        return True

    def _victim(self) -> GuardedConnection | None:
        best: GuardedConnection | None = None
        best_key: tuple[bool, float] | None = None
        for conn in self._open:
            key = conn.idle_key()
            if key is not None and (best_key is None or key < best_key):
                best, best_key = conn, key
        return best

    def _closed(self, conn: GuardedConnection) -> None:
        self._open.pop(conn, None)

    def _reject(self, reason: str, message: str, *args: object) -> None:
        self._rejections.reject(reason)
        self._log.log(reason, logging.WARNING, message, *args)

    def _timed_out(self, conn: GuardedConnection) -> None:
        self._reject(
            "header_timeout",
            "cut a connection from %s that sent no complete request head within %gs",
            conn.peer,
            self.settings.header_timeout,
        )
        conn.cut()


class GuardedConnection(asyncio.Protocol):
    """One client connection: aiohttp's protocol ``inner`` behind the limiter's checks.

    Counted from the moment the TCP connection is accepted. With ``tls``, this protocol runs the
    TLS handshake itself (``loop.start_tls``, within the header timeout), so that a connection
    still in its handshake is counted and can be cut like any other. Then forwards every event
    to ``inner`` unchanged, watching the bytes received for the end of the first request head
    (an empty line) and the time the client last sent anything.
    """

    def __init__(
        self,
        limiter: ConnectionLimiter,
        inner: asyncio.Protocol,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._limiter = limiter
        self._inner = inner
        self._tls = tls
        self._cut = False
        self._raw: asyncio.Transport | None = None
        """The TCP connection (with TLS, until the handshake is done)."""
        self._transport: asyncio.Transport | None = None
        """What ``inner`` was given: the TCP connection, or the TLS one on top of it."""
        self._handshake: asyncio.Task[None] | None = None
        self._early: list[bytes] = []  # received after the handshake, before start_tls returned
        self._early_eof = False
        self._deadline: asyncio.TimerHandle | None = None
        self._head_done = False
        self._tail = b""
        self._opened = 0.0
        self._last_data = 0.0
        self.peer: str = "?"

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
        self._opened = self._last_data = self._limiter._clock()
        if not self._limiter._admit(self):
            self._raw = None
            transport.abort()  # never handed to aiohttp
            return
        if self._tls is None:
            self._start(transport)
            return
        transport.pause_reading()  # the ClientHello waits for start_tls
        self._handshake = asyncio.ensure_future(self._start_tls(transport, self._tls))

    async def _start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._limiter.settings.header_timeout,
            )
        except (Exception, asyncio.CancelledError) as exc:
            # no handshake (timed out, refused, cut, or the server stops): asyncio has closed
            # the connection; nothing was handed to aiohttp
            log.debug("no TLS handshake with %s: %s", self.peer, type(exc).__name__)
            self._gone()
            raw.abort()
            return
        finally:
            self._handshake = None
        if secure is None or self._cut:
            self._gone()
            raw.abort()
            return
        self._start(secure)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)
        if self._early_eof:
            self.eof_received()

    def _start(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        timeout = self._limiter.settings.header_timeout
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_at(loop.time() + timeout, self._limiter._timed_out, self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            if self._handshake is not None:
                self._early.append(data)
            return
        self._last_data = self._limiter._clock()
        if not self._head_done:
            seen = self._tail + data
            if any(end in seen for end in _HEAD_ENDS):
                self._head_done = True
                self._tail = b""
                if self._deadline is not None:
                    self._deadline.cancel()
                    self._deadline = None
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._transport is None:
            self._early_eof = self._handshake is not None
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        if self._transport is not None:
            self._transport = None
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._inner.resume_writing()

    def _gone(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._limiter._closed(self)

    # for the limiter

    def idle_key(self) -> tuple[bool, float] | None:
        """How readily this connection is evicted (smaller first): still without a request
        head (or still in its TLS handshake), by age; else by how long the client has been
        silent."""
        if self._raw is None or self._cut:
            return None
        if not self._head_done:
            return (False, self._opened)
        return (True, self._last_data)

    def cut(self) -> None:
        """Close the connection now, without waiting for buffered output."""
        self._cut = True
        self._gone()  # its slot is free at once, before connection_lost
        if self._transport is not None:
            self._transport.abort()
        elif self._raw is not None:
            self._raw.abort()  # in its handshake: start_tls fails and cleans up

    def stop(self) -> None:
        """The server stops: end a handshake still running."""
        if self._handshake is not None:
            self._handshake.cancel()


class GuardedSite(web.TCPSite):
    """A ``TCPSite`` whose connections go through a :class:`ConnectionLimiter`; with TLS, the
    handshake must finish within the limiter's header timeout."""

    __slots__ = ("_limiter",)

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        limiter: ConnectionLimiter,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_address: bool | None = None,
    ) -> None:
        super().__init__(
            runner,
            host,
            port,
            ssl_context=ssl_context,
            reuse_address=reuse_address,
            backlog=limiter.settings.backlog,
        )
        self._limiter = limiter

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before starting a site")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._limiter.factory(server, self._ssl_context),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )
        sockets = self._server.sockets
        for listening in sockets:
            # asyncio listens with its batch size; the kernel may queue more (queued
            # connections hold no descriptor of ours), so that a flood does not drop the SYNs of
            # everyone else. A duplicate descriptor reaches the same socket.
            with socket.socket(fileno=os.dup(listening.fileno())) as same:
                same.listen(MAX_BACKLOG)
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        self._limiter.stop()
        await super().stop()
