"""X-02: transactional outbox, de-duplicated publishing, idempotent consumers.

The chassis pieces are driven directly (no service app): a producer database
with its outbox and `OutboxRelay`, a consumer database with its inbox and
`EventConsumer`, and a real JetStream server from the `nats_server` fixture.
The consumer's side effect is a row per event in `applied` whose `count` goes
up on every application, so "applied once" is `count == 1`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import nats.errors
import pytest
from sqlalchemy import func, select, update

from chassis.db import Database
from chassis.events import Bus
from chassis.messaging import (
    EventConsumer,
    OutboxRelay,
    dead_letter_table,
    emit,
    inbox_table,
    outbox_table,
)
from contracts.base import STREAMS, Envelope
from contracts.identity import RegionUpserted
from launcher.nats_server import EmbeddedNats
from tests.events.consumer_process import (
    CONSUMER_SERVICE,
    applied_counts,
    apply_event,
    create_tables,
    region_subscription,
)
from tests.support import eventually

pytestmark = pytest.mark.asyncio

PRODUCER = "identity"
STREAM = STREAMS[PRODUCER].name  # IDENTITY


def region(name: str | None = None) -> RegionUpserted:
    rid = name or f"r-{uuid.uuid4().hex[:8]}"
    return RegionUpserted(id=rid, name=f"区域 {rid}", profile_id="jinhua")


class Rig:
    """Opens databases and buses for one test and closes them afterwards."""

    def __init__(self, stack: AsyncExitStack, databases: Any, nats_url: str) -> None:
        self.stack = stack
        self.databases = databases
        self.nats_url = nats_url

    async def database(self, name: str, service: str, *, applied: bool = False) -> Database:
        db = Database(await self.databases.url(name), service=service)
        self.stack.push_async_callback(db.dispose)
        await create_tables(db, applied=applied)
        return db

    async def bus(self, name: str) -> Bus:
        bus = Bus([self.nats_url], name=name)
        bus.start()
        self.stack.push_async_callback(bus.close)
        await bus.wait_connected(10)
        return bus

    def relay(self, db: Database, bus: Bus, **options: Any) -> OutboxRelay:
        relay = OutboxRelay(db, bus, service=PRODUCER, **options)
        self.stack.push_async_callback(relay.stop)
        return relay

    def consumer(
        self, db: Database, bus: Bus, consumer: EventConsumer | None = None, **options: Any
    ) -> EventConsumer:
        consumer = consumer or EventConsumer(
            db, bus, region_subscription(apply_event, **options), service=CONSUMER_SERVICE
        )
        consumer.start()
        self.stack.push_async_callback(consumer.stop)
        return consumer


@pytest.fixture
async def rig(databases: Any, nats_server: EmbeddedNats) -> AsyncIterator[Rig]:
    async with AsyncExitStack() as stack:
        yield Rig(stack, databases, nats_server.url)


async def outbox_rows(db: Database) -> list[Any]:
    async with db.read() as session:
        return list((await session.execute(select(outbox_table))).all())


async def inbox_count(db: Database, event_id: str) -> int:
    async with db.read() as session:
        return int(
            (
                await session.execute(
                    select(func.count())
                    .select_from(inbox_table)
                    .where(inbox_table.c.event_id == event_id)
                )
            ).scalar_one()
        )


async def stream_messages(bus: Bus, stream: str = STREAM) -> list[Any]:
    info = await bus.js.stream_info(stream)
    return [await bus.js.get_msg(stream, seq) for seq in range(1, info.state.last_seq + 1)]


async def test_x02_event_emitted_in_rolled_back_transaction_is_never_published(rig: Rig) -> None:
    db = await rig.database("producer", PRODUCER)
    bus = await rig.bus("producer")
    relay = rig.relay(db, bus)
    watcher = await bus.nc.subscribe("identity.>")  # type: ignore[union-attr]

    with pytest.raises(RuntimeError, match="use case failed"):
        async with db.transaction() as session:
            await emit(session, region("r-rolled-back"))
            raise RuntimeError("use case failed after emitting")
    async with db.transaction() as session:
        kept = await emit(session, region("r-kept"))

    assert [r.event_id for r in await outbox_rows(db)] == [kept.id]
    assert await relay.relay_once() == 1
    assert await relay.relay_once() == 0

    # Neither JetStream nor a plain subscriber ever saw the rolled-back event.
    [stored] = await stream_messages(bus)
    assert Envelope.model_validate_json(stored.data).id == kept.id
    seen = await watcher.next_msg(timeout=5)
    assert Envelope.model_validate_json(seen.data).subject == "r-kept"
    with pytest.raises(nats.errors.TimeoutError):
        await watcher.next_msg(timeout=0.5)


async def test_x02_committed_events_are_published_with_nats_msg_id_equal_to_envelope_id(
    rig: Rig,
) -> None:
    db = await rig.database("producer", PRODUCER)
    bus = await rig.bus("producer")
    watcher = await bus.nc.subscribe("identity.>")  # type: ignore[union-attr]
    relay = rig.relay(db, bus)
    relay.start()  # woken by the commit, not by polling

    async with db.transaction() as session:
        emitted = [await emit(session, region()) for _ in range(3)]
    async with db.transaction() as session:
        emitted.append(await emit(session, region()))
    by_id = {e.id: e for e in emitted}

    async def all_marked() -> bool:
        rows = await outbox_rows(db)
        return len(rows) == 4 and all(r.published_at is not None for r in rows)

    await eventually(all_marked, timeout=10)
    await relay.stop()
    assert all(r.attempts == 1 and r.last_error is None for r in await outbox_rows(db))

    stored = await stream_messages(bus)
    assert len(stored) == 4
    for msg in stored:
        envelope = Envelope.model_validate_json(msg.data)
        assert msg.headers["Nats-Msg-Id"] == envelope.id
        assert msg.subject == RegionUpserted.TYPE
        assert envelope == by_id[envelope.id]
    for _ in range(4):  # a plain subscriber sees the header too
        live = await watcher.next_msg(timeout=5)
        assert live.headers["Nats-Msg-Id"] == Envelope.model_validate_json(live.data).id

    # Publishing the same id again is reported duplicate and stores nothing.
    first = stored[0]
    ack = await bus.js.publish(
        first.subject, first.data, headers={"Nats-Msg-Id": first.headers["Nats-Msg-Id"]}
    )
    assert ack.duplicate is True
    assert ack.seq == first.seq

    # A relay that died after publishing but before marking publishes the
    # rows again: the server drops the copies.
    async with db.transaction() as session:
        await session.execute(update(outbox_table).values(published_at=None))
    assert await relay.relay_once() == 4
    assert (await bus.js.stream_info(STREAM)).state.messages == 4
    assert all(r.published_at is not None for r in await outbox_rows(db))


async def test_x02_event_committed_while_relay_publishes_is_relayed_without_waiting_a_poll(
    rig: Rig,
) -> None:
    """The commit's wake-up must not be lost while the relay is busy."""
    db = await rig.database("producer", PRODUCER)
    bus = await rig.bus("producer")
    await bus.ensure_stream(STREAMS[PRODUCER])
    publishing = asyncio.Event()
    real_publish = bus.js.publish

    async def slow_publish(*args: Any, **kwargs: Any) -> Any:
        publishing.set()
        await asyncio.sleep(0.2)  # a slow round trip to the server
        return await real_publish(*args, **kwargs)

    bus.js.publish = slow_publish  # type: ignore[method-assign]
    relay = rig.relay(db, bus, poll_interval=10.0)  # only a commit can wake it in time
    relay.start()
    await asyncio.sleep(0.1)  # the relay is idle, waiting for a commit

    async with db.transaction() as session:
        await emit(session, region("r-first"))
    await asyncio.wait_for(publishing.wait(), 5)
    async with db.transaction() as session:  # committed during the first publish
        second = await emit(session, region("r-second"))

    async def second_published() -> bool:
        rows = await outbox_rows(db)
        return any(r.event_id == second.id and r.published_at is not None for r in rows)

    await eventually(second_published, timeout=3)


