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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

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
    session.info.setdefault("outbox_events", []).append(envelope)
    return envelope


async def emit_many(session: AsyncSession, events: Sequence[IntegrationEvent]) -> list[Envelope]:
    """`emit` for many events in one statement (a batch's outbox rows), in order."""
    if not events:
        return []
    envelopes, rows = _outbox_rows(session, events)
    await session.execute(outbox_table.insert(), rows)
    session.info.setdefault("outbox_events", []).extend(envelopes)
    return envelopes


def stage_events(session: AsyncSession, events: Sequence[IntegrationEvent]) -> list[dict[str, Any]]:
    """The outbox rows of `events` (columns event_id, type, payload,
    created_at, attempts), for a caller that writes them within a statement
    of its own, in order and in this session's transaction — as the
    enrollment rush does, to save a round trip. Their envelopes are handed to
    the relay when the transaction commits: write every row (and check the
    count) or let the transaction fail."""
    envelopes, rows = _outbox_rows(session, events)
    session.info.setdefault("outbox_events", []).extend(envelopes)
    return rows


def _outbox_rows(
    session: AsyncSession, events: Sequence[IntegrationEvent]
) -> tuple[list[Envelope], list[dict[str, Any]]]:
    source = session.info.get("service", "unknown")
    envelopes = [Envelope.wrap(event, source=source) for event in events]
    now = utcnow()
    rows = [
        {
            "event_id": envelope.id,
            "type": envelope.type,
            "payload": envelope.model_dump_json(),
            "created_at": now,
            "attempts": 0,
        }
        for envelope in envelopes
    ]
    return envelopes, rows


