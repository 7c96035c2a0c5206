"""The service factory: every service is `create_service_app(ServiceSpec(...))`.

The lifespan opens the database (migrating it in the embedded mode), connects
to NATS in the background, and starts the outbox relay and the consumers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import MetaData

from chassis.auth import CachedVerifier, CurrentPrincipal, JwksKeySource, KeySource, TokenVerifier
from chassis.config import PlatformSettings, ServiceSettings, platform_settings, service_settings
from chassis.db import Database
from chassis.errors import PROBLEM_MEDIA_TYPE, ProblemDetail, install_problem_handlers
from chassis.events import Bus
from chassis.lifecycle import stop_within, tune_gc_for_serving
from chassis.messaging import EventConsumer, OutboxRelay, Subscription
from chassis.migrations import database_revisions, head_revisions, upgrade_async
from chassis.observability import Metrics, RequestContextMiddleware, configure_logging
from chassis.policy import PolicyRegistry
from chassis.scheduler import JobRunner, PeriodicJob, job_interval

log = structlog.get_logger("app")


@dataclass
class ServiceContext:
    """Everything a service's routes and use cases share at run time."""

    name: str
    settings: ServiceSettings
    platform: PlatformSettings
    db: Database
    bus: Bus
    metrics: Metrics
    policies: PolicyRegistry
    relay: OutboxRelay
    consumers: list[EventConsumer] = field(default_factory=list)
    jobs: dict[str, JobRunner] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    # The migration heads this code expects; /readyz compares the database.
    schema_heads: set[str] = field(default_factory=set)


@dataclass
class ServiceSpec:
    name: str
    title: str
    description: str
    routers: Sequence[APIRouter]
    metadata: MetaData
    migrations_dir: Path
    subscriptions: Sequence[Subscription] = ()
    openapi_tags: list[dict[str, Any]] = field(default_factory=list)
    # Service-specific start-up after the database is ready (e.g. signing keys).
    on_startup: Callable[[ServiceContext, FastAPI], Awaitable[None]] | None = None
    # Service-specific clean-up before the database closes (e.g. a held
    # connection), bounded like every other stop step.
    on_shutdown: Callable[[ServiceContext], Awaitable[None]] | None = None
    # Time-driven steps (deadlines, expiries, re-checks); see chassis.scheduler.
    periodic_jobs: Sequence[PeriodicJob] = ()
    version: str = "1.0.0"