async def stream_event_ids(bus: Bus) -> list[str]:
    return [Envelope.model_validate_json(m.data).id for m in await stream_messages(bus)]


async def test_x02_fast_path_publishes_at_commit_and_marks_rows_in_one_later_write(
    rig: Rig,
) -> None:
    db = await rig.database("producer", PRODUCER)
    bus = await rig.bus("producer")
    await bus.ensure_stream(STREAMS[PRODUCER])
    relay = rig.relay(db, bus, poll_interval=30.0, mark_delay=0.3)
    relay.start()

    async def fast_path_on() -> bool:
        return relay._fast

    await eventually(fast_path_on, timeout=5)  # the poller found no backlog
    emitted = []
    for _ in range(3):
        async with db.transaction() as session:
            emitted.append((await emit(session, region())).id)

    async def in_stream() -> bool:
        info = await bus.js.stream_info(STREAM)
        return info.state.messages == 3

    await eventually(in_stream, timeout=2)  # long before the 30 s poll
    assert await stream_event_ids(bus) == emitted  # in commit order

    async def all_marked() -> bool:
        return all(r.published_at is not None for r in await outbox_rows(db))

    await eventually(all_marked, timeout=5)
    assert {r.attempts for r in await outbox_rows(db)} == {1}


async def test_x02_new_event_never_overtakes_an_older_unpublished_one(rig: Rig) -> None:
    """Rows left from before the start are relayed first: the fast path waits."""
    db = await rig.database("producer", PRODUCER)
    bus = await rig.bus("producer")
    backlog = []
    for _ in range(6):  # 600 rows: more than two relay batches
        async with db.transaction() as session:
            for _ in range(100):
                backlog.append((await emit(session, region())).id)
    await bus.ensure_stream(STREAMS[PRODUCER])
    relay = rig.relay(db, bus, batch_size=256)
    relay.start()
    async with db.transaction() as session:  # committed while the backlog drains
        newest = (await emit(session, region("r-newest"))).id

    async def everything_in_stream() -> bool:
        return (await bus.js.stream_info(STREAM)).state.messages == 601

    await eventually(everything_in_stream, timeout=15)
    ids = await stream_event_ids(bus)
    assert ids == [*backlog, newest]


