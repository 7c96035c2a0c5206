"""The hot path: the edge middleware and the forwarding endpoint, pure ASGI.

`EdgeMiddleware` wraps every request: request id in and out, then for
`/api/v1/<service>/...` the cheap refusals (unknown service, dot segments,
missing or invalid token unless the route is public, rate limits); at the
end one metrics observation and one access-log line.

`Proxy` forwards to `<upstream>/<rest>` on a keep-alive pool per upstream
(gateway/upstream.py, chosen over aiohttp's client by measurement): the raw
path and query string go as received (repeated keys, percent-encoding),
headers go in order and repeated, as bytes, minus hop-by-hop ones; the
Authorization header passes unchanged because services verify tokens
themselves.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chassis.auth import CachedVerifier, Principal
from chassis.errors import PROBLEM_MEDIA_TYPE, Problem, problem_body
from chassis.observability import request_id_var
from gateway.config import GATEWAY_SERVICE, GatewaySettings
from gateway.edge import IPNetwork, PublicRoutes, client_address, in_networks
from gateway.ratelimit import RateLimiter, retry_after_header
from gateway.telemetry import AccessLog, GatewayMetrics
from gateway.upstream import UpstreamError, UpstreamPool

log = structlog.get_logger("gateway")

SERVICE_NAMES_ZH = {
    "identity": "身份服务",
    "homework": "作业服务",
    "afterschool": "课后服务",
    "institutions": "机构监管服务",
    "funds": "资金监管服务",
    "gateway": "网关",
}
# RFC 9110 §7.6.1 connection-specific headers, and what the client sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
REQUEST_SKIP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-request-id",
    b"x-forwarded-for",
}
FORWARDED_OWN = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix"})
# uvicorn writes its own date and server headers; ours carries the request id.
RESPONSE_SKIP = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}
DEFAULT_TIMEOUT = 15.0
BUFFER_LIMIT = 1024 * 1024
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/readyz/self", "/metrics"})


@dataclass
class Runtime:
    """What the edge, the proxy and the gateway's own routes share."""

    settings: GatewaySettings
    upstreams: dict[str, str]
    metrics: GatewayMetrics
    access_log: AccessLog
    public: PublicRoutes
    trusted: tuple[IPNetwork, ...]
    metrics_networks: tuple[IPNetwork, ...]
    http: aiohttp.ClientSession | None = None
    verifier: CachedVerifier | None = None
    limiter: RateLimiter | None = None
    # The proxy's keep-alive pools and total timeouts, per upstream.
    pools: dict[str, UpstreamPool] = field(default_factory=dict)
    timeouts: dict[str, float] = field(default_factory=dict)
    # Set by the docs registry: route template for metrics, "seen up" hook.
    route_label: Callable[[str, str], str | None] = lambda service, path: None
    notice_up: Callable[[str], None] = lambda service: None
    extras: dict[str, Any] = field(default_factory=dict)
    proxy: Proxy | None = None

    @property
    def services(self) -> set[str]:
        return {*self.upstreams, GATEWAY_SERVICE}


_RID_PREFIX = f"{os.urandom(6).hex()}{int(time.time()):x}-"
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    """A request id unique per process and start: 12 random hex digits and
    the start time (hex seconds) chosen once per process, then a counter
    (e.g. `5f1c0e9a2b7d6921d4c0f-1a`). As unique as a uuid4 for correlating
    logs, without a getrandom call and 16 random bytes per request."""
    return f"{_RID_PREFIX}{next(_rid_counter):x}"


def problem_bytes(scope: Scope, problem: Problem) -> bytes:
    body = problem_body(None, problem)
    body["instance"] = scope.get("path", "")
    rid = scope.get("state", {}).get("request_id")
    if rid:
        body["request_id"] = rid
    return json.dumps(body, ensure_ascii=False).encode()


