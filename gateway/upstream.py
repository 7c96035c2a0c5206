"""The proxy's HTTP/1.1 client: pooled keep-alive connections per upstream,
an `asyncio.Protocol` and the httptools (llhttp) response parser.

Why not aiohttp for the hot path: measured under `bench/gateway.py`, the
aiohttp client (request and response objects, header multidicts, timers,
trace hooks, stream readers) was the larger part of the gateway's CPU per
forwarded request; this client writes the request head from the ASGI
header bytes as they are and hands the response's raw header bytes back,
so it does a fraction of that work. aiohttp stays for everything else
(docs fetching, readiness, webhooks), httpx for tests and clients.

What it does and does not do, on purpose:

- Bytes in, bytes out: no header normalization, no decompression, no
  cookies, no redirects; the caller decides which headers go.
- A total deadline per request (connect, send, response head and body, as
  aiohttp's `ClientTimeout(total=...)`) and a connect timeout;
  `TimeoutError` when either passes, `UpstreamError` when the upstream
  cannot be reached or breaks the exchange.
- A pooled connection the upstream closed while it sat idle is retried
  once on a fresh connection, for idempotent methods only.
- Bodies up to `buffer_limit` with a known length are read whole; others
  stream with back-pressure (reading pauses while the caller is behind).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange."""


class _StaleConnection(UpstreamError):
    """A pooled connection was found closed before any response byte came."""


