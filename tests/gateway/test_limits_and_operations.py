"""GW-04: token-bucket rate limits with Retry-After (in memory, and shared
through Redis), request ids, aggregated readiness, Prometheus metrics and
JSON access logs."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import Limit, RateLimitRule
from gateway.ratelimit import MemoryBuckets, RateLimiter, RedisBuckets
from launcher.nats_server import free_port
from tests.gateway.conftest import Echo, Gateway, MakeGateway, Served, dead_url
from tests.support import auth, eventually


def rule(
    name: str,
    path: str,
    *,
    client: tuple[float, int] | None = None,
    ip: tuple[float, int] | None = None,
    methods: list[str] | None = None,
) -> RateLimitRule:
    return RateLimitRule(
        name=name,
        path=path,
        methods=methods or ["*"],
        per_client=Limit(per_second=client[0], burst=client[1]) if client else None,
        per_ip=Limit(per_second=ip[0], burst=ip[1]) if ip else None,
    )


@pytest.fixture
async def echo(served: Served) -> Echo:
    e = Echo()
    e.url = await served.start(e)
    return e


def assert_429(response: Any, rule_name: str) -> int:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    wait = int(response.headers["retry-after"])
    assert wait >= 1
    problem = response.json()
    assert problem["status"] == 429 and problem["rule"] == "GW-04"
    assert problem["rate_limit"] == rule_name and problem["retry_after"] == wait
    assert "请求过于频繁" in problem["detail"]
    return wait


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw04_per_client_bucket_refuses_with_retry_after_and_refills(
    echo: Echo, make_gateway: MakeGateway, mint: Any
) -> None:
    gateway = await make_gateway(
        upstreams={"homework": echo.url},
        rate_limits=[rule("default", "/api/v1/**", client=(2.0, 3))],
    )
    alice = auth(mint("teacher", subject="alice"))
    bob = auth(mint("teacher", subject="bob"))
    for _ in range(3):
        assert (await gateway.client.get("/api/v1/homework/x", headers=alice)).status_code == 200
    refused = await gateway.client.get("/api/v1/homework/x", headers=alice)
    assert_429(refused, "default")
    assert len(echo.hits) == 3, "a refused request never reaches the service"
    # Another client has its own bucket.
    assert (await gateway.client.get("/api/v1/homework/x", headers=bob)).status_code == 200
    # 2 tokens a second: after half a second alice may go again, once.
    await asyncio.sleep(0.6)
    assert (await gateway.client.get("/api/v1/homework/x", headers=alice)).status_code == 200
    assert (await gateway.client.get("/api/v1/homework/x", headers=alice)).status_code == 429


async def test_gw04_login_and_complaints_are_stricter_per_address_by_default(
    echo: Echo, make_gateway: MakeGateway, mint: Any
) -> None:
    gateway = await make_gateway(upstreams={"identity": echo.url, "institutions": echo.url})
    settings = gateway.settings
    login = next(r for r in settings.rate_limits if r.name == "login")
    default = next(r for r in settings.rate_limits if r.name == "default")
    assert login.per_ip is not None and default.per_ip is not None
    assert login.per_ip.burst < default.per_ip.burst
    statuses = []
    for i in range(login.per_ip.burst + 1):
        # A client cannot reset its address by claiming another one: the
        # peer is not a trusted proxy, so X-Forwarded-For is not believed.
        response = await gateway.client.post(
            "/api/v1/identity/oauth/token",
            data={"grant_type": "password", "username": "x", "password": "y"},
            headers={"X-Forwarded-For": f"10.0.0.{i}"},
        )
        statuses.append(response.status_code)
    assert statuses[:-1] == [200] * login.per_ip.burst
    wait = assert_429(response, "login")
    assert wait >= 2  # 20 a minute: seconds, not milliseconds
    # Other routes are not affected by the login bucket.
    other = await gateway.client.get("/api/v1/identity/x", headers=auth(mint("bureau")))
    assert other.status_code == 200
    complaints = next(r for r in settings.rate_limits if r.name == "complaints")
    assert complaints.per_ip is not None
    for _ in range(complaints.per_ip.burst):
        ok = await gateway.client.post("/api/v1/institutions/public/complaints", json={})
        assert ok.status_code == 200
    assert_429(
        await gateway.client.post("/api/v1/institutions/public/complaints", json={}), "complaints"
    )


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw04_guessing_tokens_spends_the_address_bucket(
    echo: Echo, make_gateway: MakeGateway
) -> None:
    gateway = await make_gateway(
        upstreams={"funds": echo.url},
        rate_limits=[rule("default", "/api/v1/**", client=(100, 100), ip=(0.5, 3))],
    )
    statuses = [
        (await gateway.client.get("/api/v1/funds/x", headers=auth(f"guess-{i}"))).status_code
        for i in range(4)
    ]
    assert statuses == [401, 401, 401, 429]


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw04_trusted_proxy_forwarded_address_is_the_bucket_key(
    echo: Echo, make_gateway: MakeGateway
) -> None:
    gateway = await make_gateway(
        upstreams={"identity": echo.url},
        trusted_proxies=["127.0.0.0/8"],
        rate_limits=[rule("login", "/api/v1/identity/oauth/token", ip=(0.1, 1))],
    )
    # httpx's ASGI transport reports the peer as 127.0.0.1: a trusted proxy.
    for address in ("203.0.113.1", "203.0.113.2"):
        ok = await gateway.client.post(
            "/api/v1/identity/oauth/token", headers={"X-Forwarded-For": address}
        )
        assert ok.status_code == 200
    again = await gateway.client.post(
        "/api/v1/identity/oauth/token", headers={"X-Forwarded-For": "203.0.113.1"}
    )
    assert_429(again, "login")


def test_gw04_memory_bucket_arithmetic() -> None:
    store = MemoryBuckets()
    buckets = [("c", 1.0, 2), ("ip", 10.0, 5)]
    assert store.take_now(buckets, 0.0) == (0.0, -1)
    assert store.take_now(buckets, 0.0) == (0.0, -1)
    wait, dry = store.take_now(buckets, 0.0)
    assert dry == 0 and wait == pytest.approx(1.0)
    # A refused request takes nothing from the other bucket either.
    assert store._state["ip"][0] == pytest.approx(3.0)
    wait, dry = store.take_now(buckets, 0.5)
    assert dry == 0 and wait == pytest.approx(0.5)
    assert store.take_now(buckets, 1.0) == (0.0, -1)


# ------------------------------------------------------------------ Redis


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A Redis of our own when `redis-server` is installed, else the one at
    127.0.0.1:6379 if it answers."""
    binary = shutil.which("redis-server")
    if binary:
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                if _answers(port):
                    break
                await asyncio.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)
        return
    if not _answers(6379):
        pytest.skip("no redis-server binary and nothing answers at 127.0.0.1:6379")
    yield "redis://127.0.0.1:6379/0"


