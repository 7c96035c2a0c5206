"""Deliveries out: signed POSTs, at least once, with exponential back-off.

Due deliveries are claimed with a lease (their next attempt pushed past the
request timeout; `FOR UPDATE SKIP LOCKED` on PostgreSQL so replicas share
the work), sent concurrently, and their outcome written to the delivery log.
A crash between send and record means the lease expires and the delivery
is sent again: receivers dedupe on `webhook-id`. A 2xx answer is success;
410 Gone disables the subscription (Standard Webhooks); anything else is
retried after base·2ⁿ (±20 %, capped) until the retry window (24 h) ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from sqlalchemy import and_, delete, func, or_, select, update
from yarl import URL

from chassis.db import Database, utcnow
from gateway.aio import wait_event
from gateway.config import GatewaySettings
from gateway.telemetry import GatewayMetrics
from gateway.webhooks import models as m
from gateway.webhooks.signing import webhook_headers

log = structlog.get_logger("gateway.webhooks")

EXCERPT_BYTES = 500


def is_public_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return False


class PublicOnlyResolver(AbstractResolver):
    """Resolves like the default resolver but drops non-public addresses, so a
    subscriber URL cannot reach the platform's own network (SSRF), also not
    through a DNS name that later changes its answer."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if is_public_address(r["host"])]
        if not allowed:
            raise OSError(f"{host} 解析到的地址不是公网地址")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


