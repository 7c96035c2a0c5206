"""The gateway's own HTTP/1.1 server: an `asyncio.Protocol` with the
httptools (llhttp) request parser, in place of uvicorn under
`shuangjian serve gateway`.

Why: measured with `bench/gateway.py`, the gateway on uvicorn cost about as
much CPU per forwarded request as the service behind it (uvicorn alone is
about a third of that: its ASGI scope, message dicts, send/receive
callables and flow control per request), so on one core the gateway could
not reach half of the direct service's throughput.

Two paths:

- The fast path, `/api/v1/<service>/<rest>` for a configured upstream:
  parsed here and handled without ASGI. The edge decides exactly as
  `EdgeMiddleware` does (the same code: request id, unknown service, dot
  segments, token through the verifier's cache, public routes, rate
  limits), the request is forwarded with `Proxy`'s header rewriting on the
  upstream pool, and the response is written with one `write` when it is
  buffered (chunked when it streams). One metrics observation and one
  access-log line per request, as on the ASGI path.
- Everything else (`/healthz`, `/readyz`, `/metrics`, the docs, the webhook
  API under `/api/v1/gateway`, unknown paths) goes to the gateway's
  Starlette app through a small ASGI bridge in this module, so the app's
  edge and routes answer it as they do under uvicorn.

The app's lifespan (pools, verifier, rate limiter, docs refresher,
webhooks) runs around the server. Requests on one connection are answered
in order (pipelining is safe: parsed requests queue, reading pauses when
too many wait). A request with a malformed head gets a 400 problem+json
and the connection closes; a body over `max_body_bytes` a 413.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import time
from collections.abc import MutableMapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import httptools
import structlog

from chassis.errors import PROBLEM_MEDIA_TYPE, Problem
from chassis.observability import request_id_var
from gateway.edge import client_address, in_networks
from gateway.proxy import (
    BUFFER_LIMIT,
    DEFAULT_TIMEOUT,
    FORWARDED_OWN,
    HOP_BY_HOP,
    REQUEST_ID_RE,
    REQUEST_SKIP,
    SERVICE_NAMES_ZH,
    _bearer,
    new_request_id,
    problem_bytes,
    upstream_failure,
)
from gateway.upstream import (
    BODY_METHODS,
    IDEMPOTENT,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    _Conn,
    _StaleConnection,
)

if TYPE_CHECKING:
    from gateway.app import GatewayApp

log = structlog.get_logger("gateway.server")

# Upstream response headers the fast path does not pass on: hop-by-hop ones,
# and those it writes itself (framing, date, the request id).
RESPONSE_SKIP = HOP_BY_HOP | {b"date", b"server", b"x-request-id", b"content-length"}
MAX_HEAD = 64 * 1024  # request line and headers; beyond: 400
MAX_HEADERS = 256
MAX_QUEUED = 16  # parsed requests waiting on one connection before reading pauses
_REASONS = {s.value: f"{s.value} {s.phrase}".encode() for s in HTTPStatus}
PROBLEM_TYPE = PROBLEM_MEDIA_TYPE.encode()
REQUEST_SKIP_UNTRUSTED = REQUEST_SKIP | FORWARDED_OWN
_METHODS = {m: m.encode() + b" " for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")}


def status_line(status: int) -> bytes:
    reason = _REASONS.get(status)
    return b"HTTP/1.1 " + (reason if reason is not None else str(status).encode() + b" ") + b"\r\n"


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self.second = 0
        self.value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.value


class Request:
    __slots__ = (
        "bad",
        "body",
        "chunks",
        "expect_continue",
        "head_size",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "size",
        "too_large",
        "url",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.body = b""
        self.method = "GET"
        self.http_version = "1.1"
        self.keep_alive = True
        self.too_large = False
        self.bad = ""
        self.expect_continue = False
        self.head_size = 0


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: GatewayServer) -> None:
        self.srv = server
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.current: Request | None = None
        self.queue: collections.deque[Request] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.busy = False  # a request is being answered
        self.closed = False
        self.paused_reading = False
        self.peer = ""
        self.client: tuple[str, int] | None = None
        self.sockname: tuple[str, int] | None = None
        self.peer_trusted = False
        self.last = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._lost: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
            self.peer = self.client[0]
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple) and len(sock) >= 2:
            self.sockname = (str(sock[0]), int(sock[1]))
        trusted = self.srv.rt.trusted
        self.peer_trusted = bool(trusted) and in_networks(self.peer, trusted)
        self.last = self.srv.loop.time()
        self.srv.conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.last = self.srv.loop.time()
        if self.parser is None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad("不支持协议升级。")
        except httptools.HttpParserError:
            self._bad("请求格式错误。")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.srv.conns.discard(self)
        # The parser holds this protocol's callbacks (bound methods): a cycle
        # the garbage collector alone would free, a dozen objects per closed
        # connection that swelled the gateway's middle collections (1,800
        # closed connections in one, 30-40 ms pauses). Broken here, a closed
        # connection is freed as soon as nothing else refers to it.
        self.parser = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = Request()

    def on_url(self, url: bytes) -> None:
        req = self.current
        assert req is not None
        req.url += url
        req.head_size += len(url)
        if req.head_size > MAX_HEAD:
            raise ValueError("request head too large")  # feed_data raises: a 400

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        assert req is not None
        req.headers.append((name.lower(), value))
        req.head_size += len(name) + len(value) + 4
        if req.head_size > MAX_HEAD or len(req.headers) > MAX_HEADERS:
            raise ValueError("request head too large")

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None
        parser = self.parser
        assert parser is not None  # only called from within feed_data
        req.method = parser.get_method().decode("ascii")
        req.http_version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        limit = self.srv.max_body
        for name, value in req.headers:
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        req.too_large = True
                except ValueError:
                    pass
            elif name == b"expect" and value.lower() == b"100-continue":
                req.expect_continue = True
        if req.expect_continue and not req.too_large and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self.current
        assert req is not None
        if req.too_large:
            return
        req.size += len(body)
        if req.size > self.srv.max_body:
            req.too_large = True
            req.chunks = []
            return
        req.chunks.append(body)

    def on_message_complete(self) -> None:
        req = self.current
        assert req is not None
        self.current = None
        chunks = req.chunks
        if chunks:
            req.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            req.chunks = []
        self._enqueue(req)

    # -- requests in order ------------------------------------------------------

    def _bad(self, detail: str) -> None:
        req = self.current or Request()
        self.current = None
        req.bad = detail
        req.keep_alive = False
        self._enqueue(req)
        if self.transport is not None and not self.paused_reading:
            self.paused_reading = True
            self.transport.pause_reading()  # nothing after a broken head is read

    def _enqueue(self, req: Request) -> None:
        if not self.busy:
            self.busy = True
            self._start(req)
            return
        self.queue.append(req)
        if len(self.queue) > MAX_QUEUED and not self.paused_reading and self.transport:
            self.paused_reading = True
            self.transport.pause_reading()

    def _start(self, req: Request) -> None:
        """Answer `req` (the connection is busy until `done`): on the
        callback path when the server can (no task, no await), else in a task."""
        try:
            if self.srv.forward_now(self, req):
                return
        except Exception:  # pragma: no cover - a bug: decided again on the task path
            log.exception("forward_now_failed")
        self.worker = self.srv.loop.create_task(self._run(req))

    async def _run(self, req: Request) -> None:
        keep = False
        try:
            keep = await self.srv.handle(self, req)
        except Exception:  # pragma: no cover - handle() answers its own errors
            log.exception("connection_failed")
        finally:
            self.worker = None
            self.done(keep)

    def done(self, keep: bool) -> None:
        """The answer to the current request is written: on to the next."""
        self.last = self.srv.loop.time()
        if not keep or self.srv.stopping or self.closed:
            self.busy = False
            self.queue.clear()
            self.close()
            return
        if not self.queue:
            self.busy = False
            return
        # Pipelined requests: the next one from a fresh callback, never from
        # inside the upstream parser's callbacks that may have called us.
        self.srv.loop.call_soon(self._next)

    def _next(self) -> None:
        if self.closed or not self.queue:
            self.busy = False
            return
        req = self.queue.popleft()
        if self.paused_reading and not req.bad and len(self.queue) <= MAX_QUEUED // 2:
            self.paused_reading = False
            assert self.transport is not None
            self.transport.resume_reading()
        self._start(req)

    # -- writing ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._writing_paused and not self.closed:
            self._drain = self.srv.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    async def disconnected(self) -> None:
        if self.closed:
            return
        if self._lost is None:
            self._lost = self.srv.loop.create_future()
        await asyncio.shield(self._lost)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class GatewayServer:
    """Serves a `GatewayApp` (created by gateway.app.create_app) whose
    lifespan the caller has entered."""

    def __init__(self, app: GatewayApp, *, keepalive: float = 5.0) -> None:
        self.app = app
        self.rt = app.state.runtime
        self.edge = app.edge
        self.proxy = self.rt.proxy
        self.max_body: int = self.rt.settings.max_body_bytes
        self.keepalive = keepalive
        self.conns: set[HttpConnection] = set()
        self.loop = asyncio.get_running_loop()
        self.date = _Date()
        self.server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.stopping = False
        self._prefix_headers: dict[str, bytes] = {}

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with port 0)."""
        self.server = await self.loop.create_server(
            lambda: HttpConnection(self), host, port, reuse_address=True, backlog=2048
        )
        self._sweeper = self.loop.create_task(self._sweep())
        return int(self.server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Close keep-alive connections idle longer than `keepalive`."""
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()
            for conn in list(self.conns):
                if not conn.busy and now - conn.last > self.keepalive:
                    conn.close()

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish (up to `grace`), close."""
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.stopping = True
        for conn in list(self.conns):
            if not conn.busy:
                conn.close()
        # Requests in flight (in a task or on the callback path) finish; each
        # connection closes when its answer is written (`done`).
        until = self.loop.time() + grace
        while any(c.busy for c in self.conns) and self.loop.time() < until:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for conn in list(self.conns):
            if conn.worker is not None:
                conn.worker.cancel()
            conn.close()
        if self.server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)

    # -- one request ------------------------------------------------------------

    async def handle(self, conn: HttpConnection, req: Request) -> bool:
        """Answer one request; whether the connection stays open."""
        if req.bad:
            self._write_problem(conn, req, "", Problem(400, req.bad), keep=False)
            return False
        raw_path, _, query = req.url.partition(b"?")
        raw_path = raw_path.partition(b"#")[0]
        if not raw_path.startswith(b"/"):
            self._write_problem(conn, req, "", Problem(400, "请求目标必须是路径。"), keep=False)
            return False
        try:
            path = unquote(raw_path.decode("ascii")) if b"%" in raw_path else raw_path.decode()
        except UnicodeDecodeError:
            self._write_problem(conn, req, "", Problem(400, "请求路径编码错误。"), keep=False)
            return False
        if req.too_large:
            limit = self.max_body
            problem = Problem(413, f"请求体过大（上限 {limit // (1024 * 1024)} MB）。")
            self._write_problem(conn, req, "", problem, keep=False, instance=path)
            return False
        if path.startswith("/api/v1/"):
            parts = path.split("/", 4)
            if len(parts) == 5 and parts[3] in self.rt.pools:
                return await self.forward(conn, req, path, raw_path, query, parts[3])
        return await self.bridge(conn, req, path, raw_path, query)

    def _write_problem(
        self,
        conn: HttpConnection,
        req: Request,
        rid: str,
        problem: Problem,
        *,
        keep: bool,
        instance: str = "",
    ) -> None:
        scope = {"path": instance, "state": {"request_id": rid}}
        data = problem_bytes(scope, problem)
        head = [status_line(problem.status), b"content-type: ", PROBLEM_TYPE, b"\r\n"]
        for key, value in (problem.headers or {}).items():
            head += (key.lower().encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
        if rid:
            head += (b"x-request-id: ", rid.encode("latin-1"), b"\r\n")
        head += (
            self.date(),
            self._connection(req, keep),
            b"content-length: ",
            str(len(data)).encode(),
            b"\r\n\r\n",
        )
        if req.method != "HEAD":
            head.append(data)
        conn.write(b"".join(head))

    @staticmethod
    def _connection(req: Request, keep: bool) -> bytes:
        if not keep:
            return b"connection: close\r\n"
        if req.http_version == "1.0":
            return b"connection: keep-alive\r\n"
        return b""

    # -- the callback path --------------------------------------------------------

    def forward_now(self, conn: HttpConnection, req: Request) -> bool:
        """Start forwarding `req` without a task when nothing needs an await:
        a plain `/api/v1/<service>/...` path, a public route or a token the
        verifier has cached, a rate-limit decision from memory that allows
        it, and an idle pooled upstream connection. The upstream's response
        is then relayed from the upstream connection's callbacks (`_Exchange`).
        False (nothing done) sends the request down `handle`, which decides
        everything else (refusals included) exactly as before."""
        if req.bad or req.too_large:
            return False
        url = req.url
        if not url.startswith(b"/api/v1/"):
            return False
        begun = time.perf_counter()
        raw_path = url.partition(b"?")[0]
        if b"%" in raw_path or b"/." in raw_path or b"#" in url:
            return False
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            return False
        parts = path.split("/", 4)
        if len(parts) != 5:
            return False
        service = parts[3]
        rt = self.rt
        pool = rt.pools.get(service)
        if pool is None:
            return False
        rid_raw: bytes | None = None
        authorization: bytes | None = None
        forwarded_for: str | None = None
        host = b""
        nominated: set[bytes] | None = None
        for key, value in req.headers:
            if key == b"x-request-id":
                rid_raw = value
            elif key == b"authorization":
                authorization = value
            elif key == b"host":
                host = value
            elif key == b"x-forwarded-for":
                text = value.decode("latin-1")
                forwarded_for = f"{forwarded_for}, {text}" if forwarded_for else text
            elif key == b"connection":
                nominated = {t.strip().lower() for t in value.split(b",")}
        method = req.method
        client_id: str | None = None
        if not rt.public.matches(service, method, "/" + parts[4]):
            token = _bearer(authorization)
            if token is None or rt.verifier is None:
                return False
            principal = rt.verifier.cached(token)
            if principal is None:
                return False
            client_id = principal.client_id or principal.subject
        up = pool.idle_conn()
        if up is None:
            return False
        peer = conn.peer
        ip = client_address(peer, forwarded_for, rt.trusted) if forwarded_for else peer
        if rt.limiter is not None:
            decision = rt.limiter.check_now(method, path, client_id, ip)
            if decision is None or not decision.allowed:
                pool.put(up)  # refused or in Redis: `handle` decides (a refusal takes nothing)
                return False
        if rid_raw is not None:
            rid = rid_raw.decode("latin-1")
            if not REQUEST_ID_RE.match(rid):
                rid = new_request_id()
                rid_raw = rid.encode("latin-1")
        else:
            rid = new_request_id()
            rid_raw = rid.encode("latin-1")
        # The request head: as Proxy._headers and UpstreamPool._head write it.
        trusted = conn.peer_trusted
        skip = REQUEST_SKIP if trusted else REQUEST_SKIP_UNTRUSTED
        if nominated:
            skip = skip | nominated
        out = [
            _METHODS.get(method) or method.encode("ascii") + b" ",
            pool.prefix,
            url[8 + len(service) :],  # the rest of the path, and the query
            b" HTTP/1.1\r\nhost: ",
            pool.host_header,
            b"\r\n",
        ]
        present: set[bytes] | None = None
        for key, value in req.headers:
            if key in skip:
                continue
            if trusted and key in FORWARDED_OWN:
                if present is None:
                    present = set()
                present.add(key)
            out += (key, b": ", value, b"\r\n")
        xff = f"{forwarded_for}, {peer}" if forwarded_for else peer
        out += (b"x-forwarded-for: ", xff.encode("latin-1"), b"\r\n")
        if present is None:
            out.append(b"x-forwarded-proto: http\r\n")
            if host:
                out += (b"x-forwarded-host: ", host, b"\r\n")
            out.append(self._prefix_header(service))
        else:
            if b"x-forwarded-proto" not in present:
                out.append(b"x-forwarded-proto: http\r\n")
            if host and b"x-forwarded-host" not in present:
                out += (b"x-forwarded-host: ", host, b"\r\n")
            if b"x-forwarded-prefix" not in present:
                out.append(self._prefix_header(service))
        out += (b"x-request-id: ", rid_raw, b"\r\n")
        body = req.body
        if body or method in BODY_METHODS:
            out += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)
        else:
            out.append(b"\r\n")
        ex = _Exchange(self, conn, req, pool, up, service, path, rid, ip, client_id)
        ex.forwarded_for = forwarded_for
        ex.begun = begun
        ex.timer = self.loop.call_later(rt.timeouts.get(service, DEFAULT_TIMEOUT), ex.expire)
        up.begin(method == "HEAD")
        up.listener = ex.event
        assert up.transport is not None
        up.transport.write(b"".join(out))
        return True

    def _prefix_header(self, service: str) -> bytes:
        header = self._prefix_headers.get(service)
        if header is None:
            header = b"x-forwarded-prefix: /api/v1/" + service.encode("latin-1") + b"\r\n"
            self._prefix_headers[service] = header
        return header

    def _response_head(
        self, req: Request, rid: bytes, status: int, headers: list[tuple[bytes, bytes]]
    ) -> tuple[list[bytes], bytes | None]:
        """The response head without framing and connection headers; and the
        upstream's content-length."""
        head = [status_line(status)]
        length_header: bytes | None = None
        for key, value in headers:
            if key in RESPONSE_SKIP:
                if key == b"content-length":
                    length_header = value
                continue
            head += (key, b": ", value, b"\r\n")
        head += (b"x-request-id: ", rid, b"\r\n", self.date())
        return head, length_header

    async def forward(
        self,
        conn: HttpConnection,
        req: Request,
        path: str,
        raw_path: bytes,
        query: bytes,
        service: str,
    ) -> bool:
        rt = self.rt
        edge = self.edge
        start = time.perf_counter()
        rid: str | None = None
        authorization: bytes | None = None
        forwarded_for: str | None = None
        for key, value in req.headers:
            if key == b"x-request-id":
                rid = value.decode("latin-1")
            elif key == b"authorization":
                authorization = value
            elif key == b"x-forwarded-for":
                text = value.decode("latin-1")
                forwarded_for = f"{forwarded_for}, {text}" if forwarded_for else text
        if not rid or not REQUEST_ID_RE.match(rid):
            rid = new_request_id()
        peer = conn.peer
        ip = client_address(peer, forwarded_for, rt.trusted) if forwarded_for else peer
        state: dict[str, Any] = {
            "request_id": rid,
            "peer": peer,
            "client_ip": ip,
            "forwarded_for": forwarded_for,
            "peer_trusted": conn.peer_trusted,
        }
        scope: dict[str, Any] = {
            "type": "http",
            "method": req.method,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": req.headers,
            "scheme": "http",
            "client": conn.client,
            "state": state,
        }
        ctx = request_id_var.set(rid)
        code = 500
        keep = req.keep_alive
        try:
            problem = await edge._edge(scope, state, authorization, ip)
            if problem is not None:
                code = problem.status
                self._write_problem(conn, req, rid, problem, keep=keep, instance=path)
                return keep
            code, keep = await self._exchange(conn, req, scope, state, service, raw_path, query)
            return keep
        except Exception:
            if state.get("gw_written"):
                conn.close()  # the head is gone: all we can do is cut the response short
                return False
            log.exception("proxy_failed", upstream=service)
            name = SERVICE_NAMES_ZH.get(service, service)
            code = 502
            problem = Problem(502, f"{name}（{service}）暂不可用。", service=service)
            self._write_problem(conn, req, rid, problem, keep=False, instance=path)
            return False
        finally:
            edge.record(scope, state, rid, ip, code, time.perf_counter() - start)
            request_id_var.reset(ctx)

    async def _exchange(
        self,
        conn: HttpConnection,
        req: Request,
        scope: dict[str, Any],
        state: dict[str, Any],
        service: str,
        raw_path: bytes,
        query: bytes,
    ) -> tuple[int, bool]:
        """Forward and relay; (status written, keep the connection)."""
        rt = self.rt
        pool = rt.pools[service]
        pieces = raw_path.split(b"/", 4)
        target = b"/" + pieces[4] if len(pieces) == 5 else b"/"
        if query:
            target = target + b"?" + query
        assert self.proxy is not None
        headers = self.proxy._headers(scope, state, service)
        keep = req.keep_alive
        started = time.perf_counter()
        try:
            upstream = await pool.request(
                req.method, target, headers, req.body, rt.timeouts.get(service, DEFAULT_TIMEOUT)
            )
        except (TimeoutError, UpstreamError) as exc:
            status = 504 if isinstance(exc, TimeoutError) else 502
            problem = upstream_failure(rt, scope, service, status, started)
            rid = state["request_id"]
            self._write_problem(conn, req, rid, problem, keep=keep, instance=path_of(scope))
            return status, keep
        return await self._relay(conn, req, scope, state, service, upstream, started)

    async def _relay(
        self,
        conn: HttpConnection,
        req: Request,
        scope: dict[str, Any],
        state: dict[str, Any],
        service: str,
        upstream: UpstreamResponse,
        started: float,
    ) -> tuple[int, bool]:
        """The upstream's response head is in: relay it (buffered or streamed)."""
        rt = self.rt
        keep = req.keep_alive
        elapsed = time.perf_counter() - started
        state["upstream_ms"] = round(elapsed * 1000, 2)
        status = upstream.status
        rt.metrics.observe_upstream(service, status, elapsed)
        rt.notice_up(service)
        head = [status_line(status)]
        length_header: bytes | None = None
        for key, value in upstream.headers:
            if key in RESPONSE_SKIP:
                if key == b"content-length":
                    length_header = value
                continue
            head += (key, b": ", value, b"\r\n")
        head += (
            b"x-request-id: ",
            state["request_id"].encode("latin-1"),
            b"\r\n",
            self.date(),
        )
        state["gw_written"] = True  # from here on, a failure cuts the response short
        no_body = req.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        try:
            length = upstream.length
            if no_body or upstream.complete or (length is not None and length <= BUFFER_LIMIT):
                try:
                    data = upstream.take() if upstream.complete else await upstream.read()
                except (TimeoutError, UpstreamError) as exc:
                    status = 504 if isinstance(exc, TimeoutError) else 502
                    problem = upstream_failure(rt, scope, service, status, started)
                    rid = state["request_id"]
                    self._write_problem(conn, req, rid, problem, keep=keep, instance=path_of(scope))
                    return status, keep
                if no_body:
                    if length_header is not None and status != 204:
                        head += (b"content-length: ", length_header, b"\r\n")
                    head += (self._connection(req, keep), b"\r\n")
                else:
                    head += (
                        self._connection(req, keep),
                        b"content-length: ",
                        str(len(data)).encode(),
                        b"\r\n\r\n",
                        data,
                    )
                conn.write(b"".join(head))
                return status, keep
            # Streams: chunked to HTTP/1.1 clients, delimited by closing to 1.0.
            chunked = req.http_version != "1.0"
            if not chunked:
                keep = False
            head += (
                self._connection(req, keep),
                b"transfer-encoding: chunked\r\n\r\n" if chunked else b"\r\n",
            )
            conn.write(b"".join(head))
            try:
                async for chunk in upstream.iter_chunks():
                    if conn.closed:
                        return status, False
                    conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await conn.drain()
            except (TimeoutError, UpstreamError) as exc:
                # Headers are gone already: all we can do is cut the response short.
                log.warning("upstream_body_failed", upstream=service, error=repr(exc))
                return status, False
            if chunked:
                conn.write(b"0\r\n\r\n")
            return status, keep
        finally:
            upstream.release()

    # -- everything else: the Starlette app over ASGI -----------------------------

    async def bridge(
        self, conn: HttpConnection, req: Request, path: str, raw_path: bytes, query: bytes
    ) -> bool:
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.http_version,
            "server": conn.sockname,
            "client": conn.client,
            "scheme": "http",
            "method": req.method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": req.headers,
            "state": {},
        }
        body_sent = False
        started = False
        finished = False
        chunked = False
        keep = req.keep_alive
        head_only = req.method == "HEAD"
        pending: list[bytes] = []
        has_length = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await conn.disconnected()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal started, finished, chunked, keep, has_length
            kind = message["type"]
            if kind == "http.response.start":
                if started:
                    raise RuntimeError("response already started")
                started = True
                pending.append(status_line(message["status"]))
                for key, value in message.get("headers", ()):
                    name = key.lower()
                    if name == b"content-length":
                        has_length = True
                    elif name in (b"connection", b"transfer-encoding", b"date", b"server"):
                        continue
                    pending.extend((name, b": ", value, b"\r\n"))
                pending.append(self.date())
                return
            if kind != "http.response.body" or finished:
                return
            if not started:
                raise RuntimeError("body before the response start")
            body: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            out: list[bytes] = []
            if pending:
                if not has_length and not head_only:
                    if not more:
                        pending.extend((b"content-length: ", str(len(body)).encode(), b"\r\n"))
                    elif req.http_version != "1.0":
                        chunked = True
                        pending.append(b"transfer-encoding: chunked\r\n")
                    else:
                        keep = False
                pending.extend((self._connection(req, keep), b"\r\n"))
                out.extend(pending)
                pending.clear()
            if not head_only:
                if chunked:
                    if body:
                        out.append(b"%x\r\n%b\r\n" % (len(body), body))
                    if not more:
                        out.append(b"0\r\n\r\n")
                else:
                    out.append(body)
            if out:
                conn.write(b"".join(out))
                await conn.drain()
            if not more:
                finished = True

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("request_failed", path=path)
            if not started:
                rid = scope["state"].get("request_id", "")
                self._write_problem(conn, req, rid, Problem(500), keep=False, instance=path)
            return False
        if not finished:
            if not started:
                rid = scope["state"].get("request_id", "")
                self._write_problem(conn, req, rid, Problem(500), keep=False, instance=path)
            return False
        return keep


