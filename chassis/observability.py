"""JSON logs with request ids, Prometheus metrics, request-id propagation."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
REQUEST_ID_HEADER = b"x-request-id"

_configured = False


def configure_logging(level: str = "INFO", json: bool = True) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    logging.basicConfig(stream=sys.stdout, level=level.upper(), format="%(message)s")
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    processors.append(
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=True,
    )


def _add_request_id(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    rid = request_id_var.get()
    if rid and "request_id" not in event:
        event["request_id"] = rid
    return event


class Metrics:
    """Per-app registry so several apps can live in one test process."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route and status",
            ["service", "method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            ["service", "method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.events_published = Counter(
            "events_published_total",
            "Events published by the outbox relay",
            ["service"],
            registry=self.registry,
        )
        self.events_handled = Counter(
            "events_handled_total",
            "Events handled by consumers",
            ["service", "consumer", "outcome"],
            registry=self.registry,
        )
        self.service = service


class RequestContextMiddleware:
    """Request id in, request id out; access log line and metrics per request.

    A pure ASGI middleware: BaseHTTPMiddleware would cost a task per request.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.log = structlog.get_logger("access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for key, value in scope["headers"]:
            if key == REQUEST_ID_HEADER:
                request_id = value.decode("latin-1")[:128]
                break
        if not request_id:
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        status_holder = [500]
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            route_path = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(
                self.metrics.service, method, route_path, str(status_holder[0])
            ).inc()
            self.metrics.latency.labels(self.metrics.service, method, route_path).observe(elapsed)
            if self.access_log and route_path not in ("/metrics", "/healthz", "/readyz"):
                self.log.info(
                    "request",
                    method=method,
                    path=scope["path"],
                    route=route_path,
                    status=status_holder[0],
                    duration_ms=round(elapsed * 1000, 2),
                )
            request_id_var.reset(token)
