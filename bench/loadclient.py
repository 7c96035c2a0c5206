"""A lean HTTP/1.1 client for the benchmarks' load generators.

Why not aiohttp: the load generator shares the machine's cores with the
system it measures, and aiohttp's client cost about 0.4 ms of CPU per
request on the 2-core development machine — as much as half the gateway's
own work — so the figures measured partly the client. This one does only
what a load generator needs: keep-alive connections from a pool, a request
written as one block of bytes, the answer parsed by httptools (llhttp, the
same parser the gateway serves with) down to its status code; the body is
read and dropped. Any failure is status 0 (no answer), as in the benches'
tallies.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httptools

# Idle connections are dropped before the servers' keep-alive (5 s) does:
# a request must never be written into a connection being closed.
IDLE_SECONDS = 2.0


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[int] | None = None
        self.open = True
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(error)

    def on_message_complete(self) -> None:
        answer, self.answer = self.answer, None
        if not self.parser.should_keep_alive():
            self.open = False
        if answer is not None and not answer.done():
            answer.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("closed by the server"))
        # The parser holds this protocol's callbacks: break the cycle, so a
        # closed connection is freed at once, not by the garbage collector.
        self.parser = None  # type: ignore[assignment]

    def _fail(self, error: BaseException) -> None:
        self.open = False
        answer, self.answer = self.answer, None
        if answer is not None and not answer.done():
            answer.set_exception(error)
        if self.transport is not None:
            self.transport.close()


class LeanClient:
    """POSTs to one server (``base``: scheme, host, port and a path prefix)."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.host_header = f"{self.host}:{self.port}"
        self.idle: list[_Connection] = []

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.open and now - conn.idle_since < IDLE_SECONDS:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        _, conn = await asyncio.get_running_loop().create_connection(
            _Connection, self.host, self.port
        )
        return conn

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        """The answer's status code (0: no answer)."""
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host_header}\r\n{head}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        try:
            conn = await self._connection()
            conn.answer = asyncio.get_running_loop().create_future()
            assert conn.transport is not None
            conn.transport.write(request)
            status = await conn.answer
        except (OSError, httptools.HttpParserError, AssertionError):
            return 0
        if conn.open:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        return status

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