@dataclass
class Outcome:
    delivery_id: str
    subscription_id: str
    attempts: int
    give_up_at: Any
    status_code: int | None
    error: str | None
    excerpt: str | None
    duration_ms: int
    attempted_at: Any

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class Dispatcher:
    def __init__(self, db: Database, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.http: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_housekeeping = 0.0

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        resolver: AbstractResolver | None = (
            None if self.settings.webhook_allow_private_targets else PublicOnlyResolver()
        )
        connector = aiohttp.TCPConnector(
            limit=self.settings.webhook_concurrency, resolver=resolver, ttl_dns_cache=60
        )
        self.http = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )
        self._task = asyncio.create_task(self._run(), name="gateway-webhook-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.http is not None:
            await self.http.close()

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                sent = await self.dispatch_once()
                await self._housekeeping()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook_dispatch_failed", error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if sent >= self.settings.webhook_batch:
                continue
            self._wake.clear()
            await wait_event(self._wake, self.settings.webhook_poll_seconds)

    def backoff(self, attempts: int) -> float:
        s = self.settings
        delay = min(
            s.webhook_retry_base_seconds * 2 ** max(0, attempts - 1),
            s.webhook_retry_max_delay_seconds,
        )
        return delay * random.uniform(0.8, 1.2)

    async def dispatch_once(self) -> int:
        d, s = m.deliveries, m.subscriptions
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.webhook_timeout_seconds + 30)
        async with self.db.transaction() as session:
            query = (
                select(
                    d.c.id,
                    d.c.subscription_id,
                    d.c.event_id,
                    d.c.payload,
                    d.c.attempts,
                    d.c.give_up_at,
                    s.c.url,
                )
                .join(s, s.c.id == d.c.subscription_id)
                .where(d.c.status == "pending", d.c.next_attempt_at <= now, s.c.active.is_(True))
                .order_by(d.c.next_attempt_at)
                .limit(self.settings.webhook_batch)
            )
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True, of=d)
            rows = (await session.execute(query)).all()
            if not rows:
                return 0
            await session.execute(
                update(d).where(d.c.id.in_([r.id for r in rows])).values(next_attempt_at=lease)
            )
            sub_ids = {r.subscription_id for r in rows}
            k = m.secrets
            secret_rows = (
                await session.execute(
                    select(k.c.subscription_id, k.c.secret)
                    .where(
                        k.c.subscription_id.in_(sub_ids),
                        or_(k.c.expires_at.is_(None), k.c.expires_at > now),
                    )
                    .order_by(k.c.id.desc())
                )
            ).all()
        keys: dict[str, list[str]] = {}
        for r in secret_rows:
            keys.setdefault(r.subscription_id, []).append(r.secret)
        gate = asyncio.Semaphore(self.settings.webhook_concurrency)

        async def one(row: Any) -> Outcome:
            async with gate:
                return await self._send(row, keys.get(row.subscription_id, []))

        outcomes = await asyncio.gather(*(one(r) for r in rows))
        await self._record(outcomes, lease)
        return len(rows)

    async def _send(self, row: Any, secrets: list[str]) -> Outcome:
        assert self.http is not None
        body = row.payload.encode()
        started = time.perf_counter()
        attempted_at = utcnow()
        status: int | None = None
        error: str | None = None
        excerpt: str | None = None
        url = URL(row.url)
        if not secrets:
            error = "订阅没有有效的签名密钥"
        elif (
            not self.settings.webhook_allow_private_targets
            and url.host
            and (_is_ip_literal(url.host) and not is_public_address(url.host))
        ):
            error = "目标地址不是公网地址"
        else:
            headers = webhook_headers(secrets, row.event_id, int(time.time()), body)
            try:
                async with self.http.post(
                    url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_seconds),
                ) as response:
                    status = response.status
                    excerpt = (await response.content.read(EXCERPT_BYTES)).decode(
                        "utf-8", errors="replace"
                    )
            except TimeoutError:
                error = "超时"
            except (aiohttp.ClientError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        duration = time.perf_counter() - started
        outcome = Outcome(
            row.id,
            row.subscription_id,
            row.attempts + 1,
            row.give_up_at,
            status,
            error,
            excerpt,
            int(duration * 1000),
            attempted_at,
        )
        self.metrics.webhook_deliveries.labels(
            "success" if outcome.ok else ("error" if status is None else f"http_{status // 100}xx")
        ).inc()
        self.metrics.webhook_latency.observe(duration)
        return outcome

    async def _record(self, outcomes: list[Outcome], lease: Any) -> None:
        # Only a delivery still under this pass's lease is updated: one the
        # platform replayed meanwhile stays due (its attempt is logged all the same).
        d, s = m.deliveries, m.subscriptions
        now = utcnow()
        async with self.db.transaction() as session:
            for o in outcomes:
                await session.execute(
                    m.attempts.insert().values(
                        delivery_id=o.delivery_id,
                        attempted_at=o.attempted_at,
                        duration_ms=o.duration_ms,
                        status_code=o.status_code,
                        error=o.error,
                        response_excerpt=o.excerpt,
                    )
                )
                values: dict[str, Any] = {
                    "attempts": o.attempts,
                    "last_attempt_at": o.attempted_at,
                    "last_status_code": o.status_code,
                    "last_error": o.error,
                }
                if o.ok:
                    values.update(
                        status="succeeded", delivered_at=now, next_attempt_at=None, last_error=None
                    )
                elif o.status_code == 410:
                    values.update(
                        status="failed",
                        next_attempt_at=None,
                        last_error="接收方返回 410 Gone，订阅已停用",
                    )
                    await session.execute(
                        update(s)
                        .where(s.c.id == o.subscription_id)
                        .values(active=False, disabled_reason="接收方返回 410 Gone", updated_at=now)
                    )
                else:
                    retry_at = now + timedelta(seconds=self.backoff(o.attempts))
                    if retry_at > o.give_up_at:
                        values.update(status="failed", next_attempt_at=None)
                    else:
                        values.update(next_attempt_at=retry_at)
                await session.execute(
                    update(d)
                    .where(d.c.id == o.delivery_id, d.c.next_attempt_at == lease)
                    .values(**values)
                )
        for o in outcomes:
            if not o.ok:
                log.info(
                    "webhook_attempt_failed",
                    delivery_id=o.delivery_id,
                    subscription_id=o.subscription_id,
                    attempts=o.attempts,
                    status_code=o.status_code,
                    error=o.error,
                )

    async def _housekeeping(self) -> None:
        now_mono = time.monotonic()
        if now_mono - self._last_housekeeping < 30:
            return
        self._last_housekeeping = now_mono
        d = m.deliveries
        now = utcnow()
        async with self.db.read() as session:
            pending = (
                await session.execute(
                    select(func.count()).select_from(d).where(d.c.status == "pending")
                )
            ).scalar()
        self.metrics.webhook_pending.set(pending or 0)
        # The delivery log is kept for a while, then pruned.
        cutoff = now - timedelta(days=self.settings.webhook_log_retention_days)
        async with self.db.transaction() as session:
            await session.execute(
                delete(d).where(and_(d.c.status != "pending", d.c.created_at < cutoff))
            )


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False
