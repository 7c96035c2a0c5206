"""Events in: one durable JetStream pull consumer per producing service.

For each event, in the consumer's transaction (so a redelivery changes
nothing, X-02): learn tenant links, find the active subscriptions for its
type whose tenants it belongs to, and queue one delivery per subscription.
The dispatcher sends them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta
from fnmatch import fnmatchcase

import structlog
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import utcnow
from chassis.messaging import Handler, Subscription
from contracts.base import EVENT_TYPES, STREAMS, Envelope
from gateway.config import GatewaySettings
from gateway.webhooks import models as m
from gateway.webhooks.tenants import TenantGraph, direct_tenants, links_of

log = structlog.get_logger("gateway.webhooks")


class TenantPending(Exception):
    """The event names a school or class whose region is not known yet."""


def matches_any(event_type: str, patterns: Iterable[str]) -> bool:
    return any(p == event_type or fnmatchcase(event_type, p) for p in patterns)


class Intake:
    def __init__(
        self, settings: GatewaySettings, graph: TenantGraph, wake: Callable[[], None]
    ) -> None:
        self.settings = settings
        self.graph = graph
        self.wake = wake
        self._first_seen: dict[str, float] = {}

    def is_denied(self, event_type: str) -> bool:
        return matches_any(event_type, self.settings.webhook_denied_event_types)

    def is_public(self, event_type: str) -> bool:
        return matches_any(event_type, self.settings.webhook_public_event_types)

    def subscriptions(self) -> list[Subscription]:
        subs = []
        for producer in STREAMS:
            handlers: dict[str, Handler] = {
                t: self.handle for t in EVENT_TYPES if t.split(".", 1)[0] == producer
            }
            subs.append(
                Subscription(
                    name=f"webhooks-{producer}",
                    producer=producer,
                    handlers=handlers,
                    filter_subjects=[f"{producer}.>"],
                    max_deliver=20,
                    ack_wait=30.0,
                    retry_delays=(1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0),
                )
            )
        return subs

    async def handle(self, session: AsyncSession, envelope: Envelope) -> None:
        pairs = links_of(envelope)
        if pairs:
            await self.graph.learn(session, pairs)
        event_type = envelope.type
        if self.is_denied(event_type):
            return
        s = m.subscriptions
        rows = (
            await session.execute(
                select(s.c.id, s.c.event_types, s.c.tenants).where(s.c.active.is_(True))
            )
        ).all()
        candidates = [r for r in rows if matches_any(event_type, r.event_types)]
        if not candidates:
            return
        if self.is_public(event_type):
            targets = candidates
        else:
            tenants = self.graph.expand(direct_tenants(envelope))
            targets = [r for r in candidates if tenants & set(r.tenants)]
            if len(targets) < len(candidates) and self.graph.unresolved(tenants):
                first = self._first_seen.setdefault(envelope.id, time.monotonic())
                if time.monotonic() - first < self.settings.webhook_tenant_wait_seconds:
                    raise TenantPending(
                        f"{envelope.id}: waiting for the region of "
                        f"{sorted(self.graph.unresolved(tenants))}"
                    )
        self._first_seen.pop(envelope.id, None)
        if len(self._first_seen) > 10_000:
            self._first_seen.clear()
        if not targets:
            return
        now = utcnow()
        payload = envelope.model_dump_json()
        give_up = now + timedelta(seconds=self.settings.webhook_retry_window_seconds)
        dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        for r in targets:
            await session.execute(
                insert(m.deliveries)
                .values(
                    id=str(uuid.uuid4()),
                    subscription_id=r.id,
                    event_id=envelope.id,
                    event_type=event_type,
                    payload=payload,
                    status="pending",
                    attempts=0,
                    next_attempt_at=now,
                    give_up_at=give_up,
                    created_at=now,
                    replays=0,
                )
                .on_conflict_do_nothing(index_elements=["subscription_id", "event_id"])
            )
        self.wake()
