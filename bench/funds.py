"""Funds ledger benchmark (FUND-09): balanced postings per second through the service.

    .venv/bin/python bench/funds.py [--rounds 3] [--single 3000] [--concurrency 64]
                                    [--batches 100] [--batch-clients 4]
    BENCH_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/bench_funds \\
        .venv/bin/python bench/funds.py
    BENCH_PROFILE=/tmp/funds.prof .venv/bin/python bench/funds.py   # cProfile the service

Starts, each in its own process as a deployment runs them: an embedded NATS
JetStream server and the funds service, served as ``shuangjian serve funds``
serves it (uvicorn, its full lifespan: migrations, outbox relay, consumers,
the periodic sweep), verifying tokens against the bench's JWKS file (no
identity service here). The database is a SQLite file in a temporary
directory, or a fresh PostgreSQL database created next to the one named by
BENCH_DATABASE_URL (on the same server, with that URL's credentials; dropped
afterwards), so every run starts from an empty journal and the service's
start-up sweep has nothing to scan; the raw SQL baseline writes a
``bench_raw_*`` pair of tables there. This process prepares the data (licensed
institution, open escrow account, paid contracts through the service's use
cases; the lessons inserted in bulk as ``report_lesson`` leaves them, which
is set-up, not measured) and is the load generator: one aiohttp session per
phase (fresh connections), every request with the parent's access token and
an Idempotency-Key.

After a short warm-up (not measured), each of ``--rounds`` rounds measures,
in this order:

(a) single requests: ``POST /lessons/{id}/answer`` (one lesson confirmed →
    one journal transaction released from the contract's escrow, and the
    reserve's release with a contract's last lesson), ``--single`` of them
    from ``--concurrency`` clients at once; the service's posting
    writer groups the requests waiting together into one transaction and one
    commit (services/funds/writer.py);
(b) batched: ``POST /lessons/confirmations`` with 120 lessons each (two
    contracts of 60: one journal transaction per lesson plus the two reserve
    releases at completion, 122 postings), ``--batches`` of them from
    ``--batch-clients`` clients at once (batches waiting together also share
    one group transaction);
(c) the baseline: raw SQL inserts of the same number of rows of the same
    shape (a transaction header and its three legs) into scratch tables,
    from this process on one connection — one database commit per posting
    for (a), one per 122 postings for (b) — and the ratios service/raw.

Postings are counted from the journal's head sequence. It prints per round
the rates, the CPU seconds the service process and this process used per
1,000 postings, and the median over the rounds beside the targets (>= 1,000/s
single, >= 5,000/s batched, on PostgreSQL) with PASS/FAIL; then the posting
writer's group statistics and the journal checks (chain verifies, trial
balance zero). It reports, it does not assert; it exits 0 when it ran to
completion. All processes share the machine's cores (the load generator
too): figures depend on the machine and on whatever else runs on it;
compare the service/raw ratios of one run rather than absolute rates across
runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from sqlalchemy import (  # noqa: E402
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    insert,
    select,
    update,
)

from chassis.auth import Principal  # noqa: E402
from chassis.db import Database, utcnow  # noqa: E402
from chassis.policy import PolicyRegistry  # noqa: E402
from chassis.roster import upsert  # noqa: E402
from contracts import institutions as inst  # noqa: E402
from contracts.base import Envelope  # noqa: E402
from launcher.nats_server import EmbeddedNats, free_port  # noqa: E402
from services.funds import ledger, service  # noqa: E402
from services.funds.models import Contract, LedgerHead, Lesson, roster  # noqa: E402
from services.identity.tokens import SigningKey, TokenIssuer  # noqa: E402

ISSUER = "https://identity.bench"
AUDIENCE = "shuangjian"
PRICE = 8000
LESSONS = 60

raw_meta = MetaData()
raw_txn = Table(
    "bench_raw_txn",
    raw_meta,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("kind", String(40)),
    Column("ref", String(64)),
    Column("memo", String(200)),
    Column("bank_ref", String(64)),
    Column("bank_id", String(64)),
    Column("posted_at", String(40)),
    Column("prev_hash", String(64)),
    Column("hash", String(64)),
)
raw_entries = Table(
    "bench_raw_entries",
    raw_meta,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("seq", BigInteger().with_variant(Integer(), "sqlite")),
    Column("leg", Integer),
    Column("account", String(120)),
    Column("amount_fen", BigInteger().with_variant(Integer(), "sqlite")),
)


# ---------------------------------------------------------------- child: the service


def serve_service(port: int, jwks_file: str, stats_file: str) -> None:
    """Child mode: the funds service as ``shuangjian serve funds`` runs it,
    verifying tokens against a JWKS file. On shutdown it writes the posting
    writer's statistics to ``stats_file`` (and, with BENCH_PROFILE set, the
    cProfile of the whole process to that path)."""
    import uvicorn

    from chassis.auth import StaticKeySource
    from services.funds.app import create_app

    os.environ.setdefault("GC_FREEZE", "true")  # as `shuangjian serve` does
    app = create_app(key_source=StaticKeySource(json.loads(Path(jwks_file).read_text())))

    def serve() -> None:
        # Stopped with SIGINT: uvicorn shuts down gracefully, then re-raises it.
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.run(
                app,
                host="127.0.0.1",
                port=port,
                log_config=None,
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=5,
            )

    profile = os.environ.get("BENCH_PROFILE")
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(serve)
        profiler.dump_stats(profile)
    else:
        serve()
    stats = app.state.ctx.extras["posting_writer"].stats
    Path(stats_file).write_text(json.dumps(stats.__dict__))


# ---------------------------------------------------------------- set-up


def facts(institution_id: str) -> dict[str, Any]:
    return {
        "institution_id": institution_id,
        "name": "基准测试培训学校",
        "region_id": "jinhua",
        "category": "arts",
        "department": "culture",
        "credit_code": "91330700MA2XXXXX0X",
        "licence_number": "LIC-BENCH",
        "status": "licensed",
        "profit_status": "non_profit",
        "blacklisted": False,
        "reregistration_pending": False,
        "can_enroll": True,
        "can_charge": True,
        "reason": "基准",
        "actor": "bench",
        "occurred_at": dt.datetime.now(dt.UTC),
    }


async def head(db: Database) -> int:
    async with db.read() as s:
        return int((await s.execute(select(LedgerHead.seq))).scalar_one())


async def prepare(
    db: Database, policies: PolicyRegistry, contracts: int, tag: str
) -> tuple[str, list[list[str]]]:
    """An institution, a guardian with ``contracts`` paid contracts (the
    service's purchase and payment use cases) and every lesson reported (the
    first through ``report_lesson``, the other 59 inserted in bulk as it
    leaves them); returns the guardian id and the lesson ids per contract."""
    today = service.today_in_china()
    inst_id = f"bench-{tag}"
    guardian = f"g-{tag}"
    async with db.transaction() as s:
        await service.on_institution_facts(
            s, Envelope.wrap(inst.LicenceGranted(**facts(inst_id)), source="institutions")
        )
        course = inst.CourseFiled(
            institution_id=inst_id,
            region_id="jinhua",
            course_id=f"{inst_id}-c",
            name="基准课程",
            subject="art",
            subject_category="arts",
            mode="offline",
            target_grades=[3],
            price_per_lesson_fen=PRICE,
            lesson_count=LESSONS,
            lesson_minutes=45,
            class_size_band="10to35",
            period_start=today - dt.timedelta(days=1),
            period_end=today + dt.timedelta(days=80),
            filed_at=dt.datetime.now(dt.UTC),
        )
        await service.on_course_filed(s, Envelope.wrap(course, source="institutions"))
        for k in range(contracts):
            await upsert(
                s,
                roster.guardianships,
                {
                    "guardian_id": guardian,
                    "student_id": f"{guardian}-s{k}",
                    "relation": "parent",
                    "synced_at": utcnow(),
                },
            )
        bank = Principal(
            subject="bank", kind="user", roles=frozenset({"bank"}), tenants=frozenset({"bank:b"})
        )
        await service.open_account(s, bank, "b", inst_id, "62220000")
    parent = Principal(
        subject=guardian, kind="user", roles=frozenset({"parent"}), person_id=guardian
    )
    institution = Principal(
        subject="i",
        kind="user",
        roles=frozenset({"institution"}),
        tenants=frozenset({f"institution:{inst_id}"}),
    )
    lesson_ids: list[list[str]] = []
    per_txn = 20
    for first in range(0, contracts, per_txn):
        async with db.transaction() as s:
            for k in range(first, min(contracts, first + per_txn)):
                contract = await service.purchase(
                    s,
                    policies,
                    parent,
                    service.PurchaseInput(
                        institution_id=inst_id,
                        course_id=f"{inst_id}-c",
                        student_id=f"{guardian}-s{k}",
                        lessons=LESSONS,
                        price_per_lesson_fen=PRICE,
                        starts_on=today,
                        ends_on=today + dt.timedelta(days=60),
                        mode="prepaid",
                    ),
                    today,
                )
                await service.confirm_payment(
                    s,
                    policies,
                    "b",
                    service.PaymentInput(contract.id, contract.total_fen, uuid.uuid4().hex, "6217"),
                )
                one = await service.report_lesson(
                    s, policies, institution, contract.id, today, today
                )
                rest = [
                    {
                        "id": str(uuid.uuid4()),
                        "contract_id": contract.id,
                        "institution_id": inst_id,
                        "seq": one.seq + i,
                        "delivered_on": today,
                        "reported_at": utcnow(),
                        "auto_confirm_on": one.auto_confirm_on,
                        "status": "reported",
                        "released": False,
                        "dispute_overdue_reported": False,
                    }
                    for i in range(1, LESSONS)
                ]
                await s.execute(insert(Lesson.__table__), rest)
                await s.execute(
                    update(Contract)
                    .where(Contract.id == contract.id)
                    .values(
                        next_lesson_seq=one.seq + LESSONS,
                        reported_lessons=Contract.reported_lessons + len(rest),
                    )
                    .execution_options(synchronize_session=False)
                )
                lesson_ids.append([one.id] + [r["id"] for r in rest])
    return guardian, lesson_ids


# ---------------------------------------------------------------- raw SQL baseline


def _raw_rows(n: int, start: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    txns, entries = [], []
    for i in range(n):
        seq = start + i
        txns.append(
            {
                "seq": seq,
                "kind": "release",
                "ref": str(uuid.uuid4()),
                "memo": "一课一消：确认课次划转",
                "bank_ref": None,
                "bank_id": None,
                "posted_at": utcnow().isoformat(),
                "prev_hash": "0" * 64,
                "hash": uuid.uuid4().hex * 2,
            }
        )
        for leg, (account, amount) in enumerate(
            (("escrow:x", -PRICE), ("reserve:x", 800), ("releasable:x", PRICE - 800))
        ):
            entries.append({"seq": seq, "leg": leg, "account": account, "amount_fen": amount})
    return txns, entries


async def raw_rate(db: Database, postings: int, per_txn: int, start: int) -> float:
    """Raw SQL inserts of ``postings`` transactions with their legs, ``per_txn`` per commit."""
    txns, entries = _raw_rows(postings, start)
    began = time.perf_counter()
    for i in range(0, postings, per_txn):
        chunk = txns[i : i + per_txn]
        async with db.transaction() as s:
            await s.execute(raw_txn.insert(), chunk)
            await s.execute(raw_entries.insert(), entries[3 * i : 3 * (i + len(chunk))])
    return postings / (time.perf_counter() - began)


# ---------------------------------------------------------------- load


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one when pid is None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_up(
    session: aiohttp.ClientSession, url: str, child: Any, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError("the funds service exited while starting")
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


async def post_all(
    session: aiohttp.ClientSession,
    requests: list[tuple[str, bytes, dict[str, str]]],
    clients: int,
) -> None:
    """Send ``requests`` (url, body, headers) from ``clients`` concurrent clients."""
    queue = iter(requests)

    async def client() -> None:
        for url, body, headers in queue:
            async with session.post(url, data=body, headers=headers) as r:
                text = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{r.status} {text[:300]!r}")

    await asyncio.gather(*(client() for _ in range(clients)))


class Phase:
    def __init__(self, name: str) -> None:
        self.name = name
        self.rates: list[float] = []
        self.raw: list[float] = []
        self.service_cpu: list[float] = []  # CPU seconds per 1,000 postings
        self.load_cpu: list[float] = []
        self.postings = 0
        self.per_request = 0

    async def measure(
        self,
        db: Database,
        pid: int,
        base: str,
        requests: list[tuple[str, bytes, dict[str, str]]],
        clients: int,
    ) -> tuple[int, float]:
        seq0 = await head(db)
        # Fresh connections: idle ones may have been closed by the server's
        # keep-alive timeout while this process prepared or ran raw SQL.
        async with aiohttp.ClientSession(
            base_url=base, connector=aiohttp.TCPConnector(limit=0)
        ) as session:
            cpu_s, cpu_l = cpu_seconds(pid), cpu_seconds()
            began = time.perf_counter()
            await post_all(session, requests, clients)
            elapsed = time.perf_counter() - began
        cpu_s, cpu_l = cpu_seconds(pid) - cpu_s, cpu_seconds() - cpu_l
        postings = await head(db) - seq0
        self.rates.append(postings / elapsed)
        self.service_cpu.append(1000 * cpu_s / postings)
        self.load_cpu.append(1000 * cpu_l / postings)
        self.postings += postings
        self.per_request = postings // len(requests)
        return postings, elapsed


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def create_pg_database(url: str) -> str:
    """A fresh database on the server of ``url``; its SQLAlchemy URL."""
    import asyncpg

    name = f"bench_funds_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{url.rsplit('/', 1)[0]}/{name}"


async def drop_pg_database(url: str, scratch: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{scratch.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


def start_service(
    env: dict[str, str], port: int, jwks_file: Path, stats_file: Path
) -> subprocess.Popen[bytes]:
    log = (jwks_file.parent / "service.log").open("wb")  # its warnings, if any
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-service",
            str(port),
            str(jwks_file),
            str(stats_file),
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )


async def run(args: argparse.Namespace) -> None:
    logging.disable(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-funds-"))
    nats = EmbeddedNats(tmp / "nats").start()
    given = os.environ.get("BENCH_DATABASE_URL")
    scratch = await create_pg_database(given) if given else None
    url = scratch or f"sqlite+aiosqlite:///{tmp / 'funds.sqlite3'}"
    key = SigningKey.load_or_create(tmp / "key.pem")
    issuer = TokenIssuer([key], issuer=ISSUER, audience=AUDIENCE)
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps(issuer.jwks()))
    stats_file = tmp / "writer-stats.json"
    port = free_port()
    (tmp / "var").mkdir()
    env = {
        **os.environ,
        "VAR_DIR": str(tmp / "var"),
        "NATS_URL": nats.url,
        "LOG_LEVEL": "WARNING",
        "AUTH_ISSUER": ISSUER,
        "AUTH_AUDIENCE": AUDIENCE,
        "FUNDS_DATABASE_URL": url,
        "FUNDS_PORT": str(port),
    }
    env.pop("REDIS_URL", None)
    child = start_service(env, port, jwks_file, stats_file)
    base = f"http://127.0.0.1:{port}"
    single, batched = Phase("single"), Phase("batched")
    db: Database | None = None
    try:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            await wait_up(session, f"{base}/healthz", child)
            db = Database(url, service="bench", pool_size=4)
            policies = PolicyRegistry.load()
            async with db.engine.begin() as conn:
                await conn.run_sync(raw_meta.drop_all)
                await conn.run_sync(raw_meta.create_all)
            tag = uuid.uuid4().hex[:6]
            per_round_single = -(-args.single // LESSONS)
            print(
                f"database: {'SQLite' if db.is_sqlite else 'PostgreSQL'}; service pid {child.pid}"
            )
            print(
                f"preparing {args.rounds} x ({per_round_single} + {2 * args.batches}) "
                f"contracts of {LESSONS} lessons …",
                flush=True,
            )
            gw, warm_lessons = await prepare(db, policies, 3, f"w{tag}")
            rounds = []
            for r in range(args.rounds):
                g1, single_lessons = await prepare(db, policies, per_round_single, f"s{r}{tag}")
                g2, batch_lessons = await prepare(db, policies, 2 * args.batches, f"b{r}{tag}")
                rounds.append((g1, single_lessons, g2, batch_lessons))

            def headers_of(guardian: str) -> dict[str, str]:
                token = issuer.access_token(
                    subject=guardian, kind="user", roles=["parent"], tenants=[], person_id=guardian
                )
                return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

            confirm = json.dumps({"confirm": True}).encode()
            # Warm-up, not measured: connections, statement caches, the first
            # groups (one contract's lessons singly, one batch of two).
            hw = headers_of(gw)
            async with aiohttp.ClientSession(base_url=base) as warm:
                await post_all(
                    warm,
                    [
                        (f"/lessons/{lid}/answer", confirm, {**hw, "Idempotency-Key": lid})
                        for lid in warm_lessons[0]
                    ],
                    args.concurrency,
                )
                await post_all(
                    warm,
                    [
                        (
                            "/lessons/confirmations",
                            json.dumps({"lesson_ids": warm_lessons[1] + warm_lessons[2]}).encode(),
                            {**hw, "Idempotency-Key": f"warm-{tag}"},
                        )
                    ],
                    1,
                )
            raw_start = 1
            for r, (g1, single_lessons, g2, batch_lessons) in enumerate(rounds, 1):
                h1 = headers_of(g1)
                ids = [lid for ids in single_lessons for lid in ids][: args.single]
                reqs = [
                    (f"/lessons/{lid}/answer", confirm, {**h1, "Idempotency-Key": lid})
                    for lid in ids
                ]
                n1, s1 = await single.measure(db, child.pid, base, reqs, args.concurrency)
                h2 = headers_of(g2)
                reqs = [
                    (
                        "/lessons/confirmations",
                        json.dumps(
                            {"lesson_ids": batch_lessons[2 * b] + batch_lessons[2 * b + 1]}
                        ).encode(),
                        {**h2, "Idempotency-Key": f"batch-{r}-{tag}-{b}"},
                    )
                    for b in range(args.batches)
                ]
                n2, s2 = await batched.measure(db, child.pid, base, reqs, args.batch_clients)
                single.raw.append(await raw_rate(db, n1, 1, raw_start))
                raw_start += n1
                batched.raw.append(await raw_rate(db, n2, batched.per_request, raw_start))
                raw_start += n2
                print(
                    f"round {r}: (a) {n1} postings in {s1:.2f}s = {single.rates[-1]:,.0f}/s "
                    f"(raw {single.raw[-1]:,.0f}/s, ratio {single.rates[-1] / single.raw[-1]:.2f});"
                    f" (b) {n2} postings in {s2:.2f}s = {batched.rates[-1]:,.0f}/s "
                    f"(raw {batched.raw[-1]:,.0f}/s, ratio "
                    f"{batched.rates[-1] / batched.raw[-1]:.2f}); CPU s per 1,000 postings "
                    f"service/load: (a) {single.service_cpu[-1]:.2f}/{single.load_cpu[-1]:.2f}"
                    f" (b) {batched.service_cpu[-1]:.2f}/{batched.load_cpu[-1]:.2f}",
                    flush=True,
                )
            async with db.read() as s:
                chain = await ledger.verify_chain(s)
                tb = await ledger.trial_balance(s)
                unreleased = await s.scalar(
                    select(Lesson.id)
                    .where(Lesson.status == "confirmed", Lesson.released.is_(False))
                    .limit(1)
                )
        finally:
            await session.close()
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
        nats.stop()
        if db is not None:
            await db.dispose()
        if given and scratch:
            await drop_pg_database(given, scratch)

    def verdict(value: float, target: float) -> str:
        return "PASS" if value >= target else "FAIL"

    med = statistics.median
    print(f"median of {args.rounds} rounds:")
    print(
        f"(a) single requests ({args.concurrency} clients, {args.single} per round): "
        f"{med(single.rates):,.0f} postings/s  [target >= 1,000/s: "
        f"{verdict(med(single.rates), 1000)}]"
    )
    print(
        f"(b) batched ({batched.per_request} postings per request, {args.batch_clients} clients, "
        f"{args.batches} per round): {med(batched.rates):,.0f} postings/s  "
        f"[target >= 5,000/s: {verdict(med(batched.rates), 5000)}]"
    )
    print(
        f"(c) raw SQL inserts of the same rows: one commit per posting {med(single.raw):,.0f}/s "
        f"(service/raw {med(a / b for a, b in zip(single.rates, single.raw, strict=True)):.2f}); "
        f"one commit per {batched.per_request} postings {med(batched.raw):,.0f}/s (service/raw "
        f"{med(a / b for a, b in zip(batched.rates, batched.raw, strict=True)):.2f})"
    )
    if stats_file.exists():
        stats = json.loads(stats_file.read_text())
        print(
            f"posting writer: {stats['requests']} requests in {stats['groups']} commits "
            f"(largest group {stats['largest_group']}, {stats['setwise']} answered set-wise, "
            f"{stats['failed_groups']} failed groups)"
        )
    print(
        f"journal: chain {'verifies' if chain.ok else 'BROKEN at ' + str(chain.first_broken_seq)}"
        f" ({chain.transactions} transactions), trial balance "
        f"{'zero' if tb.ok else 'NOT ZERO'}; unreleased confirmed lessons: "
        f"{'none' if unreleased is None else 'some'}"
    )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-service":
        serve_service(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", type=int, default=3000, help="single requests per round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batches", type=int, default=100, help="batch requests per round")
    parser.add_argument("--batch-clients", type=int, default=4)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
