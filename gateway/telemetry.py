"""Gateway metrics (per route and per upstream) and the JSON access log."""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import Counter, Gauge, Histogram

from chassis.observability import Metrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GatewayMetrics(Metrics):
    """The chassis' http_* metrics plus the gateway's own; label children are
    cached so the hot path does one dict look-up per series."""

    def __init__(self) -> None:
        super().__init__("gateway")
        r = self.registry
        self.upstream_requests = Counter(
            "gateway_upstream_requests_total",
            "Requests forwarded, by upstream and status",
            ["upstream", "status"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_duration_seconds",
            "Time until the upstream's response headers, by upstream",
            ["upstream"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.edge_rejections = Counter(
            "gateway_edge_rejections_total",
            "Requests refused at the edge (unauthenticated, rate limited, bad path)",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited_total",
            "Requests refused by a rate limit, by rule and bucket",
            ["rule", "scope"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "gateway_webhook_attempts_total",
            "Webhook delivery attempts by outcome",
            ["outcome"],
            registry=r,
        )
        self.webhook_latency = Histogram(
            "gateway_webhook_duration_seconds",
            "Webhook delivery attempt duration",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.webhook_pending = Gauge(
            "gateway_webhook_pending",
            "Webhook deliveries waiting (last dispatcher pass)",
            registry=r,
        )
        self.docs_services = Gauge(
            "gateway_openapi_services",
            "1 when the service's OpenAPI is in the merged document",
            ["upstream"],
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = ("r", method, route, status)
        pair = self._children.get(key)
        if pair is None:
            pair = (
                self.requests.labels("gateway", method, route, str(status)),
                self.latency.labels("gateway", method, route),
            )
            self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def observe_upstream(self, upstream: str, status: int | str, seconds: float | None) -> None:
        key = ("u", upstream, status)
        pair = self._children.get(key)
        if pair is None:
            pair = (
                self.upstream_requests.labels(upstream, str(status)),
                self.upstream_latency.labels(upstream),
            )
            self._children[key] = pair
        pair[0].inc()
        if seconds is not None:
            pair[1].observe(seconds)

    def reject(self, reason: str) -> None:
        key = ("e", reason)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.edge_rejections.labels(reason)
        child.inc()


class AccessLog:
    """One JSON line per request; replaceable in tests (`sink`)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._log = structlog.get_logger("gateway.access")
        self.sink: Any = None

    def __call__(self, **fields: Any) -> None:
        if not self.enabled:
            return
        if self.sink is not None:
            self.sink(fields)
            return
        self._log.info("request", **fields)