async def test_gw04_replicas_share_buckets_through_redis(
    echo: Echo, make_gateway: MakeGateway, mint: Any, redis_url: str
) -> None:
    prefix = f"gw:test:{uuid.uuid4().hex[:8]}:"
    rules = [rule("default", "/api/v1/**", client=(0.5, 4))]
    one, two = [
        await make_gateway(
            upstreams={"homework": echo.url},
            rate_limits=rules,
            redis_url=redis_url,
            redis_key_prefix=prefix,
        )
        for _ in range(2)
    ]
    assert isinstance(one.runtime.limiter.store, RedisBuckets)
    token = auth(mint("parent", subject="parent-1"))
    statuses = []
    for i in range(6):
        replica = (one, two)[i % 2]
        statuses.append((await replica.client.get("/api/v1/homework/x", headers=token)).status_code)
    # Four tokens in all, whichever replica answers.
    assert statuses == [200, 200, 200, 200, 429, 429]
    refused = await two.client.get("/api/v1/homework/x", headers=token)
    assert_429(refused, "default")
    ready = await one.client.get("/readyz/self")
    assert ready.json()["gateway"]["redis"] == "ok"


async def test_gw04_redis_unreachable_falls_back_to_limiting_in_memory() -> None:
    store = RedisBuckets(f"redis://127.0.0.1:{free_port()}/0", fallback_seconds=30)
    limiter = RateLimiter([rule("default", "/api/v1/**", client=(0.1, 2))], store)
    try:
        decisions = [
            await limiter.check("GET", "/api/v1/funds/x", "c1", "1.2.3.4") for _ in range(3)
        ]
        assert [d.allowed for d in decisions] == [True, True, False]
        assert decisions[-1].retry_after > 5
        assert not await store.ping()
    finally:
        await limiter.close()


# ------------------------------------------------------------------ operations


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw04_readyz_names_the_services_that_are_down(
    echo: Echo, make_gateway: MakeGateway
) -> None:
    # The Echo answers 200 on /readyz: "up"; the rest point nowhere.
    gateway = await make_gateway(upstreams={"identity": echo.url, "funds": dead_url()})
    response = await gateway.client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["services"]["identity"] == "ok"
    assert body["services"]["funds"] == "down"
    assert "funds" in body["detail"] and "identity" not in body["detail"]


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw04_metrics_per_route_and_upstream_and_access_log_lines(
    echo: Echo, make_gateway: MakeGateway, mint: Any
) -> None:
    gateway: Gateway = await make_gateway(
        upstreams={"homework": echo.url, "funds": dead_url()}, access_log=True
    )
    lines: list[dict[str, Any]] = []
    gateway.runtime.access_log.sink = lines.append
    token = mint("teacher", subject="teacher-7")
    ok = await gateway.client.get("/api/v1/homework/things/1", headers=auth(token))
    assert ok.status_code == 200
    down = await gateway.client.get("/api/v1/funds/accounts", headers=auth(token))
    assert down.status_code == 502
    refused = await gateway.client.get("/api/v1/homework/things/1")
    assert refused.status_code == 401

    text = (await gateway.client.get("/metrics")).text
    assert 'gateway_upstream_requests_total{status="200",upstream="homework"} 1.0' in text
    assert 'gateway_upstream_requests_total{status="error",upstream="funds"} 1.0' in text
    assert 'gateway_upstream_duration_seconds_count{upstream="homework"} 1.0' in text
    assert 'gateway_edge_rejections_total{reason="missing_token"} 1.0' in text
    assert "http_requests_total" in text and 'status="502"' in text
    # Not through a proxy: /metrics is for the platform's own scrapers.
    hidden = await gateway.client.get("/metrics", headers={"X-Forwarded-For": "198.51.100.7"})
    assert hidden.status_code == 404

    await eventually(lambda: asyncio.sleep(0, len(lines) >= 3), timeout=2)
    by_status = {line["status"]: line for line in lines}
    line = by_status[200]
    assert line["request_id"] == ok.headers["x-request-id"]
    assert line["client_id"] == "teacher-7"
    assert line["upstream"] == "homework" and line["upstream_ms"] >= 0
    assert line["method"] == "GET" and line["duration_ms"] >= line["upstream_ms"]
    assert by_status[502]["upstream"] == "funds"
    assert by_status[401]["client_id"] is None
    assert by_status[401]["request_id"] == refused.headers["x-request-id"]
