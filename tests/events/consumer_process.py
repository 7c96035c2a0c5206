"""A consuming service for the X-02 event tests, runnable as its own process.

The tests import the pieces (the `applied` table that counts how many times
each event was applied, and the handler that bumps it); the kill-mid-batch
fault test runs the consumer as a real process:

    python -m tests.events.consumer_process NATS_URL DATABASE_URL [DELAY_SECONDS]

(from the repository root). The handler sleeps DELAY_SECONDS per event inside
its transaction, so a SIGKILL lands while a batch is in flight. SIGTERM or
SIGINT stop it cleanly. The database's tables must already exist.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database
from chassis.events import Bus
from chassis.messaging import EventConsumer, Handler, Subscription, messaging_metadata
from contracts.base import Envelope
from contracts.identity import RegionUpserted

CONSUMER_SERVICE = "regionsink"
SUBSCRIPTION_NAME = "regions"

applied_metadata = MetaData()
applied_table = Table(
    "applied",
    applied_metadata,
    Column("event_id", String(36), primary_key=True),
    Column("count", Integer, nullable=False),
)


async def apply_event(session: AsyncSession, envelope: Envelope) -> None:
    """The side effect under test: count one application of `envelope`.

    An upsert, so a second application shows up as count == 2 instead of
    failing on the primary key (the inbox, not this table, must prevent it).
    """
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(applied_table).values(event_id=envelope.id, count=1)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[applied_table.c.event_id],
            set_={"count": applied_table.c.count + 1},
        )
    )


def slow_handler(delay: float) -> Handler:
    async def handle(session: AsyncSession, envelope: Envelope) -> None:
        await apply_event(session, envelope)
        if delay > 0:
            await asyncio.sleep(delay)  # still inside the transaction

    return handle


def region_subscription(handler: Handler, **options: object) -> Subscription:
    return Subscription(
        SUBSCRIPTION_NAME,
        "identity",
        {RegionUpserted.TYPE: handler},
        **options,  # type: ignore[arg-type]
    )


async def create_tables(db: Database, *, applied: bool = False) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(messaging_metadata.create_all)
        if applied:
            await conn.run_sync(applied_metadata.create_all)


async def applied_counts(db: Database) -> dict[str, int]:
    async with db.read() as session:
        rows = (
            await session.execute(select(applied_table.c.event_id, applied_table.c.count))
        ).all()
    return {r.event_id: r.count for r in rows}


async def applied_total(db: Database) -> int:
    async with db.read() as session:
        return int(
            (await session.execute(select(func.count()).select_from(applied_table))).scalar_one()
        )


# The subprocess consumer's durable settings: short ack wait so messages held
# by a killed process come back quickly; small batches.
KILL_TEST_OPTIONS: dict[str, object] = {"ack_wait": 2.0, "batch": 16, "max_deliver": 20}


async def run(nats_url: str, database_url: str, delay: float) -> None:
    db = Database(database_url, service=CONSUMER_SERVICE)
    bus = Bus([nats_url], name=f"{CONSUMER_SERVICE}-process")
    bus.start()
    consumer = EventConsumer(
        db,
        bus,
        region_subscription(slow_handler(delay), **KILL_TEST_OPTIONS),
        service=CONSUMER_SERVICE,
    )
    consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("consumer started", flush=True)
    try:
        await stop.wait()
    finally:
        await consumer.stop()
        await bus.close()
        await db.dispose()


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        sys.exit(__doc__)
    delay = float(argv[2]) if len(argv) == 3 else 0.0
    asyncio.run(run(argv[0], argv[1], delay))


if __name__ == "__main__":
    main(sys.argv[1:])
