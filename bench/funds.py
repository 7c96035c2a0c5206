"""Funds ledger benchmark (FUND-09): balanced postings per second through the service.

    .venv/bin/python bench/funds.py [--single 960] [--batches 5] [--concurrency 64]

Runs the funds service in-process (its real lifespan, HTTP routes through an
ASGI client, Idempotency-Key on every request) against an embedded NATS
server and a SQLite file in a temporary directory, or the PostgreSQL database
named by BENCH_DATABASE_URL (a scratch database: the benchmark migrates it and
adds its own rows and a ``bench_raw_*`` pair of tables). It measures, in one
run:

(a) single requests: ``POST /lessons/{id}/answer`` (one lesson confirmed →
    one journal transaction released from the contract's escrow), from
    ``--concurrency`` clients at once; the service's posting writer groups
    the requests waiting together into one transaction and one commit
    (services/funds/writer.py) — the group sizes are printed;
(b) batched: ``POST /lessons/confirmations`` with 120 lessons (two contracts
    of 60), one journal transaction per lesson plus the two reserve releases
    at completion, all chained under one ledger-head lock;
(c) the baseline: raw SQL inserts of the same rows (a transaction header and
    its legs) into scratch tables of the same shape — one database
    transaction per posting for (a), one per batch for (b) — and the ratios.

Postings are counted from the journal's head sequence. The machine's load
matters (all of it runs in one process: clients, service, NATS); compare the
service/raw ratios of one run rather than absolute rates across runs. It prints the figures
beside the targets (>= 1,000/s single, >= 5,000/s batched, on PostgreSQL) with
PASS/FAIL and exits 0 when it ran to completion (it reports, it does not assert).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chassis.auth import Principal, StaticKeySource  # noqa: E402
from chassis.config import PlatformSettings, service_settings  # noqa: E402
from chassis.db import utcnow  # noqa: E402
from chassis.roster import upsert  # noqa: E402
from contracts import institutions as inst  # noqa: E402
from contracts.base import Envelope  # noqa: E402
from launcher.nats_server import EmbeddedNats  # noqa: E402
from services.funds import ledger, service  # noqa: E402
from services.funds.app import create_app  # noqa: E402
from services.funds.models import LedgerHead, Lesson, roster  # noqa: E402
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


async def head(ctx: Any) -> int:
    async with ctx.db.read() as s:
        return int((await s.execute(select(LedgerHead.seq))).scalar_one())


async def prepare(ctx: Any, contracts: int, tag: str) -> tuple[str, list[list[str]]]:
    """An institution, a guardian with ``contracts`` paid contracts and every
    lesson reported; returns the guardian id and the lesson ids per contract."""
    today = service.today_in_china()
    inst_id = f"bench-{tag}"
    guardian = f"g-{tag}"
    async with ctx.db.transaction() as s:
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
    for k in range(contracts):
        async with ctx.db.transaction() as s:
            contract = await service.purchase(
                s,
                ctx.policies,
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
                ctx.policies,
                "b",
                service.PaymentInput(contract.id, contract.total_fen, uuid.uuid4().hex, "6217"),
            )
            ids = []
            for _ in range(LESSONS):
                lesson = await service.report_lesson(
                    s, ctx.policies, institution, contract.id, today, today
                )
                ids.append(lesson.id)
            lesson_ids.append(ids)
    return guardian, lesson_ids


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


async def raw_rate(ctx: Any, postings: int, per_txn: int, start: int) -> float:
    """Raw SQL inserts of ``postings`` transactions with their legs, ``per_txn`` per commit."""
    txns, entries = _raw_rows(postings, start)
    began = time.perf_counter()
    for i in range(0, postings, per_txn):
        chunk = txns[i : i + per_txn]
        seqs = {t["seq"] for t in chunk}
        async with ctx.db.transaction() as s:
            await s.execute(raw_txn.insert(), chunk)
            await s.execute(raw_entries.insert(), [e for e in entries if e["seq"] in seqs])
    return postings / (time.perf_counter() - began)


async def run(args: argparse.Namespace) -> None:
    logging.disable(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench-funds-"))
    nats = EmbeddedNats(tmp / "nats").start()
    url = os.environ.get("BENCH_DATABASE_URL") or f"sqlite+aiosqlite:///{tmp / 'funds.sqlite3'}"
    key = SigningKey.load_or_create(tmp / "key.pem")
    issuer = TokenIssuer([key], issuer=ISSUER, audience=AUDIENCE)
    platform = PlatformSettings(
        NATS_URL=nats.url,
        VAR_DIR=tmp,
        AUTH_ISSUER=ISSUER,
        AUTH_AUDIENCE=AUDIENCE,
        LOG_LEVEL="WARNING",
    )
    app = create_app(
        settings=service_settings("funds", database_url=url, db_pool_size=args.concurrency + 4),
        platform=platform,
        key_source=StaticKeySource(issuer.jwks()),
    )
    try:
        async with app.router.lifespan_context(app):
            ctx = app.state.ctx
            async with ctx.db.engine.begin() as conn:
                await conn.run_sync(raw_meta.drop_all)
                await conn.run_sync(raw_meta.create_all)
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://funds"
            )
            tag = uuid.uuid4().hex[:6]
            contracts_single = -(-args.single // LESSONS)
            print(f"database: {'PostgreSQL' if not ctx.db.is_sqlite else 'SQLite'}")
            print(f"preparing {contracts_single} + {2 * args.batches} contracts of {LESSONS} …")
            guardian, single_lessons = await prepare(ctx, contracts_single, f"s{tag}")
            token = issuer.access_token(
                subject=guardian, kind="user", roles=["parent"], tenants=[], person_id=guardian
            )
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            body = json.dumps({"confirm": True}).encode()

            # (a) single requests
            queue = [lid for ids in single_lessons for lid in ids][: args.single]
            per_worker = [queue[i :: args.concurrency] for i in range(args.concurrency)]

            async def worker(ids: list[str]) -> None:
                for lid in ids:
                    r = await client.post(
                        f"/lessons/{lid}/answer",
                        content=body,
                        headers={**headers, "Idempotency-Key": lid},
                    )
                    if r.status_code != 200:
                        raise RuntimeError(r.text)

            seq0 = await head(ctx)
            began = time.perf_counter()
            await asyncio.gather(*(worker(ids) for ids in per_worker))
            single_s = time.perf_counter() - began
            single_postings = await head(ctx) - seq0
            single_rate = single_postings / single_s

            # (b) batched lesson releases
            g2, batch_lessons = await prepare(ctx, 2 * args.batches, f"b{tag}")
            token2 = issuer.access_token(
                subject=g2, kind="user", roles=["parent"], tenants=[], person_id=g2
            )
            headers2 = {"Authorization": f"Bearer {token2}", "Content-Type": "application/json"}
            seq0 = await head(ctx)
            began = time.perf_counter()
            for b in range(args.batches):
                ids = batch_lessons[2 * b] + batch_lessons[2 * b + 1]
                r = await client.post(
                    "/lessons/confirmations",
                    content=json.dumps({"lesson_ids": ids}).encode(),
                    headers={**headers2, "Idempotency-Key": f"batch-{tag}-{b}"},
                )
                if r.status_code != 200:
                    raise RuntimeError(r.text)
            batch_s = time.perf_counter() - began
            batch_postings = await head(ctx) - seq0
            batch_rate = batch_postings / batch_s
            per_batch = batch_postings // args.batches

            # (c) raw SQL baseline, same rows
            raw_single = await raw_rate(ctx, single_postings, 1, 1)
            raw_batch = await raw_rate(ctx, batch_postings, per_batch, 10_000_000)

            async with ctx.db.read() as s:
                chain = await ledger.verify_chain(s)
                tb = await ledger.trial_balance(s)
                released = await s.scalar(
                    select(Lesson.id).where(Lesson.released.is_(False)).limit(1)
                )
            stats = ctx.extras["posting_writer"].stats
            await client.aclose()
    finally:
        nats.stop()

    def verdict(value: float, target: float) -> str:
        return "PASS" if value >= target else "FAIL"

    print(
        f"(a) single requests ({args.concurrency} clients): {single_postings} postings in "
        f"{single_s:.2f}s = {single_rate:,.0f}/s  [target >= 1,000/s: "
        f"{verdict(single_rate, 1000)}]"
    )
    print(
        f"(b) batched ({per_batch} postings per request): {batch_postings} postings in "
        f"{batch_s:.2f}s = {batch_rate:,.0f}/s  [target >= 5,000/s: {verdict(batch_rate, 5000)}]"
    )
    print(
        f"(c) raw SQL inserts of the same rows: one commit per posting {raw_single:,.0f}/s "
        f"(service/raw {single_rate / raw_single:.2f}); one commit per batch "
        f"{raw_batch:,.0f}/s (service/raw {batch_rate / raw_batch:.2f})"
    )
    print(
        f"posting writer: {stats.requests} requests in {stats.groups} commits "
        f"(largest group {stats.largest_group}, {stats.setwise} answered set-wise, "
        f"{stats.failed_groups} failed groups)"
    )
    print(
        f"journal: chain {'verifies' if chain.ok else 'BROKEN at ' + str(chain.first_broken_seq)}"
        f" ({chain.transactions} transactions), trial balance "
        f"{'zero' if tb.ok else 'NOT ZERO'}; unreleased confirmed lessons: "
        f"{'none' if released is None else 'some'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=960)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
