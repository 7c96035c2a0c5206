"""X-02 fault injection: the two scenarios of the spec.

1. The NATS server stops while 1,000 events are produced and starts again
   30 s later: every event arrives and is handled once.
2. A consumer process is killed in the middle of a batch: nothing is lost,
   nothing is applied twice.

Both use real processes (nats-server; a consumer in its own Python process)
and real databases, and take real time (the 30 s outage is required).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from chassis.db import Database
from chassis.events import Bus
from chassis.messaging import EventConsumer, OutboxRelay, emit, inbox_table, outbox_table
from contracts.base import STREAMS
from contracts.identity import RegionUpserted
from launcher.nats_server import EmbeddedNats
from tests.events.consumer_process import (
    CONSUMER_SERVICE,
    KILL_TEST_OPTIONS,
    SUBSCRIPTION_NAME,
    applied_counts,
    applied_total,
    apply_event,
    create_tables,
    region_subscription,
)
from tests.support import eventually

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PRODUCER = "identity"
STREAM = STREAMS[PRODUCER].name
DURABLE = f"{CONSUMER_SERVICE}-{SUBSCRIPTION_NAME}"
OUTAGE_SECONDS = 30


def region(i: int) -> RegionUpserted:
    return RegionUpserted(id=f"r-{i:04d}", name=f"区域 {i}", profile_id="jinhua")


async def unpublished(db: Database) -> int:
    async with db.read() as session:
        query = select(func.count()).select_from(outbox_table)
        return int(
            (await session.execute(query.where(outbox_table.c.published_at.is_(None)))).scalar_one()
        )


async def inbox_total(db: Database) -> int:
    async with db.read() as session:
        return int(
            (await session.execute(select(func.count()).select_from(inbox_table))).scalar_one()
        )


async def produce(db: Database, first: int, count: int, ids: list[str], pause: float = 0) -> None:
    """One event per transaction, as use cases emit them."""
    for i in range(first, first + count):
        async with db.transaction() as session:
            ids.append((await emit(session, region(i))).id)
        await asyncio.sleep(pause)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def open_database(stack: AsyncExitStack, url: str, service: str, **kw: Any) -> Database:
    db = Database(url, service=service)
    stack.push_async_callback(db.dispose)
    await create_tables(db, **kw)
    return db


async def open_bus(stack: AsyncExitStack, url: str, name: str) -> Bus:
    bus = Bus([url], name=name)
    bus.start()
    stack.push_async_callback(bus.close)
    await bus.wait_connected(10)
    return bus


async def test_x02_nats_stopped_for_30s_while_1000_events_are_produced_every_event_arrives_once(
    tmp_path: Path, databases: Any, stack: AsyncExitStack
) -> None:
    server = EmbeddedNats(tmp_path / "nats-outage").start()
    stack.callback(server.stop)
    pdb = await open_database(stack, await databases.url("producer"), PRODUCER)
    cdb = await open_database(
        stack, await databases.url("consumer"), CONSUMER_SERVICE, applied=True
    )
    pbus = await open_bus(stack, server.url, "producer")
    cbus = await open_bus(stack, server.url, "consumer")
    relay = OutboxRelay(pdb, pbus, service=PRODUCER)
    relay.start()
    stack.push_async_callback(relay.stop)
    # A short ack wait so deliveries whose acks died with the server come back
    # within the test's budget; correctness does not depend on it.
    consumer = EventConsumer(
        cdb, cbus, region_subscription(apply_event, ack_wait=5.0), service=CONSUMER_SERVICE
    )
    consumer.start()
    stack.push_async_callback(consumer.stop)

    ids: list[str] = []
    await produce(pdb, 0, 300, ids)  # relay and consumer busy meanwhile
    server.kill()  # SIGKILL: no goodbye to clients, nothing flushed on purpose
    killed_at = time.monotonic()
    applied_before = await applied_total(cdb)

    # The remaining 700 are produced while NATS is down; their outbox rows wait.
    rest = asyncio.create_task(produce(pdb, 300, 700, ids))
    await asyncio.sleep(OUTAGE_SECONDS)
    await rest
    assert not pbus.connected and not cbus.connected
    assert await unpublished(pdb) >= 700
    applied_during = await applied_total(cdb)

    server.start()  # the same port and store directory: JetStream data kept
    assert time.monotonic() - killed_at >= OUTAGE_SECONDS

    async def all_arrived() -> bool:
        return await applied_total(cdb) == 1000 and await unpublished(pdb) == 0

    await eventually(all_arrived, timeout=45, interval=0.2)
    assert applied_before < 1000 and applied_during < 1000
    counts = await applied_counts(cdb)
    assert sorted(counts) == sorted(ids) and len(set(ids)) == 1000
    assert {c for c in counts.values()} == {1}, "an event was applied more than once"
    assert await inbox_total(cdb) == 1000
    # Re-published rows were dropped by the server's de-duplication.
    assert (await pbus.js.stream_info(STREAM)).state.messages == 1000


def start_consumer_process(nats_url: str, db_url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.events.consumer_process", nats_url, db_url, "0.01"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def test_x02_consumer_killed_mid_batch_nothing_lost_nothing_applied_twice(
    tmp_path: Path, databases: Any, nats_server: EmbeddedNats, stack: AsyncExitStack
) -> None:
    pdb = await open_database(stack, await databases.url("producer"), PRODUCER)
    consumer_url = await databases.url("consumer")  # a file (or PostgreSQL): shared
    cdb = await open_database(stack, consumer_url, CONSUMER_SERVICE, applied=True)
    pbus = await open_bus(stack, nats_server.url, "producer")
    relay = OutboxRelay(pdb, pbus, service=PRODUCER)
    stack.push_async_callback(relay.stop)
    ids: list[str] = []
    for batch in range(10):
        async with pdb.transaction() as session:
            for i in range(50):
                ids.append((await emit(session, region(batch * 50 + i))).id)
    relay.start()
    await eventually(lambda: _equals(unpublished(pdb), 0), timeout=15)

    log = tmp_path / "consumer-process.log"
    processes: list[subprocess.Popen[bytes]] = []

    def reap() -> None:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()

    stack.callback(reap)
    processes.append(start_consumer_process(nats_server.url, consumer_url, log))

    async def part_way() -> bool:
        # Some applied, and at least two delivered messages not yet acked
        # (~20 ms of work left), so the kill below lands inside a batch.
        assert processes[0].poll() is None, log.read_text()
        if await applied_total(cdb) < 60:
            return False
        return (await pbus.js.consumer_info(STREAM, DURABLE)).num_ack_pending >= 2

    await eventually(part_way, timeout=30, interval=0.02)
    processes[0].send_signal(signal.SIGKILL)
    processes[0].wait()
    applied_at_kill = await applied_total(cdb)
    assert 0 < applied_at_kill < 500
    info = await pbus.js.consumer_info(STREAM, DURABLE)
    assert info.num_ack_pending > 0, "no batch was in flight when the process died"

    processes.append(start_consumer_process(nats_server.url, consumer_url, log))

    async def all_applied() -> bool:
        assert processes[1].poll() is None, log.read_text()
        return await applied_total(cdb) == 500

    await eventually(all_applied, timeout=40, interval=0.1)

    async def settled() -> bool:
        info = await pbus.js.consumer_info(STREAM, DURABLE)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(settled, timeout=15)
    processes[1].terminate()
    assert processes[1].wait(10) == 0, log.read_text()

    counts = await applied_counts(cdb)
    assert sorted(counts) == sorted(ids)
    twice = {k: v for k, v in counts.items() if v != 1}
    assert not twice, f"applied more than once: {twice}"
    assert await inbox_total(cdb) == 500
    assert info.config.ack_wait == KILL_TEST_OPTIONS["ack_wait"]


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected
