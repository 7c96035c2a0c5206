"""GW-01: faithful forwarding, over real TCP on both sides of the gateway."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.identity.tokens import TokenIssuer
from tests.gateway.conftest import Echo, MakeGateway, Served, build_gateway_app, dead_url
from tests.support import auth

pytestmark = pytest.mark.asyncio


async def raw_request(base: str, request: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Send exact bytes (no client library adding or normalizing anything)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers.setdefault(k.strip().lower(), []).append(v.strip())
    length = int(headers.get("content-length", ["0"])[0])
    body = await reader.readexactly(length) if length else b""
    writer.close()
    return status, headers, body


@pytest.fixture(params=["fast", "uvicorn"])
async def echo_gateway(
    request: pytest.FixtureRequest, served: Served, tmp_path: Path, issuer: TokenIssuer
) -> tuple[Echo, str]:
    """The gateway on its own server (as deployed) and on uvicorn: the same
    forwarding either way."""
    echo = Echo()
    upstream = await served.start(echo)
    echo.url = upstream
    app = build_gateway_app(
        tmp_path,
        issuer,
        upstreams={"homework": upstream, "institutions": upstream},
        rate_limit_enabled=False,
        max_body_bytes=64 * 1024,
    )
    gateway = await served.start_gateway(app, request.param)
    return echo, gateway


def header_values(record: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in record["headers"] if k == name]


async def test_gw01_methods_bodies_repeated_query_keys_and_headers_pass_unchanged(
    echo_gateway: tuple[Echo, str], mint: Any
) -> None:
    echo, gateway = echo_gateway
    token = mint("teacher", tenants=["school:s1"])
    body = bytes(range(256)) * 4
    async with httpx.AsyncClient(base_url=gateway) as client:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            with_body = method in ("POST", "PUT", "PATCH")
            response = await client.request(
                method,
                "/api/v1/homework/things/%E4%B8%AD/a%2Fb?x=1&x=2&y=%E4%B8%AD&empty=&x=3",
                headers=[
                    ("Authorization", f"Bearer {token}"),
                    ("X-Multi", "one"),
                    ("X-Multi", "two"),
                    ("Content-Type", "application/x-custom"),
                    ("Cookie", "sid=abc"),
                ],
                content=body if with_body else None,
            )
            assert response.status_code == 200, response.text
            got = echo.hits[-1]
            assert got["method"] == method
            # Percent-encoding (also an encoded slash) reaches the service as sent.
            assert got["raw_path"] == "/things/%E4%B8%AD/a%2Fb"
            assert got["query_string"] == "x=1&x=2&y=%E4%B8%AD&empty=&x=3"
            assert header_values(got, "x-multi") == ["one", "two"]
            # The Authorization header passes unchanged: services verify it themselves.
            assert header_values(got, "authorization") == [f"Bearer {token}"]
            assert header_values(got, "content-type") == ["application/x-custom"]
            assert header_values(got, "cookie") == ["sid=abc"]
            assert header_values(got, "user-agent") == [client.headers["user-agent"]]
            assert base64.b64decode(got["body_b64"]) == (body if with_body else b"")
            assert header_values(got, "x-forwarded-for") == ["127.0.0.1"]
            assert header_values(got, "x-forwarded-prefix") == ["/api/v1/homework"]
            # Host names the upstream; the caller's host goes in X-Forwarded-Host.
            assert header_values(got, "host") == [echo.url.removeprefix("http://")]
            assert header_values(got, "x-forwarded-host") == [gateway.removeprefix("http://")]
            # The request id the service saw is the one the client gets back.
            assert header_values(got, "x-request-id") == [response.headers["x-request-id"]]


async def test_gw01_adds_no_header_the_client_did_not_send(
    echo_gateway: tuple[Echo, str], mint: Any
) -> None:
    echo, gateway = echo_gateway
    token = mint("teacher")
    request = (
        f"POST /api/v1/homework/raw HTTP/1.1\r\nHost: api.example\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 3\r\n"
        f"Connection: close, X-Drop-Me\r\nX-Drop-Me: 1\r\nTE: trailers\r\n\r\nabc"
    ).encode()
    status, headers, _ = await raw_request(gateway, request)
    assert status == 200
    got = echo.hits[-1]
    names = {k for k, _ in got["headers"]}
    # aiohttp would add Content-Type, Accept, Accept-Encoding and User-Agent by itself.
    assert not names & {"content-type", "accept", "accept-encoding", "user-agent"}, names
    # Hop-by-hop headers, also those the Connection header nominates, stay behind.
    assert not names & {"connection", "x-drop-me", "te"}
    assert header_values(got, "content-length") == ["3"]
    assert header_values(got, "x-forwarded-host") == ["api.example"]
    assert len(headers["x-request-id"][0]) >= 16


async def test_gw01_request_id_is_kept_when_the_client_sends_one(
    echo_gateway: tuple[Echo, str], mint: Any
) -> None:
    echo, gateway = echo_gateway
    async with httpx.AsyncClient(base_url=gateway) as client:
        response = await client.get(
            "/api/v1/homework/x", headers={**auth(mint("teacher")), "X-Request-ID": "trace-42.a"}
        )
        assert response.headers["x-request-id"] == "trace-42.a"
        assert header_values(echo.hits[-1], "x-request-id") == ["trace-42.a"]
        # A request id that could inject into logs is replaced, not forwarded.
        response = await client.get(
            "/api/v1/homework/x",
            headers={**auth(mint("teacher")), "X-Request-ID": "bad id\twith spaces"},
        )
        assert response.headers["x-request-id"] != "bad id\twith spaces"
        assert header_values(echo.hits[-1], "x-request-id") == [response.headers["x-request-id"]]


async def test_gw01_status_repeated_response_headers_and_streams_come_back(
    echo_gateway: tuple[Echo, str], mint: Any
) -> None:
    _, gateway = echo_gateway
    token = mint("teacher")
    request = (
        f"GET /api/v1/homework/cookies HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    ).encode()
    status, headers, body = await raw_request(gateway, request)
    assert status == 200
    assert headers["set-cookie"] == ["a=1; Path=/", "b=2; Path=/"]
    assert headers["x-multi"] == ["one", "two"]
    assert len(headers["date"]) == 1 and len(headers["x-request-id"]) == 1
    assert json.loads(body)["path"] == "/cookies"
    async with httpx.AsyncClient(base_url=gateway) as client:
        teapot = await client.get("/api/v1/homework/status/418", headers=auth(token))
        assert teapot.status_code == 418
        assert teapot.json()["path"] == "/status/418"
        created = await client.post(
            "/api/v1/homework/status/201", headers=auth(token), json={"a": 1}
        )
        assert created.status_code == 201
        head = await client.head("/api/v1/homework/x", headers=auth(token))
        assert head.status_code == 200 and head.content == b""
        async with client.stream("GET", "/api/v1/homework/stream", headers=auth(token)) as r:
            text = b"".join([c async for c in r.aiter_bytes()]).decode()
        assert text == "".join(f"chunk-{i}\n" for i in range(50))


async def test_gw01_body_over_the_limit_is_refused_before_the_service(
    echo_gateway: tuple[Echo, str], mint: Any
) -> None:
    echo, gateway = echo_gateway
    async with httpx.AsyncClient(base_url=gateway) as client:
        response = await client.post(
            "/api/v1/homework/upload", headers=auth(mint("teacher")), content=b"x" * (64 * 1024 + 1)
        )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert echo.hits == []


async def test_gw01_dot_segments_cannot_walk_out_of_a_public_prefix(
    echo_gateway: tuple[Echo, str],
) -> None:
    echo, gateway = echo_gateway
    for path in (
        "/api/v1/institutions/public/../admin/secrets",
        "/api/v1/institutions/public/%2e%2e/admin/secrets",
        "/api/v1/institutions/public/./x/../../admin",
    ):
        status, _, body = await raw_request(
            gateway, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert status in (400, 401), (path, status)
        assert json.loads(body)["status"] == status
    assert echo.hits == []


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw01_stopped_service_is_a_502_naming_it(
    make_gateway: MakeGateway, mint: Any
) -> None:
    gateway = await make_gateway(upstreams={"funds": dead_url()})
    response = await gateway.client.get("/api/v1/funds/accounts", headers=auth(mint("bank")))
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["service"] == "funds" and "funds" in problem["detail"]
    assert problem["status"] == 502 and problem["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw01_slow_service_is_a_504_after_its_own_timeout(
    served: Served, make_gateway: MakeGateway, mint: Any
) -> None:
    echo = Echo()
    upstream = await served.start(echo)
    gateway = await make_gateway(
        upstreams={"afterschool": upstream, "homework": upstream},
        upstream_timeouts={"afterschool": 0.3},
    )
    started = asyncio.get_running_loop().time()
    response = await gateway.client.get("/api/v1/afterschool/slow", headers=auth(mint("parent")))
    waited = asyncio.get_running_loop().time() - started
    assert response.status_code == 504
    assert response.json()["service"] == "afterschool"
    assert "超时" in response.json()["detail"]
    assert waited < 1.5
    # The per-upstream timeout is per upstream: homework keeps the default (15 s).
    fast = await gateway.client.get("/api/v1/homework/slow", headers=auth(mint("parent")))
    assert fast.status_code == 200


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw01_service_stopped_while_running_turns_into_502_then_recovers(
    served: Served, make_gateway: MakeGateway, mint: Any
) -> None:
    from launcher.nats_server import free_port

    port = free_port()
    echo = Echo()
    url = await served.start(echo, port=port)
    gateway = await make_gateway(upstreams={"institutions": url}, rate_limit_enabled=False)
    token = auth(mint("regulator"))
    assert (await gateway.client.get("/api/v1/institutions/x", headers=token)).status_code == 200
    await served.stop(url)  # the pooled keep-alive connection now leads nowhere
    for method in ("GET", "POST"):
        down = await gateway.client.request(method, "/api/v1/institutions/x", headers=token)
        assert down.status_code == 502, down.text
        assert down.json()["service"] == "institutions"
        assert "机构监管服务" in down.json()["detail"]
    await served.start(echo, port=port)
    assert (await gateway.client.get("/api/v1/institutions/x", headers=token)).status_code == 200
