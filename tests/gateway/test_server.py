"""GW-01: the gateway's own HTTP/1.1 server (gateway/server.py), over real
sockets with exact bytes: what uvicorn did for it, it must do as well —
framing, keep-alive, pipelining, bad input — and the edge still decides."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.identity.tokens import TokenIssuer
from tests.gateway.conftest import Echo, Served, build_gateway_app

pytestmark = pytest.mark.asyncio


class Conn:
    """One client connection: send bytes, read whole responses (length or chunked)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, base: str) -> Conn:
        host, port = base.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, head_only: bool = False) -> tuple[int, dict[str, list[str]], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers.setdefault(k.strip().lower(), []).append(v.strip())
        if head_only or status in (100, 204, 304):
            return status, headers, b""
        if headers.get("transfer-encoding") == ["chunked"]:
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    return status, headers, body
                body += chunk[:-2]
        length = int(headers.get("content-length", ["0"])[0])
        return status, headers, await self.reader.readexactly(length) if length else b""

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def fast(served: Served, tmp_path: Path, issuer: TokenIssuer) -> tuple[Echo, str]:
    echo = Echo()
    echo.url = await served.start(echo)
    app = build_gateway_app(
        tmp_path,
        issuer,
        upstreams={"homework": echo.url},
        max_body_bytes=64 * 1024,
        rate_limit_enabled=False,
    )
    return echo, await served.start_gateway(app, "fast")


def get(path: str, token: str, extra: str = "") -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
    return (head + extra + "\r\n").encode()


def seen_body(record: dict[str, Any]) -> bytes:
    return base64.b64decode(record["body_b64"])


async def test_gw01_pipelined_requests_are_answered_in_order_on_one_connection(
    fast: tuple[Echo, str], mint: Any
) -> None:
    _, gateway = fast
    token = mint("teacher")
    post = (
        f"POST /api/v1/homework/two?x=1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: 5\r\n\r\nhello"
    ).encode()
    conn = await Conn.open(gateway)
    # Three requests in one write: the server must not mix them up.
    three = get("/api/v1/homework/three", token)
    await conn.send(get("/api/v1/homework/one", token) + post + three)
    answers = [await conn.response() for _ in range(3)]
    assert [s for s, _, _ in answers] == [200, 200, 200]
    records = [json.loads(body) for _, _, body in answers]
    assert [r["path"] for r in records] == ["/one", "/two", "/three"]
    assert [r["method"] for r in records] == ["GET", "POST", "GET"]
    assert seen_body(records[1]) == b"hello" and records[1]["query_string"] == "x=1"
    # Each response carries its own request id, the one its service saw.
    ids = [h["x-request-id"][0] for _, h, _ in answers]
    assert len(set(ids)) == 3
    assert [dict(r["headers"])["x-request-id"] for r in records] == ids
    # Keep-alive: the connection still serves.
    await conn.send(get("/api/v1/homework/four", token))
    status, _, body = await conn.response()
    assert status == 200 and json.loads(body)["path"] == "/four"
    conn.close()


async def test_gw01_chunked_request_body_reaches_the_service_whole(
    fast: tuple[Echo, str], mint: Any
) -> None:
    _, gateway = fast
    token = mint("teacher")
    conn = await Conn.open(gateway)
    await conn.send(
        f"PUT /api/v1/homework/upload HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"4\r\n\x00\x01\xfe\xff\r\n6\r\n\xe4\xbd\x9c\xe4\xb8\x9a\r\n0\r\n\r\n"
    )
    status, _, body = await conn.response()
    assert status == 200
    record = json.loads(body)
    assert record["method"] == "PUT"
    assert seen_body(record) == b"\x00\x01\xfe\xff\xe4\xbd\x9c\xe4\xb8\x9a"
    headers = dict(record["headers"])
    assert headers["content-length"] == "10" and "transfer-encoding" not in headers
    conn.close()


async def test_gw01_malformed_request_gets_400_and_the_server_keeps_serving(
    fast: tuple[Echo, str], mint: Any
) -> None:
    echo, gateway = fast
    for garbage in (
        b"GET /api/v1/homework/x HTTP/1.1\r\nHost gw\r\n\r\n",  # header without colon
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # TLS hello
        b"GET /api/v1/homework/x HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        # A head without end is not buffered without end.
        b"GET /api/v1/homework/x HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /api/v1/homework/x HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 300 + b"\r\n",
    ):
        conn = await Conn.open(gateway)
        await conn.send(garbage)
        status, headers, body = await conn.response()
        assert status == 400, garbage
        assert headers["content-type"] == ["application/problem+json"]
        assert json.loads(body)["status"] == 400
        assert await conn.closed_by_server()
        conn.close()
    assert echo.hits == []
    conn = await Conn.open(gateway)
    await conn.send(get("/api/v1/homework/after", mint("teacher")))
    assert (await conn.response())[0] == 200
    conn.close()


async def test_gw01_token_is_checked_at_the_edge_of_the_fast_path(
    fast: tuple[Echo, str], mint: Any
) -> None:
    echo, gateway = fast
    conn = await Conn.open(gateway)
    await conn.send(b"GET /api/v1/homework/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, headers, body = await conn.response()
    assert status == 401 and headers["www-authenticate"] == ["Bearer"]
    problem = json.loads(body)
    assert problem["instance"] == "/api/v1/homework/x"
    assert problem["request_id"] == headers["x-request-id"][0]
    await conn.send(get("/api/v1/homework/x", "not.a.token"))
    status, _, _ = await conn.response()
    assert status == 401
    # A refused request leaves the connection usable.
    await conn.send(get("/api/v1/homework/x", mint("teacher")))
    assert (await conn.response())[0] == 200
    assert [h["path"] for h in echo.hits] == ["/x"]
    conn.close()


async def test_gw01_head_connection_close_http10_and_expect_continue(
    fast: tuple[Echo, str], mint: Any
) -> None:
    echo, gateway = fast
    token = mint("teacher")
    conn = await Conn.open(gateway)
    await conn.send(get("/api/v1/homework/h", token).replace(b"GET", b"HEAD", 1))
    status, headers, _ = await conn.response(head_only=True)
    assert status == 200 and int(headers["content-length"][0]) > 0  # the GET's length
    assert echo.hits[-1]["method"] == "HEAD"
    # No body followed the head: the next response parses cleanly.
    await conn.send(get("/api/v1/homework/next", token, "Connection: close\r\n"))
    status, headers, body = await conn.response()
    assert status == 200 and json.loads(body)["path"] == "/next"
    assert headers["connection"] == ["close"]
    assert await conn.closed_by_server()
    conn.close()

    conn = await Conn.open(gateway)
    await conn.send(
        f"GET /api/v1/homework/old HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    status, _, body = await conn.response()
    assert status == 200 and json.loads(body)["path"] == "/old"
    assert await conn.closed_by_server()  # HTTP/1.0 without keep-alive
    conn.close()

    conn = await Conn.open(gateway)
    await conn.send(
        f"POST /api/v1/homework/big HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: 3\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    status, _, _ = await conn.response()
    assert status == 100
    await conn.send(b"abc")
    status, _, body = await conn.response()
    assert status == 200 and seen_body(json.loads(body)) == b"abc"
    conn.close()


async def test_gw01_gateway_routes_answer_through_the_bridge(
    fast: tuple[Echo, str], mint: Any
) -> None:
    echo, gateway = fast
    conn = await Conn.open(gateway)
    await conn.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, headers, body = await conn.response()
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert headers["x-request-id"] and headers["date"]
    await conn.send(b"GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, headers, body = await conn.response()
    assert status == 404 and headers["content-type"] == ["application/problem+json"]
    # An unknown service is refused by the edge, not forwarded anywhere.
    await conn.send(get("/api/v1/nosuch/x", mint("teacher")))
    status, _, body = await conn.response()
    assert status == 404 and "nosuch" in json.loads(body)["detail"]
    await conn.send(b"GET /openapi.json HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, _, body = await conn.response()
    assert status == 200 and json.loads(body)["openapi"].startswith("3.1")
    conn.close()
    assert echo.hits == []


async def test_gw01_shutdown_lets_requests_in_flight_finish_and_closes_idle_connections(
    fast: tuple[Echo, str], served: Served, mint: Any
) -> None:
    echo, gateway = fast
    token = mint("teacher")
    idle = await Conn.open(gateway)
    await idle.send(get("/api/v1/homework/warm", token))
    assert (await idle.response())[0] == 200
    busy = await Conn.open(gateway)
    await busy.send(get("/api/v1/homework/slow", token))  # the service takes 2 s
    while not any(h["path"] == "/slow" for h in echo.hits):
        await asyncio.sleep(0.01)
    stopping = asyncio.create_task(served.stop(gateway))
    assert await idle.closed_by_server()  # idle keep-alive connections go at once
    status, _, body = await busy.response()  # the one in flight is answered
    assert status == 200 and json.loads(body)["path"] == "/slow"
    await stopping
    with pytest.raises(OSError):
        await Conn.open(gateway)  # and nothing listens any more
    idle.close()
    busy.close()


async def test_gw01_on_a_warm_pooled_connection_streams_timeouts_and_ids_are_right(
    served: Served, tmp_path: Path, issuer: TokenIssuer, mint: Any
) -> None:
    """Once an upstream connection is pooled and the token cached, requests go
    the callback path (no task per request): a streamed response still comes
    back whole, a slow service is still a 504 naming it, the connection goes
    on after either, and every made request id is distinct and sane."""
    echo = Echo()
    echo.url = await served.start(echo)
    app = build_gateway_app(
        tmp_path,
        issuer,
        upstreams={"homework": echo.url},
        upstream_timeouts={"homework": 0.5},
        rate_limit_enabled=True,
    )
    gateway = await served.start_gateway(app, "fast")
    token = mint("teacher")
    conn = await Conn.open(gateway)
    ids = []
    for _ in range(3):  # the first one pools the upstream connection
        await conn.send(get("/api/v1/homework/warm?a=1&a=2", token))
        status, headers, body = await conn.response()
        assert status == 200 and json.loads(body)["query_string"] == "a=1&a=2"
        ids.append(headers["x-request-id"][0])
        assert dict(json.loads(body)["headers"])["x-request-id"] == ids[-1]
    assert len(set(ids)) == 3
    assert all(re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", i) for i in ids)
    await conn.send(get("/api/v1/homework/stream", token))
    status, headers, body = await conn.response()
    assert status == 200 and headers["transfer-encoding"] == ["chunked"]
    assert body == b"".join(f"chunk-{i}\n".encode() for i in range(50))
    await conn.send(get("/api/v1/homework/slow", token))
    status, headers, body = await conn.response()
    problem = json.loads(body)
    assert status == 504 and problem["service"] == "homework"
    assert headers["content-type"] == ["application/problem+json"]
    await conn.send(get("/api/v1/homework/after", token))
    status, _, body = await conn.response()
    assert status == 200 and json.loads(body)["path"] == "/after"
    conn.close()


async def test_gw01_a_closed_connection_is_freed_without_the_garbage_collector(
    fast: tuple[Echo, str], served: Served, mint: Any
) -> None:
    """Mobile clients connect and go all day: a closed connection must not be
    left as a reference cycle (protocol <-> parser callbacks) for the
    collector — each was a dozen objects swelling the gateway's pauses."""
    import gc
    import weakref

    _, gateway = fast
    server, _ = served.fast[gateway]
    conn = await Conn.open(gateway)
    await conn.send(get("/api/v1/homework/one", mint("teacher")))
    status, _, _ = await conn.response()
    assert status == 200
    (protocol,) = server.conns
    gone = weakref.ref(protocol)
    del protocol
    gc.disable()
    try:
        conn.close()
        for _ in range(100):
            if not server.conns:
                break
            await asyncio.sleep(0.01)
        assert not server.conns
        await asyncio.sleep(0.05)  # the transport lets go of the protocol
        assert gone() is None  # freed by reference counting alone
    finally:
        gc.enable()
