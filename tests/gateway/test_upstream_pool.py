"""GW-01: the proxy's own HTTP/1.1 client (gateway/upstream.py), over real TCP
against raw servers that write exact bytes, on asyncio's loop and on uvloop
(what uvicorn runs the gateway on when it is installed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from gateway.upstream import UpstreamError, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name: str, main: Callable[[], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        return runner.run(main())


async def serve(handler: Handler) -> tuple[asyncio.Server, str, list[int]]:
    """A server that counts its connections and hands each to `handler`."""
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await handler(reader, writer, len(connections))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", connections


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_gw01_pool_keeps_connections_alive_and_reads_every_body_framing(loop_name: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            head, body = await read_request(reader)
            path = head.split(b" ")[1].removeprefix(b"/prefix")
            if path == b"/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(40):
                    piece = b"%d-" % i * 2000
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            elif path == b"/until-close":
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
                await writer.drain()
                return
            else:
                reply = b"echo:" + head.split(b"\r\n")[0] + b"|" + body
                writer.write(
                    b"HTTP/1.1 201 Created\r\nX-Multi: a\r\nX-Multi: b\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply)
                )
            await writer.drain()

    async def main() -> None:
        server, url, connections = await serve(handler)
        pool = UpstreamPool(url + "/prefix")
        try:
            for i in range(3):
                r = await pool.request("POST", b"/a?x=1&x=2", [(b"x-k", b"v")], b"b%d" % i, 5)
                assert r.status == 201
                assert [v for k, v in r.headers if k == b"x-multi"] == [b"a", b"b"]
                assert await r.read() == b"echo:POST /prefix/a?x=1&x=2 HTTP/1.1|b%d" % i
                r.release()
            # One connection carried all three exchanges.
            assert len(connections) == 1
            r = await pool.request("GET", b"/chunked", [], b"", 5)
            assert r.length is None
            streamed = b"".join([c async for c in r.iter_chunks()])
            r.release()
            assert streamed == b"".join(b"%d-" % i * 2000 for i in range(40))
            assert len(connections) == 1
            r = await pool.request("GET", b"/until-close", [], b"", 5)
            assert await r.read() == b"all of it"
            r.release()
            r = await pool.request("HEAD", b"/x", [], b"", 5)
            assert r.status == 201 and await r.read() == b""
            r.release()
        finally:
            await pool.close()
            server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_gw01_pool_retries_a_stale_connection_only_for_idempotent_methods(
    loop_name: str,
) -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        # Answers the first request of a connection; on the second it closes
        # without a word, as a service whose keep-alive timeout passes just
        # as the request arrives (or that restarts) does.
        head, _ = await read_request(reader)
        requests.append(head.split(b" ")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        head, _ = await read_request(reader)
        requests.append(head.split(b" ")[0])

    async def main() -> None:
        server, url, connections = await serve(handler)
        pool = UpstreamPool(url)
        try:
            for _ in range(2):
                r = await pool.request("GET", b"/", [], b"", 5)
                assert r.status == 200 and await r.read() == b"ok"
                r.release()
            # The second GET met the closing connection and went again on a new one.
            assert requests == [b"GET", b"GET", b"GET"] and len(connections) == 2
            # A POST may have been acted on before the close: never sent twice.
            with pytest.raises(UpstreamError):
                await pool.request("POST", b"/", [], b"x", 5)
            assert requests == [b"GET", b"GET", b"GET", b"POST"] and len(connections) == 2
        finally:
            await pool.close()
            server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_gw01_pool_times_out_and_reports_unreachable_upstreams(loop_name: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def main() -> None:
        server, url, _ = await serve(handler)
        pool = UpstreamPool(url)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await pool.request("GET", b"/", [], b"", 0.2)
            assert asyncio.get_running_loop().time() - started < 2
            assert not pool._idle  # the timed-out connection is not reused
        finally:
            await pool.close()
            server.close()
        dead = UpstreamPool(url)
        await asyncio.sleep(0)
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamError):
            await dead.request("GET", b"/", [], b"", 2)

    run(loop_name, main)
