"""The gateway: one door, `/api/v1/<service>/...`, to every service (GW-01).

A pure ASGI proxy on one pooled aiohttp session: the request body streams to
the upstream and the reply streams back; the Authorization header passes
unchanged because services verify tokens themselves.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from chassis.config import platform_settings
from chassis.errors import PROBLEM_MEDIA_TYPE, Problem, problem_body
from chassis.observability import configure_logging
from gateway.config import GatewaySettings

log = structlog.get_logger("gateway")

# RFC 9110 §7.6.1 connection-specific headers are not forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
SERVICE_NAMES_ZH = {
    "identity": "身份服务",
    "homework": "作业服务",
    "afterschool": "课后服务",
    "institutions": "机构监管服务",
    "funds": "资金监管服务",
}


def _problem(request: Request, problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem_body(request, problem),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem.headers,
    )


def create_app(settings: GatewaySettings | None = None) -> Starlette:
    settings = settings or GatewaySettings()
    upstreams = settings.upstreams()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        platform = platform_settings()
        configure_logging(platform.log_level, platform.log_json)
        connector = aiohttp.TCPConnector(limit=512, limit_per_host=256, ttl_dns_cache=300)
        app.state.http = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=settings.upstream_timeout_seconds, connect=settings.connect_timeout_seconds
            ),
        )
        try:
            yield
        finally:
            await app.state.http.close()

    async def proxy(request: Request) -> Response:
        service = request.path_params["service"]
        base = upstreams.get(service)
        if base is None:
            return _problem(request, Problem(404, f"没有名为 {service} 的服务。"))
        path = request.path_params["path"]
        url = f"{base}/{path}"
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        headers.append(("x-forwarded-for", request.client.host if request.client else ""))
        if "x-request-id" not in request.headers:
            headers.append(("x-request-id", request_id))
        body = await request.body()
        http: aiohttp.ClientSession = request.app.state.http
        try:
            upstream = await http.request(
                request.method,
                url,
                params=list(request.query_params.multi_items()),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except TimeoutError:
            return _problem(
                request,
                Problem(
                    504, f"{SERVICE_NAMES_ZH[service]}（{service}）响应超时。", service=service
                ),
            )
        except aiohttp.ClientError:
            return _problem(
                request,
                Problem(
                    502, f"{SERVICE_NAMES_ZH[service]}（{service}）暂不可用。", service=service
                ),
            )
        response_headers = {
            k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
        }
        response_headers["x-request-id"] = request_id

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            finally:
                upstream.release()

        return StreamingResponse(stream(), status_code=upstream.status, headers=response_headers)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        http: aiohttp.ClientSession = request.app.state.http

        async def check(name: str, base: str) -> tuple[str, str]:
            try:
                async with http.get(f"{base}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    return name, "ok" if r.status == 200 else f"status {r.status}"
            except (aiohttp.ClientError, TimeoutError):
                return name, "down"

        checks = dict(await asyncio.gather(*(check(n, b) for n, b in upstreams.items())))
        if all(v == "ok" for v in checks.values()):
            return JSONResponse({"status": "ready", "services": checks})
        body: dict[str, Any] = problem_body(
            request,
            Problem(503, "部分服务未就绪：" + "，".join(k for k, v in checks.items() if v != "ok")),
        )
        body["services"] = checks
        return JSONResponse(body, status_code=503, media_type=PROBLEM_MEDIA_TYPE)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/api/v1/{service}/{path:path}", proxy, methods=methods),
        ],
        lifespan=lifespan,
    )