class _Conn(asyncio.Protocol):
    __slots__ = (
        "buffered",
        "chunked",
        "chunks",
        "closed",
        "complete",
        "error",
        "got_bytes",
        "head_done",
        "head_only",
        "headers",
        "idle_since",
        "keep_alive",
        "length",
        "listener",
        "parser",
        "paused",
        "pool",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.parser: Any = None
        self.waiter: asyncio.Future[None] | None = None
        # Instead of a waiter: called on every event of the exchange (head,
        # body, end, error), so gateway/server.py's fast path needs no task.
        self.listener: Callable[[], None] | None = None
        self.error: BaseException | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.head_done = False
        self.complete = False
        self.got_bytes = False
        self.head_only = False
        self.chunked = False
        self.length: int | None = None
        self.paused = False
        self.keep_alive = False

    # -- one exchange ---------------------------------------------------------

    def begin(self, head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers = []
        self.chunks.clear()
        self.buffered = 0
        self.head_done = False
        self.complete = False
        self.got_bytes = False
        self.head_only = head_only
        self.keep_alive = False
        self.chunked = False
        self.length = None
        self.error = None

    def _wake(self) -> None:
        listener = self.listener
        if listener is not None:
            listener()
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        if self.error is not None:
            raise self.error
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self.waiter = None
        if self.error is not None:
            raise self.error

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.close()
        self._wake()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.complete:
            # Bytes nobody asked for: the connection is not reusable.
            self.close()
            return
        self.got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamError("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.parser is None or self.complete:
            return
        if self.head_done and not self.chunked and self.length is None:
            # A body delimited by the end of the connection.
            self._finish()
            return
        if self.error is None:
            if not self.got_bytes:
                self.error = _StaleConnection("connection closed before the response")
            else:
                self.error = UpstreamError("connection closed mid-response")
        self._wake()

    def pause_writing(self) -> None:  # pragma: no cover - request bodies are small
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # -- httptools callbacks --------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-length":
            try:
                self.length = int(value)
            except ValueError:
                self.length = None
        elif lower == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True
        self.headers.append((lower, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (we never send Expect): skip it.
            self.headers = []
            self.length = None
            self.chunked = False
            return
        self.status = status
        self.head_done = True
        # Asked here: llhttp's answer is only meaningful until the message ends.
        self.keep_alive = self.parser.should_keep_alive()
        if self.head_only or status in (204, 304):
            self._finish()
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:  # the end of an interim response
            return
        self._finish()

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        self._wake()

    def take(self) -> bytes:
        chunks = self.chunks
        if len(chunks) == 1:
            data = chunks.popleft()
        else:
            data = b"".join(chunks)
            chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return not self.closed and self.complete and not self.head_only and self.keep_alive


class UpstreamResponse:
    """Status, raw header pairs (lower-case names) and the body, once."""

    __slots__ = ("_conn", "_deadline", "_pool", "_released", "headers", "length", "status")

    def __init__(self, conn: _Conn, pool: UpstreamPool, deadline: asyncio.TimerHandle) -> None:
        self._conn = conn
        self._pool = pool
        self._deadline = deadline
        self.status = conn.status
        self.headers = conn.headers
        self.length = conn.length if not conn.chunked else None
        self._released = False

    @property
    def complete(self) -> bool:
        return self._conn.complete

    def take(self) -> bytes:
        """The body when `complete` (no waiting)."""
        return self._conn.take()

    async def read(self) -> bytes:
        conn = self._conn
        while not conn.complete:
            await conn.wait()
        return conn.take()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                return
            await conn.wait()

    def release(self) -> None:
        """Back to the pool when the exchange completed, else closed."""
        if self._released:
            return
        self._released = True
        self._deadline.cancel()
        conn = self._conn
        if conn.reusable():
            self._pool.put(conn)
        else:
            conn.close()


class UpstreamPool:
    """Keep-alive connections to one upstream (`http://host:port[/prefix]`)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 2.0,
        keepalive: float = 4.0,
        limit: int = 512,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port]: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        default = (parts.scheme == "http" and self.port == 80) or (
            parts.scheme == "https" and self.port == 443
        )
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        self.host_header = (host if default else f"{host}:{self.port}").encode("idna")
        self.prefix = parts.path.rstrip("/").encode("latin-1")
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.limit = limit
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    # -- connections ----------------------------------------------------------

    def idle_conn(self) -> _Conn | None:
        """A pooled connection ready now, or None (no waiting, no connecting)."""
        return self._idle_conn() if not self._closed else None

    def _idle_conn(self) -> _Conn | None:
        """The most recently used idle connection that is still good."""
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing():
                self.forget(conn)
                continue
            if now - conn.idle_since > self.keepalive:
                conn.close()
                self.forget(conn)
                continue
            return conn
        return None

    async def _acquire(self) -> tuple[_Conn, bool]:
        """A connection, and whether it came from the pool."""
        while True:
            conn = self._idle_conn()
            if conn is not None:
                return conn, True
            if len(self._open) < self.limit:
                return await self._connect(), False
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self) -> _Conn:
        if self._closed:
            raise UpstreamError("pool closed")
        loop = asyncio.get_running_loop()
        conn = _Conn(self)
        self._open.add(conn)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            self.forget(conn)
            conn.close()
            raise
        except OSError as exc:
            self.forget(conn)
            conn.close()
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except BaseException:
            self.forget(conn)
            conn.close()
            raise
        return conn

    def put(self, conn: _Conn) -> None:
        if self._closed:
            conn.close()
            return
        conn.parser = None
        conn.listener = None
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._notify()

    def forget(self, conn: _Conn) -> None:
        self._open.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._notify()

    def _notify(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()

    # -- requests -------------------------------------------------------------

    def _head(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> bytes:
        lines = [
            method.encode("ascii"),
            b" ",
            self.prefix,
            target,
            b" HTTP/1.1\r\nhost: ",
            self.host_header,
            b"\r\n",
        ]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        if body or method in BODY_METHODS:
            lines += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        return b"".join(lines)

    async def request(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
    ) -> UpstreamResponse:
        """Send `method target` (path and query, already encoded) and wait
        for the response head. The caller reads the body and must call
        `release()` on the response."""
        loop = asyncio.get_running_loop()
        data = self._head(method, target, headers, body)
        head_only = method == "HEAD"
        task = asyncio.current_task()
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            if current is not None:
                current.fail(TimeoutError())
            elif task is not None:
                task.cancel()

        current: _Conn | None = None
        deadline = loop.call_later(timeout, expire)
        try:
            for attempt in (0, 1):
                try:
                    idle = self._idle_conn()
                    conn, pooled = (idle, True) if idle is not None else await self._acquire()
                except asyncio.CancelledError:
                    if timed_out and task is not None and task.uncancel() == 0:
                        raise TimeoutError() from None
                    raise
                current = conn
                conn.begin(head_only)
                assert conn.transport is not None
                conn.transport.write(data)
                try:
                    while not conn.head_done:
                        await conn.wait()
                except _StaleConnection:
                    current = None
                    if pooled and attempt == 0 and method in IDEMPOTENT:
                        continue
                    raise
                return UpstreamResponse(conn, self, deadline)
            raise UpstreamError("unreachable")  # pragma: no cover
        except BaseException:
            deadline.cancel()
            if current is not None:
                current.close()
            raise