class _Exchange:
    """One request forwarded on the callback path: the upstream connection's
    events (`event`) and the deadline (`expire`) drive it to the end, where
    the response is written to the client in one write, the request is
    recorded (metrics, access log) and the client connection goes on."""

    __slots__ = (
        "begun",
        "client_id",
        "conn",
        "ended",
        "forwarded_for",
        "head_elapsed",
        "ip",
        "path",
        "pool",
        "req",
        "rid",
        "service",
        "srv",
        "start",
        "timer",
        "up",
    )

    def __init__(
        self,
        srv: GatewayServer,
        conn: HttpConnection,
        req: Request,
        pool: UpstreamPool,
        up: _Conn,
        service: str,
        path: str,
        rid: str,
        ip: str,
        client_id: str | None,
    ) -> None:
        self.srv = srv
        self.conn = conn
        self.req = req
        self.pool = pool
        self.up = up
        self.service = service
        self.path = path
        self.rid = rid
        self.ip = ip
        self.client_id = client_id
        self.forwarded_for: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.start = time.perf_counter()  # sent upstream
        self.begun = self.start  # the request reached the gateway's edge
        self.ended = False
        self.head_elapsed = 0.0  # seconds until the upstream's response head

    def expire(self) -> None:
        self.up.fail(TimeoutError())

    def event(self) -> None:
        try:
            self._event()
        except Exception:  # pragma: no cover - a bug: cut the exchange short
            log.exception("proxy_failed", upstream=self.service)
            self.up.listener = None
            self.up.close()
            if self.timer is not None:
                self.timer.cancel()
            self.conn.close()
            self._finish(502, False, None)

    def _event(self) -> None:
        up = self.up
        if up.error is not None:
            self._failed(up.error)
            return
        if not up.head_done:
            return
        if not self.head_elapsed:
            self.head_elapsed = time.perf_counter() - self.start
        if up.complete:
            self._respond()
            return
        req = self.req
        status = up.status
        no_body = req.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        length = None if up.chunked else up.length
        if no_body or (length is not None and length <= BUFFER_LIMIT):
            return  # buffered: wait for the end
        self._continue_in_task(streaming=True)

    def _respond(self) -> None:
        """The whole response is in: one write to the client."""
        srv, up, req, conn = self.srv, self.up, self.req, self.conn
        up.listener = None
        elapsed = self.head_elapsed  # as on the task path: until the response head
        rt = srv.rt
        status = up.status
        rt.metrics.observe_upstream(self.service, status, elapsed)
        rt.notice_up(self.service)
        keep = req.keep_alive
        head, length_header = srv._response_head(
            req, self.rid.encode("latin-1"), status, up.headers
        )
        data = up.take()
        if self.timer is not None:
            self.timer.cancel()
        if up.reusable():
            self.pool.put(up)
        else:
            up.close()
        if req.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            if length_header is not None and status != 204:
                head += (b"content-length: ", length_header, b"\r\n")
            head += (srv._connection(req, keep), b"\r\n")
        else:
            head += (
                srv._connection(req, keep),
                b"content-length: ",
                str(len(data)).encode(),
                b"\r\n\r\n",
                data,
            )
        conn.write(b"".join(head))
        self._finish(status, keep, round(elapsed * 1000, 2))

    def _failed(self, error: BaseException) -> None:
        srv, up, req = self.srv, self.up, self.req
        up.listener = None
        if self.timer is not None:
            self.timer.cancel()
        up.close()
        if isinstance(error, _StaleConnection) and req.method in IDEMPOTENT:
            # Closed while idle in the pool: once more on a fresh connection,
            # as UpstreamPool.request does, from the task path.
            self._continue_in_task(streaming=False)
            return
        status = 504 if isinstance(error, TimeoutError) else 502
        scope = self._scope()
        problem = upstream_failure(srv.rt, scope, self.service, status, self.start)
        keep = req.keep_alive
        srv._write_problem(self.conn, req, self.rid, problem, keep=keep, instance=self.path)
        self._finish(status, keep, scope["state"].get("upstream_ms"))

    def _finish(self, status: int, keep: bool, upstream_ms: float | None) -> None:
        if self.ended:
            return
        self.ended = True
        srv = self.srv
        srv.edge.record_forward(
            self.req.method,
            self.path,
            self.service,
            self.rid,
            self.ip,
            status,
            time.perf_counter() - self.begun,
            upstream_ms,
            self.client_id,
        )
        self.conn.done(keep)

    def _scope(self) -> dict[str, Any]:
        req, conn = self.req, self.conn
        raw_path, _, query = req.url.partition(b"?")
        state: dict[str, Any] = {
            "request_id": self.rid,
            "peer": conn.peer,
            "client_ip": self.ip,
            "forwarded_for": self.forwarded_for,
            "peer_trusted": conn.peer_trusted,
            "gw_service": self.service,
            "client_id": self.client_id,
        }
        return {
            "type": "http",
            "method": req.method,
            "path": self.path,
            "raw_path": raw_path,
            "query_string": query.partition(b"#")[0],
            "headers": req.headers,
            "scheme": "http",
            "client": conn.client,
            "state": state,
        }

    def _continue_in_task(self, *, streaming: bool) -> None:
        """The rare cases (a streamed response, a retry) go on in a task."""
        self.up.listener = None
        self.srv.loop.create_task(self._rest(streaming))

    async def _rest(self, streaming: bool) -> None:
        srv, req, conn = self.srv, self.req, self.conn
        scope = self._scope()
        state = scope["state"]
        code, keep = 500, False
        ctx = request_id_var.set(self.rid)
        try:
            if streaming:
                assert self.timer is not None
                upstream = UpstreamResponse(self.up, self.pool, self.timer)
                code, keep = await srv._relay(
                    conn, req, scope, state, self.service, upstream, self.start
                )
            else:
                raw_path = scope["raw_path"]
                code, keep = await srv._exchange(
                    conn, req, scope, state, self.service, raw_path, scope["query_string"]
                )
        except Exception:
            if not state.get("gw_written"):
                log.exception("proxy_failed", upstream=self.service)
                name = SERVICE_NAMES_ZH.get(self.service, self.service)
                code = 502
                problem = Problem(502, f"{name}（{self.service}）暂不可用。", service=self.service)
                srv._write_problem(conn, req, self.rid, problem, keep=False, instance=self.path)
            keep = False
        finally:
            request_id_var.reset(ctx)
        srv.edge.record_forward(
            req.method,
            self.path,
            self.service,
            self.rid,
            self.ip,
            code,
            time.perf_counter() - self.begun,
            state.get("upstream_ms"),
            self.client_id,
        )
        conn.done(keep)


def path_of(scope: dict[str, Any]) -> str:
    return cast(str, scope["path"])


async def serve(
    app: GatewayApp, host: str, port: int, *, stop: asyncio.Event | None = None
) -> None:
    """Run the app's lifespan and the server until SIGINT/SIGTERM (or `stop`)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with app.router.lifespan_context(app):
        server = GatewayServer(app)
        actual = await server.start(host, port)
        log.info("gateway_listening", host=host, port=actual)
        try:
            await stop.wait()
        finally:
            await server.shutdown()


def run(app: GatewayApp, host: str, port: int) -> None:
    """`shuangjian serve gateway`: the app on this server, with uvloop when
    installed (as uvicorn would pick it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(app, host, port))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(app, host, port))