async def test_x02_failed_fast_publish_pauses_fast_path_until_poller_catches_up_in_order(
    rig: Rig,
) -> None:
    db = await rig.database("producer", PRODUCER)
    bus = await rig.bus("producer")
    await bus.ensure_stream(STREAMS[PRODUCER])
    relay = rig.relay(db, bus, poll_interval=0.2)
    relay.start()

    async def fast_path_on() -> bool:
        return relay._fast

    await eventually(fast_path_on, timeout=5)
    real_publish = bus.js.publish
    failures = {"left": 1}

    async def flaky_publish(*args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise nats.errors.TimeoutError
        return await real_publish(*args, **kwargs)

    bus.js.publish = flaky_publish  # type: ignore[method-assign]
    async with db.transaction() as session:
        lost_once = (await emit(session, region("r-lost-once"))).id

    async def paused() -> bool:
        return failures["left"] == 0

    await eventually(paused, timeout=5)
    async with db.transaction() as session:
        later = (await emit(session, region("r-later"))).id

    async def both_published() -> bool:
        rows = await outbox_rows(db)
        return len(rows) == 2 and all(r.published_at is not None for r in rows)

    await eventually(both_published, timeout=10)
    assert await stream_event_ids(bus) == [lost_once, later]
    await eventually(fast_path_on, timeout=5)  # resumed once the table was drained


class AckLosingConsumer(EventConsumer):
    """Drops the ack of every first delivery, as a network failure would, so
    JetStream redelivers a message whose handler transaction has committed."""

    deliveries: list[tuple[str, int]]

    async def handle(self, msg: Any) -> None:
        delivered = msg.metadata.num_delivered
        self.deliveries.append((Envelope.model_validate_json(msg.data).id, delivered))
        if delivered == 1:

            async def lost_ack() -> None:
                return None

            msg.ack = lost_ack
        await super().handle(msg)


async def test_x02_redelivered_message_changes_nothing(rig: Rig) -> None:
    pdb = await rig.database("producer", PRODUCER)
    pbus = await rig.bus("producer")
    cdb = await rig.database("consumer", CONSUMER_SERVICE, applied=True)
    cbus = await rig.bus("consumer")
    consumer = AckLosingConsumer(
        cdb, cbus, region_subscription(apply_event, ack_wait=1.0), service=CONSUMER_SERVICE
    )
    consumer.deliveries = []
    rig.consumer(cdb, cbus, consumer)

    async with pdb.transaction() as session:
        envelope = await emit(session, region())
    assert await rig.relay(pdb, pbus).relay_once() == 1

    async def redelivered_and_acked() -> bool:
        if (envelope.id, 2) not in consumer.deliveries:
            return False
        info = await cbus.js.consumer_info(STREAM, consumer.durable)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(redelivered_and_acked, timeout=15)
    assert consumer.deliveries == [(envelope.id, 1), (envelope.id, 2)]
    assert await applied_counts(cdb) == {envelope.id: 1}
    assert await inbox_count(cdb, envelope.id) == 1


async def test_x02_same_event_published_again_under_another_msg_id_is_applied_once(
    rig: Rig,
) -> None:
    """Past the server's de-duplication window only the inbox protects."""
    pdb = await rig.database("producer", PRODUCER)
    pbus = await rig.bus("producer")
    cdb = await rig.database("consumer", CONSUMER_SERVICE, applied=True)
    cbus = await rig.bus("consumer")
    consumer = rig.consumer(cdb, cbus)

    async with pdb.transaction() as session:
        envelope = await emit(session, region())
    assert await rig.relay(pdb, pbus).relay_once() == 1
    await eventually(lambda: applied_counts(cdb), timeout=10)

    ack = await pbus.js.publish(
        envelope.type,
        envelope.model_dump_json().encode(),
        headers={"Nats-Msg-Id": f"replayed-{envelope.id}"},
    )
    assert ack.duplicate is not True and ack.seq == 2

    async def both_acked() -> bool:
        info = await cbus.js.consumer_info(STREAM, consumer.durable)
        return info.delivered.stream_seq == 2 and info.num_ack_pending == 0

    await eventually(both_acked, timeout=10)
    assert await applied_counts(cdb) == {envelope.id: 1}
    assert await inbox_count(cdb, envelope.id) == 1


async def test_x02_handler_that_always_raises_is_dead_lettered_after_max_deliver(
    rig: Rig,
) -> None:
    pdb = await rig.database("producer", PRODUCER)
    pbus = await rig.bus("producer")
    cdb = await rig.database("consumer", CONSUMER_SERVICE, applied=True)
    cbus = await rig.bus("consumer")
    calls: list[str] = []

    async def handler(session: Any, envelope: Envelope) -> None:
        calls.append(envelope.subject)
        await apply_event(session, envelope)  # rolled back with the failure
        if envelope.subject == "r-poison":
            raise ValueError(f"cannot apply region {envelope.subject}: profile missing")

    consumer = rig.consumer(
        cdb,
        cbus,
        EventConsumer(
            cdb,
            cbus,
            region_subscription(handler, max_deliver=3, retry_delays=(0.05, 0.1), ack_wait=5.0),
            service=CONSUMER_SERVICE,
        ),
    )
    async with pdb.transaction() as session:
        poison = await emit(session, region("r-poison"))
    async with pdb.transaction() as session:
        good = await emit(session, region("r-good"))
    assert await rig.relay(pdb, pbus).relay_once() == 2

    async def dead_letters() -> list[Any]:
        async with cdb.read() as session:
            return list((await session.execute(select(dead_letter_table))).all())

    [row] = await eventually(dead_letters, timeout=15)
    assert row.consumer == consumer.durable == f"{CONSUMER_SERVICE}-regions"
    assert row.event_id == poison.id
    assert row.type == RegionUpserted.TYPE
    assert row.attempts == 3
    assert "ValueError" in row.error and "profile missing" in row.error
    assert Envelope.model_validate_json(row.payload) == poison

    # Published on deadletter.> into the DEADLETTER stream, error attached.
    [dead] = await stream_messages(cbus, "DEADLETTER")
    assert dead.subject == f"deadletter.{CONSUMER_SERVICE}.{RegionUpserted.TYPE}"
    assert Envelope.model_validate_json(dead.data) == poison
    assert "profile missing" in json.loads(dead.headers["Error"])

    # Terminated: no fourth attempt; nothing of it applied; the next event
    # was not held up.
    async def settled() -> bool:
        info = await cbus.js.consumer_info(STREAM, consumer.durable)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(settled, timeout=10)
    # Three deliveries; the first may also have run once inside a batch that
    # rolled back before the event was retried alone.
    assert calls.count("r-poison") in (3, 4)
    assert await applied_counts(cdb) == {good.id: 1}
    assert await inbox_count(cdb, poison.id) == 0
    assert await inbox_count(cdb, good.id) == 1
