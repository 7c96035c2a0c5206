"""After-school enrollment rush benchmark (AS-04).

    .venv/bin/python bench/enrollment.py [--students 5000] [--concurrency 64]

Starts its own NATS JetStream server and the afterschool service in-process
(its full lifespan: migrations, outbox relay, consumers) on a SQLite file in a
temporary directory, or on a fresh PostgreSQL database created under
BENCH_POSTGRES_URL (an admin URL such as postgresql://postgres@127.0.0.1:5432/postgres;
the database is dropped afterwards). Requests go directly to the service's
ASGI app (no sockets, no gateway: the gateway's own cost is not measured).
Every request carries a fresh access token's Authorization and an
Idempotency-Key, as a parent's app would send.

It measures, in one run:

(a) one hot course (100 seats): every student taps once; enrollments/s,
    p50/p99 latency (held or waitlisted answers);
(b) sold out: further students ask for the full hot course without the
    waitlist; p50/p99 of the "full" answers;
(c) 100 courses (50 seats each): every student enrolls in one; enrollments/s;
(d) the raw SQL of the same transaction (idempotency claim, own-child lock,
    course and plan, clash check, seat UPDATE, enrollment and outbox INSERT,
    response remembered) on the same engine at the same concurrency, and the
    ratio API / raw.

It checks the invariants after each phase (seats taken = enrollments held,
none oversold, no student twice) and prints the figures beside the targets
(PostgreSQL: >= 1,000 enrollments/s on one hot course, p99 <= 100 ms,
sold-out p99 <= 20 ms). It reports; it exits 0 when it ran to completion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from sqlalchemy import func, select, text

from chassis.auth import StaticKeySource
from chassis.config import PlatformSettings, service_settings
from chassis.db import utcnow
from launcher.nats_server import EmbeddedNats
from services.afterschool.app import create_app
from services.afterschool.models import Course, Enrollment
from services.identity.tokens import SigningKey, TokenIssuer
from tests.afterschool import helpers

ISSUER = "https://identity.bench"
AUDIENCE = "shuangjian"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[k]


async def run_load(
    n: int, concurrency: int, one: Callable[[int], Awaitable[tuple[int, float]]]
) -> tuple[float, list[tuple[int, float]]]:
    gate = asyncio.Semaphore(concurrency)

    async def guarded(i: int) -> tuple[int, float]:
        async with gate:
            return await one(i)

    started = time.perf_counter()
    results = await asyncio.gather(*(guarded(i) for i in range(n)))
    return time.perf_counter() - started, list(results)


async def check(db: Any, course_ids: list[str]) -> str:
    async with db.read() as session:
        taken = (
            await session.execute(
                select(func.coalesce(func.sum(Course.seats_taken), 0)).where(
                    Course.id.in_(course_ids)
                )
            )
        ).scalar_one()
        capacity = (
            await session.execute(
                select(func.coalesce(func.sum(Course.capacity), 0)).where(Course.id.in_(course_ids))
            )
        ).scalar_one()
        held = (
            await session.execute(
                select(func.count()).where(
                    Enrollment.course_id.in_(course_ids), Enrollment.status == "held"
                )
            )
        ).scalar_one()
        dupes = (
            await session.execute(
                select(func.count()).select_from(
                    select(Enrollment.course_id, Enrollment.student_id)
                    .where(Enrollment.course_id.in_(course_ids))
                    .group_by(Enrollment.course_id, Enrollment.student_id)
                    .having(func.count() > 1)
                    .subquery()
                )
            )
        ).scalar_one()
    ok = taken == held and held <= capacity and dupes == 0
    return (
        f"held {held} / capacity {capacity}, seats_taken {taken}, oversold "
        f"{max(0, held - capacity)}, leaked {taken - held}, duplicate students {dupes}"
        f" -> {'OK' if ok else 'VIOLATION'}"
    )


RAW_ENROLL = [
    # the own-child lock (FOR UPDATE on PostgreSQL)
    """SELECT s.id, s.school_id, s.active FROM roster_students s
       JOIN roster_guardianships g ON g.student_id = s.id
       WHERE s.id = :student AND g.guardian_id = :guardian{lock}""",
    "SELECT * FROM courses WHERE id = :course",
    "SELECT * FROM plans WHERE id = :plan",
    """SELECT e.id, c.weekdays, c.start, c."end" FROM enrollments e
       JOIN courses c ON c.id = e.course_id
       WHERE e.student_id = :student AND e.status IN ('applied', 'held', 'waitlisted')""",
]


async def raw_enroll(
    db: Any, student: str, guardian: str, course: str, plan: str, key: str
) -> None:
    """The same transaction as POST /enrollments, as plain SQL statements."""
    lock = "" if db.is_sqlite else " FOR UPDATE OF s"
    now = utcnow()
    async with db.transaction() as session:
        await session.execute(
            text(
                "INSERT INTO idempotency_keys (client, key, fingerprint, status, created_at)"
                " VALUES (:c, :k, :f, 'in_flight', :t)"
            ),
            {"c": guardian, "k": key, "f": "0" * 64, "t": now},
        )
    async with db.transaction() as session:
        params = {"student": student, "guardian": guardian, "course": course, "plan": plan}
        for statement in RAW_ENROLL:
            await session.execute(text(statement.format(lock=lock)), params)
        taken = await session.execute(
            text(
                "UPDATE courses SET seats_taken = seats_taken + 1 WHERE id = :course"
                " AND seats_taken < capacity AND status = 'active'"
            ),
            params,
        )
        position = None
        status = "held"
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            status = "waitlisted"
            position = (
                await session.execute(
                    text(
                        "UPDATE courses SET waitlist_seq = waitlist_seq + 1 WHERE id = :course"
                        " RETURNING waitlist_seq"
                    ),
                    params,
                )
            ).scalar_one()
        enrollment_id = str(uuid.uuid4())
        await session.execute(
            text(
                "INSERT INTO enrollments (id, course_id, plan_id, school_id, student_id,"
                " guardian_id, status, waitlist_position, consent_at, consent_statement,"
                " created_at, held_from) VALUES (:id, :course, :plan, 'x', :student,"
                " :guardian, :status, :pos, :t, 'consent', :t, :t)"
            ),
            {**params, "id": enrollment_id, "status": status, "pos": position, "t": now},
        )
        await session.execute(
            text(
                "INSERT INTO outbox (event_id, type, payload, created_at, attempts)"
                " VALUES (:e, 'bench.raw.v1', :p, :t, 0)"
            ),
            {"e": str(uuid.uuid4()), "p": json.dumps({"id": enrollment_id}), "t": now},
        )
        await session.execute(
            text(
                "UPDATE idempotency_keys SET status = 'done', response_status = 201,"
                " response_body = :b, completed_at = :t WHERE client = :c AND key = :k"
            ),
            {"b": b"{}", "t": now, "c": guardian, "k": key},
        )


async def create_pg_database(admin_url: str) -> tuple[str, str]:
    import asyncpg

    name = f"bench_afterschool_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return name, f"{base}/{name}"


async def drop_pg_database(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def line(label: str, value: str, target: str = "", ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("PASS" if ok else "FAIL")
    print(f"  {label:<46} {value:>18}   {target:<22} {verdict}")


async def bench(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-enrollment-"))
    nats = EmbeddedNats(tmp / "nats").start()
    admin_url = os.environ.get("BENCH_POSTGRES_URL")
    pg_name = None
    if admin_url:
        pg_name, url = await create_pg_database(admin_url)
    else:
        url = f"sqlite+aiosqlite:///{tmp / 'afterschool.sqlite3'}"
    key = SigningKey.load_or_create(tmp / "signing-key.pem")
    issuer = TokenIssuer([key], issuer=ISSUER, audience=AUDIENCE)

    def mint(*roles: str, tenants: tuple[str, ...] = (), person_id: str | None = None) -> str:
        return issuer.access_token(
            subject=f"bench-{uuid.uuid4().hex[:8]}",
            kind="user",
            roles=list(roles),
            tenants=list(tenants),
            person_id=person_id,
        )

    platform = PlatformSettings(
        NATS_URL=nats.url,
        VAR_DIR=tmp / "var",
        AUTH_ISSUER=ISSUER,
        AUTH_AUDIENCE=AUDIENCE,
        ID_HASH_PEPPER="bench",
        LOG_LEVEL="ERROR",
    )
    app = create_app(
        settings=service_settings("afterschool", database_url=url),
        platform=platform,
        key_source=StaticKeySource(issuer.jwks()),
    )
    n, extra, c = args.students, args.sold_out, args.concurrency
    backend = "PostgreSQL" if admin_url else "SQLite"
    try:
        async with app.router.lifespan_context(app):
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://afterschool"
            )
            db = app.state.ctx.db
            school = await helpers.seed_school(db, students=n + extra)
            admin = helpers.admin_token(mint, school)
            plan = await helpers.make_plan(client, admin, school)
            body = helpers.course_body
            hot = await helpers.add_course(
                client, admin, plan["id"], body(school, name="热门", capacity=100)
            )
            many = [
                await helpers.add_course(
                    client,
                    admin,
                    plan["id"],
                    body(school, name=f"课程{i}", capacity=50, start="16:30", end="17:30"),
                )
                for i in range(100)
            ]
            raw_course = await helpers.add_course(
                client,
                admin,
                plan["id"],
                body(school, name="raw", capacity=100, start="17:30", end="18:30"),
            )
            await helpers.open_window(client, admin, plan["id"])
            tokens = [helpers.parent_token(mint, school, i) for i in range(n + extra)]

            def tap(course_of: Callable[[int], str], offset: int = 0, waitlist: bool = True):
                async def one(i: int) -> tuple[int, float]:
                    i += offset
                    t = time.perf_counter()
                    r = await helpers.enroll(
                        client,
                        tokens[i],
                        school.students[i],
                        course_of(i),
                        key=f"k-{i}-{course_of(i)}",
                        waitlist=waitlist,
                    )
                    return r.status_code, time.perf_counter() - t

                return one

            print(f"\nafter-school enrollment rush on {backend}, {n} students, concurrency {c}")
            print("  (in-process ASGI, no gateway; every request verifies its token)")

            elapsed, hot_results = await run_load(n, c, tap(lambda i: hot["id"]))
            codes = {code for code, _ in hot_results}
            lat = [t * 1000 for _, t in hot_results]
            rate = n / elapsed
            print(f"\n(a) one hot course, 100 seats; answers {sorted(codes)}")
            line("enrollments/s", f"{rate:,.0f}", ">= 1,000 (PostgreSQL)", rate >= 1000)
            line("latency p50 ms", f"{statistics.median(lat):.1f}")
            line("latency p99 ms", f"{pct(lat, 99):.1f}", "<= 100", pct(lat, 99) <= 100)
            print("  " + await check(db, [hot["id"]]))

            _, sold = await run_load(extra, c, tap(lambda i: hot["id"], offset=n, waitlist=False))
            full = [t * 1000 for code, t in sold if code == 409]
            print(f"\n(b) sold out, no waitlist wanted: {len(full)} of {extra} told 'full'")
            line("sold-out answer p50 ms", f"{statistics.median(full):.1f}")
            line("sold-out answer p99 ms", f"{pct(full, 99):.1f}", "<= 20", pct(full, 99) <= 20)

            elapsed, spread = await run_load(n, c, tap(lambda i: many[i % 100]["id"]))
            lat = [t * 1000 for _, t in spread]
            spread_rate = n / elapsed
            print(f"\n(c) 100 courses, 50 seats each; answers {sorted({s for s, _ in spread})}")
            line("enrollments/s", f"{spread_rate:,.0f}")
            line("latency p50 ms", f"{statistics.median(lat):.1f}")
            line("latency p99 ms", f"{pct(lat, 99):.1f}")
            print("  " + await check(db, [m["id"] for m in many]))

            async def raw_one(i: int) -> tuple[int, float]:
                t = time.perf_counter()
                await raw_enroll(
                    db,
                    school.students[i],
                    school.guardians[i],
                    raw_course["id"],
                    plan["id"],
                    f"raw-{i}",
                )
                return 0, time.perf_counter() - t

            elapsed, raw = await run_load(n, c, raw_one)
            raw_rate = n / elapsed
            lat = [t * 1000 for _, t in raw]
            print("\n(d) raw SQL of the same transaction, same engine and concurrency")
            line("transactions/s", f"{raw_rate:,.0f}")
            line("latency p99 ms", f"{pct(lat, 99):.1f}")
            line("ratio API / raw (one hot course)", f"{rate / raw_rate:.2f}")
            await client.aclose()
    finally:
        nats.stop()
        if admin_url and pg_name:
            await drop_pg_database(admin_url, pg_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--students", type=int, default=5000)
    parser.add_argument("--sold-out", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
