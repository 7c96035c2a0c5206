"""The gateway: one door, `/api/v1/<service>/...`, to every service (GW-01..GW-05).

A pure ASGI proxy on keep-alive pools per upstream (see proxy.py) behind a
pure ASGI edge middleware: request ids, token check, rate limits, metrics
and access logs. Beside it: the merged OpenAPI document and its docs pages,
the AsyncAPI document of the integration events, aggregated readiness, and
the webhook subscriptions API (`/api/v1/gateway/webhooks/...`) with the
JetStream consumers and the dispatcher that deliver signed webhooks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from chassis.auth import CachedVerifier, JwksKeySource, KeySource, TokenVerifier
from chassis.config import PlatformSettings, platform_settings
from chassis.db import Database
from chassis.errors import PROBLEM_MEDIA_TYPE, Problem, problem_body
from chassis.events import Bus
from chassis.lifecycle import bounded, tune_gc_for_serving
from chassis.messaging import EventConsumer
from chassis.migrations import upgrade_async
from chassis.observability import configure_logging
from contracts.base import EVENT_TYPES
from gateway import asyncapi, docs
from gateway.config import GatewaySettings
from gateway.edge import PublicRoutes, in_networks, parse_networks
from gateway.proxy import EdgeMiddleware, Proxy, Runtime
from gateway.ratelimit import BucketStore, MemoryBuckets, RateLimiter, RedisBuckets
from gateway.telemetry import AccessLog, GatewayMetrics
from gateway.upstream import UpstreamPool
from gateway.webhooks.api import WebhookContext, create_api
from gateway.webhooks.dispatcher import Dispatcher
from gateway.webhooks.intake import Intake
from gateway.webhooks.tenants import TenantGraph

log = structlog.get_logger("gateway")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
READY_CACHE_SECONDS = 1.0


def _problem(request: Request, problem: Problem, **extra: Any) -> JSONResponse:
    body = problem_body(request, problem)
    body.update(extra)
    return JSONResponse(
        body, status_code=problem.status, media_type=PROBLEM_MEDIA_TYPE, headers=problem.headers
    )


class GatewayApp(Starlette):
    """Starlette with the edge outermost: every HTTP request passes the edge
    (request id, token, rate limit, metrics, access log), and a forwarded one
    goes from there straight to the proxy, never entering Starlette's
    middleware stack and router (measurably cheaper per request)."""

    edge: EdgeMiddleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["app"] = self
            await self.edge(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def create_app(
    settings: GatewaySettings | None = None,
    *,
    platform: PlatformSettings | None = None,
    key_source: KeySource | None = None,
) -> GatewayApp:
    settings = settings or GatewaySettings()
    upstreams = settings.upstreams()
    metrics = GatewayMetrics()
    public = PublicRoutes(settings.public_routes)
    rt = Runtime(
        settings=settings,
        upstreams=upstreams,
        metrics=metrics,
        access_log=AccessLog(settings.access_log),
        public=public,
        trusted=parse_networks(settings.trusted_proxies),
        metrics_networks=parse_networks(settings.metrics_networks),
    )
    rt.proxy = Proxy(rt)
    api = create_api()
    api.state.webhook_scope = settings.webhook_scope

    def docs_changed(_: set[str]) -> None:
        for name in upstreams:
            metrics.docs_services.labels(name).set(1 if name in registry.specs else 0)

    registry = docs.DocsRegistry(
        settings, upstreams, own_spec=api.openapi, public=public, on_change=docs_changed
    )
    rt.route_label = registry.route_label
    rt.notice_up = registry.notice_up
    asyncapi_cache: dict[str, Any] = {}
    ready_cache: dict[str, Any] = {"at": 0.0, "services": {}}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        plat = platform or platform_settings()
        rt.extras["platform"] = plat
        configure_logging(plat.log_level, plat.log_json)
        rt.access_log.configure(json_lines=plat.log_json, level=plat.log_level)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(rt.access_log.close)
            rt.timeouts = {name: settings.timeout_for(name) for name in upstreams}
            rt.pools = {
                name: UpstreamPool(base, connect_timeout=settings.connect_timeout_seconds)
                for name, base in upstreams.items()
            }
            for pool in rt.pools.values():
                stack.push_async_callback(pool.close)
            connector = aiohttp.TCPConnector(
                limit=1024, limit_per_host=512, ttl_dns_cache=300, keepalive_timeout=4.0
            )
            rt.http = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # never carry one caller's cookies to another
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                trust_env=False,
            )
            stack.push_async_callback(bounded(rt.http.close, "rt.http.close"))
            rt.verifier = CachedVerifier(
                TokenVerifier(
                    key_source or JwksKeySource(plat.auth_jwks_url),
                    issuer=plat.auth_issuer,
                    audience=plat.auth_audience,
                ),
                size=settings.token_cache_size,
            )
            if settings.rate_limit_enabled:
                store: BucketStore = (
                    RedisBuckets(settings.redis_url, prefix=settings.redis_key_prefix)
                    if settings.redis_url
                    else MemoryBuckets()
                )
                rt.limiter = RateLimiter(settings.rate_limits, store)
                stack.push_async_callback(bounded(rt.limiter.close, "rt.limiter.close"))
            registry.start(rt.http)
            stack.push_async_callback(bounded(registry.stop, "registry.stop"))
            if settings.webhooks_enabled:
                await _start_webhooks(stack, settings, plat, rt, api)
            if plat.gc_freeze:
                tune_gc_for_serving()
            log.info(
                "gateway_started",
                port=settings.port,
                upstreams=upstreams,
                redis=bool(settings.redis_url),
                webhooks=settings.webhooks_enabled,
            )
            yield
        log.info("gateway_stopped")

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def own_checks() -> dict[str, str]:
        checks: dict[str, str] = {}
        db: Database | None = rt.extras.get("db")
        if db is not None:
            try:
                await asyncio.wait_for(db.ping(), 2)
                checks["database"] = "ok"
            except Exception as exc:
                checks["database"] = f"error: {type(exc).__name__}"
        bus: Bus | None = rt.extras.get("bus")
        if bus is not None:
            checks["nats"] = "ok" if bus.connected else "disconnected"
        store = rt.limiter.store if rt.limiter is not None else None
        if isinstance(store, RedisBuckets):
            checks["redis"] = "ok" if await store.ping() else "down"
        return checks

    async def service_checks() -> dict[str, str]:
        if time.monotonic() - ready_cache["at"] < READY_CACHE_SECONDS:
            return dict(ready_cache["services"])
        assert rt.http is not None
        http = rt.http

        async def check(name: str, base: str) -> tuple[str, str]:
            try:
                async with http.get(f"{base}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        rt.notice_up(name)
                        return name, "ok"
                    return name, f"status {r.status}"
            except (aiohttp.ClientError, TimeoutError):
                return name, "down"

        services = dict(await asyncio.gather(*(check(n, b) for n, b in upstreams.items())))
        ready_cache.update(at=time.monotonic(), services=services)
        return services

    async def readyz(request: Request) -> Response:
        services, own = await asyncio.gather(service_checks(), own_checks())
        if all(v == "ok" for v in services.values()) and all(v == "ok" for v in own.values()):
            return JSONResponse({"status": "ready", "services": services, "gateway": own})
        down = [k for k, v in services.items() if v != "ok"]
        down += [f"网关的{k}" for k, v in own.items() if v != "ok"]
        return _problem(
            request,
            Problem(503, "部分服务未就绪：" + "，".join(down) + "。"),
            services=services,
            gateway=own,
        )

    async def readyz_self(request: Request) -> Response:
        own = await own_checks()
        if all(v == "ok" for v in own.values()):
            return JSONResponse({"status": "ready", "gateway": own})
        return _problem(request, Problem(503, "网关自身未就绪。"), gateway=own)

    async def metrics_endpoint(request: Request) -> Response:
        state = request.scope.get("state", {})
        if state.get("forwarded_for") or not in_networks(
            state.get("peer", ""), rt.metrics_networks
        ):
            return _problem(request, Problem(404))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(_: Request) -> Response:
        return Response(registry.document_bytes, media_type="application/json")

    async def swagger(_: Request) -> Response:
        return HTMLResponse(docs.swagger_html())

    async def swagger_redirect(_: Request) -> Response:
        return HTMLResponse(docs.swagger_redirect_html())

    async def redoc(_: Request) -> Response:
        return HTMLResponse(docs.redoc_html())

    def asyncapi_doc() -> dict[str, Any]:
        key = len(EVENT_TYPES)
        if asyncapi_cache.get("key") != key:
            plat = rt.extras.get("platform") or platform_settings()
            doc = asyncapi.build_asyncapi(EVENT_TYPES, nats_url=plat.nats_url)
            asyncapi_cache.update(key=key, doc=doc, html=asyncapi.render_html(doc))
        return asyncapi_cache

    async def asyncapi_json(_: Request) -> Response:
        return JSONResponse(asyncapi_doc()["doc"])

    async def asyncapi_page(_: Request) -> Response:
        return HTMLResponse(asyncapi_doc()["html"])

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return _problem(request, Problem(status, headers=getattr(exc, "headers", None)))

    app = GatewayApp(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/readyz/self", readyz_self),
            Route("/metrics", metrics_endpoint),
            Route("/openapi.json", openapi_json),
            Route("/docs", swagger),
            Route("/docs/oauth2-redirect", swagger_redirect),
            Route("/redoc", redoc),
            Route("/asyncapi.json", asyncapi_json),
            Route("/asyncapi", asyncapi_page),
            Mount("/api/v1/gateway", app=api),
            Route("/api/v1/{service}/{path:path}", rt.proxy),
        ],
        exception_handlers={HTTPException: http_error, Exception: http_error},
        lifespan=lifespan,
    )
    app.edge = EdgeMiddleware(app.inner, runtime=rt)
    app.state.runtime = rt
    app.state.docs = registry
    app.state.webhooks_api = api
    return app


async def _start_webhooks(
    stack: AsyncExitStack, settings: GatewaySettings, plat: PlatformSettings, rt: Runtime, api: Any
) -> None:
    url = settings.resolved_database_url(plat)
    if settings.run_migrations:
        await upgrade_async(MIGRATIONS_DIR, url)
    db = Database(url, service="gateway", pool_size=settings.db_pool_size)
    stack.push_async_callback(bounded(db.dispose, "db.dispose"))
    rt.extras["db"] = db
    graph = TenantGraph()
    await graph.load(db)
    dispatcher = Dispatcher(db, settings, rt.metrics)
    dispatcher.start()
    stack.push_async_callback(bounded(dispatcher.stop, "dispatcher.stop"))
    bus = Bus(plat.nats_servers, name="gateway")
    bus.start()
    stack.push_async_callback(bounded(bus.close, "bus.close"))
    rt.extras["bus"] = bus
    intake = Intake(settings, graph, dispatcher.wake)
    for subscription in intake.subscriptions():
        consumer = EventConsumer(db, bus, subscription, service="gateway", metrics=rt.metrics)
        consumer.start()
        stack.push_async_callback(bounded(consumer.stop, "consumer.stop"))
    rt.extras.update(dispatcher=dispatcher, intake=intake, graph=graph)
    api.state.webhooks = WebhookContext(db=db, settings=settings, wake=dispatcher.wake)