def create_service_app(
    spec: ServiceSpec,
    *,
    settings: ServiceSettings | None = None,
    platform: PlatformSettings | None = None,
    key_source: KeySource | None = None,
) -> FastAPI:
    settings = settings or service_settings(spec.name)
    platform = platform or platform_settings()
    metrics = Metrics(spec.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(platform.log_level, platform.log_json)
        url = settings.resolved_database_url(platform)
        if settings.run_migrations:
            await upgrade_async(spec.migrations_dir, url)
        db = Database(url, service=spec.name, pool_size=settings.db_pool_size)
        bus = Bus(platform.nats_servers, name=spec.name)
        relay = OutboxRelay(
            db, bus, service=spec.name, metrics=metrics, batch_size=settings.relay_batch_size
        )
        ctx = ServiceContext(
            name=spec.name,
            settings=settings,
            platform=platform,
            db=db,
            bus=bus,
            metrics=metrics,
            policies=PolicyRegistry.load(),
            relay=relay,
            schema_heads=head_revisions(spec.migrations_dir),
        )
        app.state.ctx = ctx
        if not hasattr(app.state, "token_verifier"):
            app.state.token_verifier = CachedVerifier(
                TokenVerifier(
                    key_source or JwksKeySource(platform.auth_jwks_url),
                    issuer=platform.auth_issuer,
                    audience=platform.auth_audience,
                ),
                max_age=settings.token_cache_seconds,
            )
        if spec.on_startup is not None:
            await spec.on_startup(ctx, app)
        bus.start()
        relay.start()
        for subscription in spec.subscriptions:
            consumer = EventConsumer(db, bus, subscription, service=spec.name, metrics=metrics)
            consumer.start()
            ctx.consumers.append(consumer)
        for job in spec.periodic_jobs:
            interval = job_interval(job, settings.job_intervals)
            if interval > 0:
                runner = JobRunner(ctx, job, interval)
                runner.start()
                ctx.jobs[job.name] = runner
        if platform.gc_freeze:
            tune_gc_for_serving()
        log.info("service_started", service=spec.name, port=settings.port)
        try:
            yield
        finally:
            # Bounded (chassis.lifecycle): a stop that hangs must not keep the
            # process from exiting.
            for job_name, runner in ctx.jobs.items():
                await stop_within(runner.stop(), f"job {job_name}")
            for consumer in ctx.consumers:
                await stop_within(consumer.stop(), f"consumer {consumer.durable}")
            await stop_within(relay.stop(), "outbox relay")
            await stop_within(bus.close(), "nats")
            if spec.on_shutdown is not None:
                await stop_within(spec.on_shutdown(ctx), f"{spec.name} clean-up")
            await stop_within(db.dispose(), "database")
            log.info("service_stopped", service=spec.name)

    app = FastAPI(
        title=spec.title,
        description=spec.description,
        version=spec.version,
        lifespan=lifespan,
        openapi_tags=[*spec.openapi_tags, {"name": "运维", "description": "健康检查与指标"}],
        # The platform's metrics are Prometheus (chassis.observability), its
        # logs structlog: FastAPI's OpenTelemetry hooks stay off — otherwise
        # every request pays for looking up three OpenTelemetry providers.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    install_problem_handlers(app)
    app.include_router(_operations_router())
    for router in spec.routers:
        app.include_router(router)
    _install_openapi(app)
    return app


def _operations_router() -> APIRouter:
    router = APIRouter(tags=["运维"])

    @router.get("/healthz", summary="存活检查")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="就绪检查（数据库、表结构版本与消息总线）")
    async def readyz(request: Request) -> JSONResponse:
        ctx: ServiceContext | None = getattr(request.app.state, "ctx", None)
        checks: dict[str, str] = {}
        if ctx is None:
            checks["app"] = "starting"
        else:
            try:
                await ctx.db.ping()
                checks["database"] = "ok"
                # Not ready on a schema the code does not expect (the one-shot
                # migration has not run yet, or a newer one has).
                found = await database_revisions(ctx.db.engine)
                checks["schema"] = (
                    "ok"
                    if found == ctx.schema_heads
                    else f"mismatch: database {sorted(found) or 'empty'}, "
                    f"code {sorted(ctx.schema_heads)}"
                )
            except Exception as exc:
                checks["database"] = f"error: {type(exc).__name__}"
            checks["nats"] = "ok" if ctx.bus.connected else "disconnected"
        ready = all(v == "ok" for v in checks.values())
        if ready:
            return JSONResponse({"status": "ready", "checks": checks})
        return JSONResponse(
            {
                "type": "https://shuangjian.example/problems/unavailable",
                "title": "服务暂不可用",
                "status": 503,
                "detail": "服务尚未就绪：" + "，".join(f"{k}={v}" for k, v in checks.items()),
                "checks": checks,
            },
            status_code=503,
            media_type=PROBLEM_MEDIA_TYPE,
        )

    @router.get("/auth/whoami", summary="本服务验证令牌后看到的调用者")
    async def whoami(principal: CurrentPrincipal) -> dict[str, Any]:
        return {
            "subject": principal.subject,
            "kind": principal.kind,
            "roles": sorted(principal.roles),
            "tenants": sorted(principal.tenants),
            "scopes": sorted(principal.scopes),
            "person_id": principal.person_id,
        }

    @router.get("/metrics", summary="Prometheus 指标", response_class=Response)
    async def metrics(request: Request) -> Response:
        registry = request.app.state.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


_PROBLEM_STATUSES = {
    "400": "请求有误",
    "401": "未认证",
    "403": "无权访问",
    "404": "资源不存在",
    "409": "状态冲突",
    "422": "请求未通过校验，或被政策规则拒绝（见 rule）",
    "429": "请求过于频繁",
    "500": "服务器内部错误",
}


def _install_openapi(app: FastAPI) -> None:
    """Every operation documents its problem+json answers (RFC 9457)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version="3.1.0",
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        problem_schema = ProblemDetail.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        for name, definition in problem_schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas["ProblemDetail"] = problem_schema
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        ref = {"$ref": "#/components/schemas/ProblemDetail"}
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.setdefault("responses", {})
                for status, description in _PROBLEM_STATUSES.items():
                    if status in ("401", "403") and "security" not in operation:
                        continue
                    responses[status] = {
                        "description": description,
                        "content": {PROBLEM_MEDIA_TYPE: {"schema": ref}},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# Dependencies are `async def`: FastAPI runs plain `def` dependencies in its
# thread pool, a hop per request for what is an attribute read.
async def service_context(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


async def database(request: Request) -> Database:
    ctx: ServiceContext = request.app.state.ctx
    return ctx.db


async def policies(request: Request) -> PolicyRegistry:
    ctx: ServiceContext = request.app.state.ctx
    return ctx.policies


Ctx = Annotated[ServiceContext, Depends(service_context)]
DB = Annotated[Database, Depends(database)]
Policies = Annotated[PolicyRegistry, Depends(policies)]
