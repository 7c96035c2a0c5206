"""Transactional outbox, outbox relay, and idempotent JetStream consumers (X-02).

A use case calls `record_event(session, event)` inside its own transaction;
the relay publishes committed rows with `Nats-Msg-Id` = event id and marks
them published. A consumer records each handled event id in `inbox` in the
handler's transaction, so a redelivery changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, UTCDateTime, new_metadata, utcnow
from chassis.events import Bus
from chassis.observability import Metrics
from contracts.base import STREAMS, Envelope, IntegrationEvent, stream_of

log = structlog.get_logger("messaging")

messaging_metadata = new_metadata()

outbox_table = Table(
    "outbox",
    messaging_metadata,
    Column(
        "position",
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("type", String(120), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("published_at", UTCDateTime(), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
)
Index(
    "ix_outbox_pending",
    outbox_table.c.position,
    postgresql_where=outbox_table.c.published_at.is_(None),
    sqlite_where=outbox_table.c.published_at.is_(None),
)

inbox_table = Table(
    "inbox",
    messaging_metadata,
    Column("consumer", String(80), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("type", String(120), nullable=False),
    Column("handled_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("consumer", "event_id"),
)

dead_letter_table = Table(
    "dead_letters",
    messaging_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("consumer", String(80), nullable=False),
    Column("event_id", String(36), nullable=True),
    Column("type", String(120), nullable=True),
    Column("payload", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)


# Responses remembered per (client, Idempotency-Key): see chassis/idempotency.py.
idempotency_table = Table(
    "idempotency_keys",
    messaging_metadata,
    Column("client", String(128), nullable=False),
    Column("key", String(255), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # in_flight | done
    Column("response_status", Integer, nullable=True),
    Column("response_body", LargeBinary, nullable=True),
    Column("content_type", String(100), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("completed_at", UTCDateTime(), nullable=True),
    PrimaryKeyConstraint("client", "key"),
)


async def emit(session: AsyncSession, event: IntegrationEvent) -> Envelope:
    """Write an outgoing event into the outbox, in the caller's transaction.

    The event is published only if (and after) that transaction commits.
    """
    envelope = Envelope.wrap(event, source=session.info.get("service", "unknown"))
    await session.execute(
        outbox_table.insert().values(
            event_id=envelope.id,
            type=envelope.type,
            payload=envelope.model_dump_json(),
            created_at=utcnow(),
            attempts=0,
        )
    )
    session.info["outbox_written"] = True
    return envelope


class OutboxRelay:
    """Publishes committed outbox rows to JetStream; never drops one.

    On PostgreSQL rows are claimed with `FOR UPDATE SKIP LOCKED`, so several
    replicas can relay side by side. On SQLite (one process per database)
    rows are read, published, then marked in a short write transaction, so
    the write lock is not held across network round trips.
    """

    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        service: str,
        metrics: Metrics | None = None,
        batch_size: int = 256,
        poll_interval: float = 0.5,
        publish_timeout: float = 3.0,
    ) -> None:
        self.db = db
        self.bus = bus
        self.service = service
        self.metrics = metrics
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.publish_timeout = publish_timeout
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self.service}")

    async def stop(self) -> None:
        self._stopping = True
        self.db.outbox_signal.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            if not self.bus.connected:
                await asyncio.sleep(0.2)
                continue
            # Clear before reading, not after: a commit while this batch is
            # being published must wake the next round, not wait a poll.
            self.db.outbox_signal.clear()
            try:
                published = await self.relay_once()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox_relay_failed", service=self.service, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if published >= self.batch_size:
                continue
            try:
                await asyncio.wait_for(self.db.outbox_signal.wait(), self.poll_interval)
            except TimeoutError:
                pass

    async def relay_once(self) -> int:
        """Publish one batch of pending rows; returns how many were published."""
        if self.db.is_sqlite:
            async with self.db.read() as session:
                rows = (await session.execute(self._pending_query())).all()
            if not rows:
                return 0
            done, failed = await self._publish(rows)
            async with self.db.transaction() as session:
                await self._mark(session, done, failed)
            return len(done)
        async with self.db.transaction() as session:
            rows = (
                await session.execute(self._pending_query().with_for_update(skip_locked=True))
            ).all()
            if not rows:
                return 0
            done, failed = await self._publish(rows)
            await self._mark(session, done, failed)
        return len(done)

    def _pending_query(self) -> Any:
        return (
            select(
                outbox_table.c.position,
                outbox_table.c.event_id,
                outbox_table.c.type,
                outbox_table.c.payload,
            )
            .where(outbox_table.c.published_at.is_(None))
            .order_by(outbox_table.c.position)
            .limit(self.batch_size)
        )

    async def _publish(self, rows: Iterable[Any]) -> tuple[list[int], dict[int, str]]:
        rows = list(rows)
        for spec in {stream_of(r.type) for r in rows}:
            await self.bus.ensure_stream(spec)
        results = await asyncio.gather(
            *(
                self.bus.js.publish(
                    r.type,
                    r.payload.encode(),
                    timeout=self.publish_timeout,
                    headers={"Nats-Msg-Id": r.event_id},
                )
                for r in rows
            ),
            return_exceptions=True,
        )
        done: list[int] = []
        failed: dict[int, str] = {}
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                failed[row.position] = f"{type(result).__name__}: {result}"
            else:
                done.append(row.position)
        if self.metrics is not None and done:
            self.metrics.events_published.labels(self.service).inc(len(done))
        if failed:
            log.warning("outbox_publish_partial", failed=len(failed), published=len(done))
        return done, failed

    async def _mark(self, session: AsyncSession, done: list[int], failed: dict[int, str]) -> None:
        if done:
            await session.execute(
                update(outbox_table)
                .where(outbox_table.c.position.in_(done))
                .values(published_at=utcnow(), attempts=outbox_table.c.attempts + 1)
            )
        for position, error in failed.items():
            await session.execute(
                update(outbox_table)
                .where(outbox_table.c.position == position)
                .values(attempts=outbox_table.c.attempts + 1, last_error=error[:2000])
            )


Handler = Callable[[AsyncSession, Envelope], Awaitable[None]]


@dataclass
class Subscription:
    """What one durable consumer of a service listens to.

    `handlers` maps event types to functions run inside the consumer's
    transaction; an event of a type without a handler is acknowledged unread.
    """

    name: str
    producer: str
    handlers: dict[str, Handler]
    max_deliver: int = 6
    ack_wait: float = 30.0
    batch: int = 64
    retry_delays: tuple[float, ...] = (0.5, 2.0, 5.0, 15.0, 30.0)
    filter_subjects: list[str] = field(default_factory=list)

    def subjects(self) -> list[str]:
        return self.filter_subjects or sorted(self.handlers)


class EventConsumer:
    """A supervised durable pull consumer for one `Subscription`."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        subscription: Subscription,
        *,
        service: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.bus = bus
        self.sub = subscription
        self.service = service
        self.metrics = metrics
        self.durable = f"{service}-{subscription.name}"
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last_fetch_at = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"consumer-{self.durable}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _ensure_consumer(self) -> Any:
        stream = STREAMS[self.sub.producer]
        await self.bus.ensure_stream(stream)
        config = ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.sub.ack_wait,
            max_deliver=self.sub.max_deliver,
            filter_subjects=self.sub.subjects(),
            max_ack_pending=self.sub.batch * 8,
        )
        try:
            info = await self.bus.js.consumer_info(stream.name, self.durable)
            if sorted(info.config.filter_subjects or []) != sorted(self.sub.subjects()):
                await self.bus.js.add_consumer(stream.name, config)
        except NotFoundError:
            await self.bus.js.add_consumer(stream.name, config)
        return await self.bus.js.pull_subscribe_bind(durable=self.durable, stream=stream.name)

    async def _supervise(self) -> None:
        # A pull subscription can die with a server restart; rebuild it.
        backoff = 0.2
        while not self._stopping:
            if not self.bus.connected:
                await asyncio.sleep(0.2)
                continue
            try:
                psub = await self._ensure_consumer()
                backoff = 0.2
                await self._pull(psub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consumer_restarting", consumer=self.durable, error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _pull(self, psub: Any) -> None:
        while not self._stopping:
            try:
                msgs = await psub.fetch(self.sub.batch, timeout=1.0)
            except nats.errors.TimeoutError:
                self.last_fetch_at = time.monotonic()
                continue  # nothing yet
            self.last_fetch_at = time.monotonic()
            for msg in msgs:
                await self.handle(msg)

    async def handle(self, msg: Any) -> None:
        try:
            envelope = Envelope.model_validate_json(msg.data)
        except ValueError as exc:
            await self._dead_letter(msg, None, f"invalid envelope: {exc}")
            return
        handler = self.sub.handlers.get(envelope.type)
        if handler is None:
            await msg.ack()
            return
        try:
            async with self.db.transaction() as session:
                if await self._claim(session, envelope):
                    await handler(session, envelope)
                    outcome = "handled"
                else:
                    outcome = "duplicate"
        except Exception as exc:
            delivered = msg.metadata.num_delivered
            log.warning(
                "event_handler_failed",
                consumer=self.durable,
                event_id=envelope.id,
                type=envelope.type,
                delivered=delivered,
                error=repr(exc),
            )
            if delivered >= self.sub.max_deliver:
                await self._dead_letter(msg, envelope, repr(exc))
            else:
                delays = self.sub.retry_delays
                await msg.nak(delay=delays[min(delivered - 1, len(delays) - 1)])
            self._count("failed")
            return
        await msg.ack()
        self._count(outcome)

    async def _claim(self, session: AsyncSession, envelope: Envelope) -> bool:
        values = {
            "consumer": self.durable,
            "event_id": envelope.id,
            "type": envelope.type,
            "handled_at": utcnow(),
        }
        insert = pg_insert if not self.db.is_sqlite else sqlite_insert
        result = await session.execute(
            insert(inbox_table).values(**values).on_conflict_do_nothing()
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def _dead_letter(self, msg: Any, envelope: Envelope | None, error: str) -> None:
        attempts = getattr(getattr(msg, "metadata", None), "num_delivered", 1) or 1
        payload = msg.data.decode(errors="replace")
        async with self.db.transaction() as session:
            await session.execute(
                dead_letter_table.insert().values(
                    consumer=self.durable,
                    event_id=envelope.id if envelope else None,
                    type=envelope.type if envelope else None,
                    payload=payload,
                    error=error[:4000],
                    attempts=attempts,
                    created_at=utcnow(),
                )
            )
        try:
            subject = f"deadletter.{self.service}.{envelope.type if envelope else 'invalid'}"
            await self.bus.dead_letter(
                subject,
                msg.data,
                {
                    "Nats-Msg-Id": f"dl-{self.durable}-{envelope.id if envelope else id(msg)}",
                    "Error": json.dumps(error[:500], ensure_ascii=True),
                },
            )
        finally:
            await msg.term()
        self._count("dead_lettered")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.events_handled.labels(self.service, self.sub.name, outcome).inc()