async def send_problem(scope: Scope, send: Send, problem: Problem) -> None:
    data = problem_bytes(scope, problem)
    headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(data)).encode()),
    ]
    for key, value in (problem.headers or {}).items():
        headers.append((key.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _bearer(value: bytes | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rt = self.rt
        start = time.perf_counter()
        rid: str | None = None
        authorization: bytes | None = None
        forwarded_for: str | None = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value.decode("latin-1")
            elif key == b"authorization":
                authorization = value
            elif key == b"x-forwarded-for":
                text = value.decode("latin-1")
                forwarded_for = f"{forwarded_for}, {text}" if forwarded_for else text
        if not rid or not REQUEST_ID_RE.match(rid):
            rid = new_request_id()
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["request_id"] = rid
        client = scope.get("client")
        peer = client[0] if client else ""
        ip = client_address(peer, forwarded_for, rt.trusted)
        state["peer"] = peer
        state["client_ip"] = ip
        state["forwarded_for"] = forwarded_for
        state["peer_trusted"] = bool(rt.trusted) and in_networks(peer, rt.trusted)
        ctx = request_id_var.set(rid)
        rid_header = (b"x-request-id", rid.encode("latin-1"))
        status = [0]  # 0 until the response starts

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        try:
            if scope["path"].startswith("/api/v1/"):
                problem = await self._edge(scope, state, authorization, ip)
                if problem is not None:
                    await send_problem(scope, send_wrapper, problem)
                    return
            if state.get("gw_service") in rt.upstreams and rt.proxy is not None:
                # The hot path goes straight to the proxy, past the router and
                # Starlette's exception middlewares (measurably cheaper).
                try:
                    await rt.proxy(scope, receive, send_wrapper)
                except Exception:
                    if status[0]:
                        raise  # the status is gone: the connection is cut short
                    await self._proxy_failed(scope, send_wrapper, state)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            self.record(scope, state, rid, ip, status[0] or 500, time.perf_counter() - start)
            request_id_var.reset(ctx)

    def record(
        self, scope: Scope, state: dict[str, Any], rid: str, ip: str, code: int, elapsed: float
    ) -> None:
        """One metrics observation and one access-log line (also used by
        gateway/server.py's fast path)."""
        rt = self.rt
        route = self._route(scope, state)
        rt.metrics.observe_request(scope["method"], route, code, elapsed)
        if rt.access_log.enabled and route not in QUIET_ROUTES:
            rt.access_log.request(
                rid,
                scope["method"],
                scope["path"],
                route,
                code,
                round(elapsed * 1000, 2),
                state.get("gw_service"),
                state.get("upstream_ms"),
                state.get("client_id"),
                ip,
            )

    def record_forward(
        self,
        method: str,
        path: str,
        service: str,
        rid: str,
        ip: str,
        code: int,
        elapsed: float,
        upstream_ms: float | None,
        client_id: str | None,
    ) -> None:
        """`record` for a request forwarded to a domain service, without a
        scope (gateway/server.py's callback path): the same route label,
        metrics observation and access-log line."""
        rt = self.rt
        route = rt.route_label(service, path[len(service) + 8 :]) or f"/api/v1/{service}/*"
        rt.metrics.observe_request(method, route, code, elapsed)
        if rt.access_log.enabled:
            rt.access_log.request(
                rid,
                method,
                path,
                route,
                code,
                round(elapsed * 1000, 2),
                service,
                upstream_ms,
                client_id,
                ip,
            )

    async def _proxy_failed(self, scope: Scope, send: Send, state: dict[str, Any]) -> None:
        service = state["gw_service"]
        log.exception("proxy_failed", upstream=service)
        name = SERVICE_NAMES_ZH.get(service, service)
        await send_problem(
            scope, send, Problem(502, f"{name}（{service}）暂不可用。", service=service)
        )

    async def _edge(
        self, scope: Scope, state: dict[str, Any], authorization: bytes | None, ip: str
    ) -> Problem | None:
        rt = self.rt
        path: str = scope["path"]
        parts = path.split("/", 4)  # "", "api", "v1", service, rest
        if len(parts) < 5:
            return None  # the router answers 404
        service, rest = parts[3], "/" + parts[4]
        if service not in rt.upstreams and service != GATEWAY_SERVICE:
            rt.metrics.reject("unknown_service")
            return Problem(404, f"没有名为 {service} 的服务。")
        if "/." in rest and any(seg in (".", "..") for seg in rest.split("/")):
            rt.metrics.reject("bad_path")
            return Problem(400, "请求路径不能包含“.”或“..”路径段。")
        state["gw_service"] = service
        method: str = scope["method"]
        client: str | None = None
        if not rt.public.matches(service, method, rest):
            token = _bearer(authorization)
            if token is None:
                rt.metrics.reject("missing_token")
                return await self._limited(method, path, None, ip) or Problem(
                    401,
                    "缺少访问令牌（Authorization: Bearer …）。",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            assert rt.verifier is not None
            try:
                principal: Principal = rt.verifier.cached(token) or await rt.verifier.verify(token)
            except Problem as problem:
                # Guessing tokens costs the address its tokens all the same.
                rt.metrics.reject("invalid_token")
                return await self._limited(method, path, None, ip) or problem
            state["principal"] = principal
            client = principal.client_id or principal.subject
            state["client_id"] = client
        return await self._limited(method, path, client, ip)

    async def _limited(self, method: str, path: str, client: str | None, ip: str) -> Problem | None:
        rt = self.rt
        if rt.limiter is None:
            return None
        limiter = rt.limiter
        decision = limiter.check_now(method, path, client, ip) or await limiter.check(
            method, path, client, ip
        )
        if decision.allowed:
            return None
        wait = retry_after_header(decision.retry_after)
        rt.metrics.rate_limited.labels(decision.rule, decision.scope).inc()
        rt.metrics.reject("rate_limited")
        who = "该客户端" if decision.scope == "client" else "该地址"
        return Problem(
            429,
            f"{who}请求过于频繁，请 {wait} 秒后再试。",
            rule="GW-04",
            headers={"Retry-After": wait},
            rate_limit=decision.rule,
            retry_after=int(wait),
        )

    def _route(self, scope: Scope, state: dict[str, Any]) -> str:
        service = state.get("gw_service")
        route = scope.get("route")
        route_path = getattr(route, "path", None)
        if service is None:
            return route_path or "unmatched"
        if service == GATEWAY_SERVICE:
            return f"/api/v1/gateway{route_path}" if route_path else "/api/v1/gateway/*"
        rest = scope["path"][len(service) + 8 :]
        return self.rt.route_label(service, rest) or f"/api/v1/{service}/*"


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


class Proxy:
    """ASGI endpoint of `/api/v1/{service}/{path}` for the domain services."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.rt
        state = scope["state"]
        service = state.get("gw_service") or scope["path_params"]["service"]
        pool = rt.pools.get(service)
        if pool is None:
            await send_problem(scope, send, Problem(404, f"没有名为 {service} 的服务。"))
            return
        limit = rt.settings.max_body_bytes
        method: str = scope["method"]
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge:
            await send_problem(
                scope, send, Problem(413, f"请求体过大（上限 {limit // (1024 * 1024)} MB）。")
            )
            return
        except ClientGone:
            return
        # The raw path and query go as received (percent-encoding, repeated keys).
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        pieces = raw_path.split(b"/", 4)
        target = b"/" + pieces[4] if len(pieces) == 5 else b"/"
        query: bytes = scope.get("query_string", b"")
        if query:
            target = target + b"?" + query
        headers = self._headers(scope, state, service)
        started = time.perf_counter()
        try:
            upstream = await pool.request(
                method, target, headers, body, rt.timeouts.get(service, DEFAULT_TIMEOUT)
            )
        except TimeoutError:
            await self._fail(scope, send, service, 504, started)
            return
        except UpstreamError:
            await self._fail(scope, send, service, 502, started)
            return
        elapsed = time.perf_counter() - started
        state["upstream_ms"] = round(elapsed * 1000, 2)
        rt.metrics.observe_upstream(service, upstream.status, elapsed)
        rt.notice_up(service)
        response_headers = [(k, v) for k, v in upstream.headers if k not in RESPONSE_SKIP]
        started_response = False
        try:
            length = upstream.length
            if upstream.complete or (length is not None and length <= BUFFER_LIMIT):
                data = upstream.take() if upstream.complete else await upstream.read()
                started_response = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": upstream.status,
                        "headers": response_headers,
                    }
                )
                await send({"type": "http.response.body", "body": data})
            else:
                started_response = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": upstream.status,
                        "headers": response_headers,
                    }
                )
                async for chunk in upstream.iter_chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (TimeoutError, UpstreamError) as exc:
            if not started_response:
                await self._fail(
                    scope, send, service, 504 if isinstance(exc, TimeoutError) else 502, started
                )
                return
            # Headers are gone already: all we can do is cut the response short.
            log.warning("upstream_body_failed", upstream=service, error=repr(exc))
            raise
        finally:
            upstream.release()

    def _headers(
        self, scope: Scope, state: dict[str, Any], service: str
    ) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        nominated: frozenset[bytes] | set[bytes] = frozenset()
        host = b""
        for key, value in raw:
            if key == b"connection":
                nominated = {t.strip().lower() for t in value.split(b",")}
            elif key == b"host":
                host = value
        skip = REQUEST_SKIP | nominated if nominated else REQUEST_SKIP
        if not state["peer_trusted"]:
            skip = skip | FORWARDED_OWN
        headers = [(k, v) for k, v in raw if k not in skip]
        present = {k for k, _ in headers if k in FORWARDED_OWN}
        peer = state["peer"]
        forwarded_for = state["forwarded_for"]
        xff = f"{forwarded_for}, {peer}" if forwarded_for else peer
        headers.append((b"x-forwarded-for", xff.encode("latin-1")))
        if b"x-forwarded-proto" not in present:
            headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")))
        if host and b"x-forwarded-host" not in present:
            headers.append((b"x-forwarded-host", host))
        if b"x-forwarded-prefix" not in present:
            headers.append((b"x-forwarded-prefix", b"/api/v1/" + service.encode("latin-1")))
        headers.append((b"x-request-id", state["request_id"].encode("latin-1")))
        return headers

    async def _fail(
        self, scope: Scope, send: Send, service: str, status: int, started: float
    ) -> None:
        await send_problem(scope, send, upstream_failure(self.rt, scope, service, status, started))


def upstream_failure(
    rt: Runtime, scope: Scope, service: str, status: int, started: float
) -> Problem:
    """The 502 (unreachable, broken) or 504 (too slow) naming the service."""
    elapsed = time.perf_counter() - started
    scope["state"]["upstream_ms"] = round(elapsed * 1000, 2)
    rt.metrics.observe_upstream(service, "timeout" if status == 504 else "error", None)
    name = SERVICE_NAMES_ZH.get(service, service)
    detail = f"{name}（{service}）响应超时。" if status == 504 else f"{name}（{service}）暂不可用。"
    return Problem(status, detail, service=service)