class OutboxRelay:
    """Publishes committed outbox rows to JetStream; never drops one.

    Two paths, as in eShop's integration event log:

    - the fast path: when a transaction that emitted events commits, its
      envelopes are published at once from memory, and their rows are marked
      published a moment later, many in one short write transaction;
    - the poller: publishes rows from the table in position order. At start,
      and whenever a fast publish fails (NATS away), the fast path pauses and
      the poller drains every pending row before it resumes, so a new event
      never overtakes an older unpublished one from this process. While the
      fast path runs, the poller still publishes rows pending for longer than
      `grace` seconds: rows written by another process, rows left by a crash
      between publish and mark.

    A row published twice is harmless: `Nats-Msg-Id` deduplicates in
    JetStream and consumers keep an inbox. On PostgreSQL the poller claims rows
    with `FOR UPDATE SKIP LOCKED`, so several replicas can relay side by side.
    On SQLite (one process per database) rows are read, published, then marked
    in a short write transaction, so the write lock is not held across network
    round trips.
    """

    MAX_HELD = 10_000  # envelopes kept in memory while the fast path pauses

    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        service: str,
        metrics: Metrics | None = None,
        batch_size: int = 256,
        poll_interval: float = 0.5,
        grace: float = 2.0,
        mark_delay: float = 0.05,
        publish_timeout: float = 3.0,
    ) -> None:
        self.db = db
        self.bus = bus
        self.service = service
        self.metrics = metrics
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.grace = grace
        self.mark_delay = mark_delay
        self.publish_timeout = publish_timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._fresh: list[Envelope] = []
        self._fresh_ready = asyncio.Event()
        self._fast = False  # off until the poller has drained the backlog
        self._to_mark: list[str] = []
        self._mark_ready = asyncio.Event()

    def start(self) -> None:
        self.db.outbox_listeners.append(self._on_commit)
        for name, loop in (
            ("poll", self._poll_loop),
            ("dispatch", self._dispatch_loop),
            ("mark", self._mark_loop),
        ):
            self._tasks.append(asyncio.create_task(loop(), name=f"outbox-{name}-{self.service}"))

    async def stop(self) -> None:
        self._stopping.set()
        if self._on_commit in self.db.outbox_listeners:
            self.db.outbox_listeners.remove(self._on_commit)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        # Marks not yet written are not lost: the poller republishes those rows.
        if self._to_mark:
            try:
                await self._flush_marks()
            except Exception as exc:
                log.warning("outbox_mark_failed", service=self.service, error=str(exc))

    # --- fast path ----------------------------------------------------------

    def _on_commit(self, envelopes: list[Envelope]) -> None:
        self._fresh.extend(envelopes)
        if len(self._fresh) > self.MAX_HELD:
            # Only while paused: the poller drains their rows before resuming.
            del self._fresh[: len(self._fresh) - self.MAX_HELD]
        self._fresh_ready.set()

    async def _dispatch_loop(self) -> None:
        while True:
            await self._fresh_ready.wait()
            self._fresh_ready.clear()
            while self._fresh and self._fast:
                if not self.bus.connected:
                    self._fast = False
                    break
                batch = self._fresh[: self.batch_size]
                del self._fresh[: self.batch_size]
                errors = await self._publish_all(
                    [(e.type, e.model_dump_json().encode(), e.id) for e in batch]
                )
                self._to_mark.extend(e.id for e, err in zip(batch, errors, strict=True) if not err)
                self._mark_ready.set()
                if any(errors):
                    # Pause: the poller republishes from the table, in order.
                    self._fast = False

    async def _mark_loop(self) -> None:
        backoff = self.mark_delay
        while True:
            await self._mark_ready.wait()
            await asyncio.sleep(backoff)  # let a few publishes share one write
            self._mark_ready.clear()
            try:
                await self._flush_marks()
                backoff = self.mark_delay
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox_mark_failed", service=self.service, error=str(exc))
                self._mark_ready.set()
                backoff = min(max(backoff * 2, 0.1), 5.0)

    async def _flush_marks(self) -> None:
        ids, self._to_mark = self._to_mark, []
        try:
            async with self.db.transaction() as session:
                for first in range(0, len(ids), 500):
                    await session.execute(
                        update(outbox_table)
                        .where(
                            outbox_table.c.event_id.in_(ids[first : first + 500]),
                            outbox_table.c.published_at.is_(None),
                        )
                        .values(published_at=utcnow(), attempts=outbox_table.c.attempts + 1)
                    )
        except BaseException:
            self._to_mark[:0] = ids
            raise

    # --- safety net ---------------------------------------------------------

    async def _poll_loop(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            if not self.bus.connected:
                await asyncio.sleep(0.2)
                continue
            try:
                if self._fast:
                    _, published = await self._relay_batch(self.grace)
                else:
                    found, published = await self._relay_batch(0.0)
                    if found == 0:
                        # Held envelopes may repeat rows just published; JetStream
                        # drops such duplicates by Nats-Msg-Id.
                        self._fast = True
                        self._fresh_ready.set()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox_relay_failed", service=self.service, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if published >= self.batch_size or (published and not self._fast):
                continue
            try:
                await asyncio.wait_for(self._stopping.wait(), self.poll_interval)
            except TimeoutError:
                pass

    async def relay_once(self, *, min_age: float = 0.0) -> int:
        """Publish one batch of rows pending for at least `min_age` seconds;
        returns how many were published."""
        return (await self._relay_batch(min_age))[1]

    async def _relay_batch(self, min_age: float) -> tuple[int, int]:
        """(rows found, rows published) for one batch."""
        query = self._pending_query(min_age)
        if self.db.is_sqlite:
            async with self.db.read() as session:
                rows = (await session.execute(query)).all()
            if not rows:
                return 0, 0
            done, failed = await self._publish(rows)
            async with self.db.transaction() as session:
                await self._mark(session, done, failed)
            return len(rows), len(done)
        async with self.db.transaction() as session:
            rows = (await session.execute(query.with_for_update(skip_locked=True))).all()
            if not rows:
                return 0, 0
            done, failed = await self._publish(rows)
            await self._mark(session, done, failed)
        return len(rows), len(done)

    def _pending_query(self, min_age: float) -> Any:
        query = (
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
        if min_age > 0:
            cutoff = utcnow() - timedelta(seconds=min_age)
            query = query.where(outbox_table.c.created_at <= cutoff)
        return query

    async def _publish_all(self, messages: list[tuple[str, bytes, str]]) -> list[str | None]:
        """Publish (subject, payload, event id) triples concurrently; returns
        None for each stored message and the error for each failure."""
        for spec in {stream_of(subject) for subject, _, _ in messages}:
            await self.bus.ensure_stream(spec)
        results = await asyncio.gather(
            *(
                self.bus.js.publish(
                    subject,
                    payload,
                    timeout=self.publish_timeout,
                    headers={"Nats-Msg-Id": event_id},
                )
                for subject, payload, event_id in messages
            ),
            return_exceptions=True,
        )
        errors = [
            f"{type(r).__name__}: {r}" if isinstance(r, BaseException) else None for r in results
        ]
        published = errors.count(None)
        if self.metrics is not None and published:
            self.metrics.events_published.labels(self.service).inc(published)
        if published < len(errors):
            log.warning(
                "outbox_publish_partial", failed=len(errors) - published, published=published
            )
        return errors

    async def _publish(self, rows: Iterable[Any]) -> tuple[list[int], dict[int, str]]:
        rows = list(rows)
        errors = await self._publish_all([(r.type, r.payload.encode(), r.event_id) for r in rows])
        done = [row.position for row, error in zip(rows, errors, strict=True) if error is None]
        failed = {row.position: error for row, error in zip(rows, errors, strict=True) if error}
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
            except TimeoutError:  # nats' own, or asyncio's from inside fetch
                self.last_fetch_at = time.monotonic()
                continue  # nothing yet
            self.last_fetch_at = time.monotonic()
            await self.handle_batch(msgs)

    async def handle_batch(self, msgs: list[Any]) -> None:
        """Apply a fetched batch in one transaction, then acknowledge it.

        One commit per batch instead of per event is what lets a consumer keep
        up with a busy producer. If any handler fails, the batch rolls back and
        each event is retried alone, so one poison event cannot hold up the rest.
        """
        batch: list[tuple[Any, Envelope]] = []
        for msg in msgs:
            try:
                envelope = Envelope.model_validate_json(msg.data)
            except ValueError:
                await self.handle(msg)  # dead-letters it
                continue
            if envelope.type in self.sub.handlers:
                batch.append((msg, envelope))
            else:
                await msg.ack()
        if len(batch) < 2:
            for msg, _ in batch:
                await self.handle(msg)
            return
        outcomes: list[str] = []
        try:
            async with self.db.transaction() as session:
                for _, envelope in batch:
                    if await self._claim(session, envelope):
                        await self.sub.handlers[envelope.type](session, envelope)
                        outcomes.append("handled")
                    else:
                        outcomes.append("duplicate")
        except Exception:
            for msg, _ in batch:
                await self.handle(msg)
            return
        for (msg, _), outcome in zip(batch, outcomes, strict=True):
            await msg.ack()
            self._count(outcome)

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
