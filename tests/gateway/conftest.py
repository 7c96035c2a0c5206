"""Fixtures for gateway tests: real TCP upstreams (the gateway proxies over
TCP), an echo upstream, and gateways built with test settings."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from chassis.auth import StaticKeySource
from chassis.config import DOMAIN_SERVICES, PlatformSettings
from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.server import GatewayServer
from launcher.nats_server import free_port
from services.identity.tokens import TokenIssuer
from tests.conftest import AUDIENCE, ISSUER, DatabaseFactory

Serve = Callable[..., Awaitable[str]]


class Served:
    def __init__(self) -> None:
        self.servers: dict[str, tuple[uvicorn.Server, asyncio.Task[None]]] = {}
        self.fast: dict[str, tuple[GatewayServer, AsyncExitStack]] = {}

    async def start_gateway(self, app: Any, server: str = "fast") -> str:
        """The gateway as `shuangjian serve gateway` runs it (its own server,
        gateway/server.py), or on uvicorn (`server="uvicorn"`)."""
        if server == "uvicorn":
            return await self.start(app, lifespan="on")
        stack = AsyncExitStack()
        await stack.enter_async_context(app.router.lifespan_context(app))
        gateway = GatewayServer(app)
        port = await gateway.start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        self.fast[url] = (gateway, stack)
        return url

    async def start(self, app: Any, *, port: int = 0, lifespan: str = "off") -> str:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan=lifespan,
            log_level="warning",
            access_log=False,
            log_config=None,
            # A test that leaves a request in flight must not hold up the rest.
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server did not start")
            await asyncio.sleep(0.01)
        actual = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{actual}"
        self.servers[url] = (server, task)
        return url

    async def stop(self, url: str) -> None:
        if url in self.fast:
            gateway, stack = self.fast.pop(url)
            await gateway.shutdown()
            await stack.aclose()
            return
        server, task = self.servers.pop(url)
        server.should_exit = True
        await asyncio.wait_for(task, 30)

    async def stop_all(self) -> None:
        for url in [*self.fast, *list(self.servers)[::-1]]:
            await self.stop(url)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    s = Served()
    yield s
    await s.stop_all()


def dead_url() -> str:
    """An address where nothing listens (a stopped service)."""
    return f"http://127.0.0.1:{free_port()}"


class Echo:
    """An upstream that answers with what it received."""

    def __init__(self) -> None:
        self.hits: list[dict[str, Any]] = []
        self.url = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        record = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
            "query_string": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body_b64": base64.b64encode(body).decode(),
        }
        path = scope["path"]
        if path == "/openapi.json":  # the gateway's docs refresher; not a proxied call
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        self.hits.append(record)
        if path.startswith("/slow"):
            await asyncio.sleep(2.0)
        headers = [(b"content-type", b"application/json")]
        status = 200
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
        if path == "/cookies":
            headers += [
                (b"set-cookie", b"a=1; Path=/"),
                (b"set-cookie", b"b=2; Path=/"),
                (b"x-multi", b"one"),
                (b"x-multi", b"two"),
            ]
        if path == "/stream":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/plain")],
                }
            )
            for i in range(50):
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"chunk-{i}\n".encode(),
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": b""})
            return
        data = json.dumps(record).encode()
        if scope["method"] == "HEAD":
            data_out = b""
        else:
            data_out = data
        headers.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data_out})


@dataclass
class Gateway:
    app: Any
    client: httpx.AsyncClient
    settings: GatewaySettings

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime


MakeGateway = Callable[..., Awaitable[Gateway]]


def build_gateway_app(
    tmp_path: Path,
    issuer: TokenIssuer,
    *,
    upstreams: dict[str, str] | None = None,
    nats_url: str | None = None,
    name: str = "gateway",
    **overrides: Any,
) -> Any:
    """A gateway app with test settings: every upstream nowhere unless given,
    webhooks off unless asked for, tokens of the test issuer."""
    values: dict[str, Any] = {f"upstream_{n}": dead_url() for n in DOMAIN_SERVICES}
    values.update({f"upstream_{n}": u for n, u in (upstreams or {}).items()})
    values.update(
        webhooks_enabled=False,
        database_url=f"sqlite+aiosqlite:///{tmp_path / f'{name}.sqlite3'}",
        docs_retry_seconds=0.2,
        docs_fetch_timeout_seconds=2.0,
        redis_url="",
        access_log=False,
        webhook_allow_http=True,
        webhook_allow_private_targets=True,
    )
    values.update(overrides)
    settings = GatewaySettings(**values)
    platform = PlatformSettings(
        NATS_URL=nats_url or f"nats://127.0.0.1:{free_port()}",
        VAR_DIR=tmp_path / "var",
        AUTH_ISSUER=ISSUER,
        AUTH_AUDIENCE=AUDIENCE,
        LOG_LEVEL="WARNING",
    )
    return create_app(settings, platform=platform, key_source=StaticKeySource(issuer.jwks()))


@pytest.fixture
def gateway_server(request: pytest.FixtureRequest) -> str:
    """How `make_gateway` serves: "asgi" (httpx straight into the app) unless
    a test is parametrized indirectly with "fast" (gateway/server.py on a
    real socket, as `shuangjian serve gateway` runs it)."""
    return getattr(request, "param", "asgi")


@pytest.fixture
async def make_gateway(
    tmp_path: Path, issuer: TokenIssuer, databases: DatabaseFactory, gateway_server: str
) -> AsyncIterator[MakeGateway]:
    """A gateway run in-process (lifespan entered) with an httpx client over ASGI
    (or over TCP to its own server, see `gateway_server`).
    With webhooks on, its own database is a fresh one (PostgreSQL under
    TEST_DATABASE=postgresql, else a SQLite file)."""
    stack = AsyncExitStack()
    count = 0

    async def make(**kwargs: Any) -> Gateway:
        nonlocal count
        count += 1
        if kwargs.get("webhooks_enabled") and "database_url" not in kwargs:
            kwargs["database_url"] = await databases.url(f"gateway{count}")
        app = build_gateway_app(tmp_path, issuer, name=f"gateway-{count}", **kwargs)
        await stack.enter_async_context(app.router.lifespan_context(app))
        if gateway_server == "fast":
            server = GatewayServer(app)
            port = await server.start("127.0.0.1", 0)
            stack.push_async_callback(server.shutdown)
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
        else:
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=10
            )
        await stack.enter_async_context(client)
        return Gateway(app, client, app.state.runtime.settings)

    yield make
    await stack.aclose()


def client_token(
    issuer: TokenIssuer, client_id: str, tenants: list[str], scope: str = "webhooks"
) -> str:
    """An access token as identity issues it for a platform (client credentials)."""
    return issuer.access_token(
        subject=f"client:{client_id}",
        kind="client",
        roles=["platform"],
        tenants=tenants,
        scope=scope,
        client_id=client_id,
        name=f"平台 {client_id}",
    )
