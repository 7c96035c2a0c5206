"""After-school enrollment rush benchmark (AS-04), through the gateway.

    .venv/bin/python bench/enrollment.py [--students 5000] [--concurrency 64]
    BENCH_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres \
        .venv/bin/python bench/enrollment.py

Starts, each in its own process as `make run` does: an embedded NATS
JetStream server, the afterschool service (uvicorn, its full lifespan:
migrations, outbox relay, consumers) and the gateway in front of it, started
as bench/gateway.py starts it (production settings, token check against the
bench's JWKS, access log on, webhooks off; rate limits set far above the load,
since here thousands of parents share one address and the default enrollment
limit would answer 429). The database is a SQLite file in a temporary
directory, or a fresh PostgreSQL database created under BENCH_POSTGRES_URL (an
admin URL; dropped afterwards). This process is the load generator (a lean
keep-alive HTTP client, bench/loadclient.py, so that it takes as little of
the shared cores as it can); every request carries its parent's own access
token and an Idempotency-Key, as a parent's app would send, so both the gateway and the
service verify a token per request.

Why two kinds of load. A closed loop (c clients, each sending its next
request when the last is answered) shows peak throughput, but its latency is
only c / throughput: at concurrency 64 a p99 of 20 ms would need 3,200
answers/s, whatever the service does. The real rush is an arrival rate —
many parents pressing at once, none waiting for anyone else's answer — so
latency is measured OPEN LOOP: requests started on a fixed schedule at the
target rate (1,000/s by default, `--rate`) for `--open-seconds`, each
counted from its SCHEDULED start (as bench/gateway.py's latency phase does:
no coordinated omission, a stall is paid by every request due during it),
and again at the measured closed-loop peak when that is lower (the target
verdict is only given at the target rate). Both figures are printed; the
bench never takes a path a parent's app would not (every request carries its
own parent's token and its own Idempotency-Key, every open-loop enrollment is
a child not seen before, sold-out askers are children with no seat).

It measures, in one run, through the gateway ((g…)), then directly against
the service ((d…)), each on its own hot courses and students:

(1) one hot course (100 seats), closed loop at `--concurrency`: peak
    enrollments/s (held or waitlisted answers), the CPU time the service (and
    the gateway) spent per enrollment — from /proc, far less sensitive to
    other load on the machine than rates are;
(2) a fresh hot course, open loop at the target rate: p50/p99 latency;
(3) the same at the measured peak when it is below the target;
(4) sold out: children without a seat ask for the full course without the
    waitlist, closed loop: answers/s and CPU per answer;
(5) the same, open loop at the target rate: p50/p99 of the "full" answers;
(6) the same at the sold-out peak when it is below the target;

(c) through the gateway, 100 courses (50 seats each), closed loop:
    enrollments/s and p50/p99; and

(r) the raw SQL of one enrollment as the service did it before group commit
    (idempotency claim; own-child lock, course and plan, clash check, seat
    UPDATE, enrollment and outbox INSERT, response remembered), on an engine
    of the same pool size in this process at the same concurrency, and the
    ratio gateway / raw.

BENCH_PROFILE=FILE writes a cProfile of the service process to FILE (slows
it down; for finding hot spots, not for figures).

It checks the invariants after each phase (seats taken = enrollments held,
none oversold, no student twice) and prints the figures beside the targets
(PostgreSQL: >= 1,000 enrollments/s on one hot course, p99 <= 100 ms,
sold-out p99 <= 20 ms) with PASS/FAIL. It reports; it exits 0 when it ran to
completion. All processes share the machine's cores: figures depend on the
machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from sqlalchemy import func, select, text

from bench.loadclient import LeanClient
from chassis.db import Database, utcnow
from launcher.nats_server import EmbeddedNats, free_port
from services.afterschool.models import Course, Enrollment
from services.identity.tokens import SigningKey, TokenIssuer
from tests.afterschool import helpers

ROOT = Path(__file__).resolve().parent.parent
ISSUER = "https://identity.bench"
AUDIENCE = "shuangjian"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[k]


@contextlib.contextmanager
def no_collections_here() -> Iterator[None]:
    """The load generator does not collect garbage while it measures: its
    own pauses would be counted against the system under test (an open loop
    times each request from its schedule). Seen: a 103 ms full collection of
    the load generator's heap — its 10,000 tokens, seeding leftovers and
    3,000 request tasks — in the middle of an open-loop run. The heap as it
    is is frozen first, so the collections after the phase stay short."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def run_load(
    n: int, concurrency: int, one: Callable[[int], Awaitable[tuple[int, float]]]
) -> tuple[float, list[tuple[int, float]]]:
    gate = asyncio.Semaphore(concurrency)

    async def guarded(i: int) -> tuple[int, float]:
        async with gate:
            return await one(i)

    with no_collections_here():
        started = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(n)))
        return time.perf_counter() - started, list(results)


async def open_loop(
    rate: float, count: int, one: Callable[[int], Awaitable[int]]
) -> tuple[list[tuple[int, float]], float]:
    """`count` requests started at `rate` per second on a fixed schedule, as
    parents pressing at once arrive (not as `c` clients each waiting for its
    answer): (status, ms) for each, the latency counted from its scheduled
    start (no coordinated omission: a stall is paid by every request due
    during it); and the time until the last answer."""
    results: list[tuple[int, float]] = []

    async def timed(j: int, due: float) -> None:
        code = await one(j)
        results.append((code, (time.perf_counter() - due) * 1000))

    tasks = []
    with no_collections_here():
        start = time.perf_counter() + 0.05
        for j in range(count):
            due = start + j / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(timed(j, due)))
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_speed() -> float:
    """Seconds this machine takes for ten million iterations of a plain Python
    loop, printed with the figures: runs on different machines can then be
    told apart (the development machines seen so far differ by ~2.7x)."""
    started = time.process_time()
    total = 0
    for i in range(10_000_000):
        total += i
    return time.process_time() - started


def postgres_cpu_seconds() -> float:
    """CPU time of every PostgreSQL server process on this machine so far (0
    when none is visible): the database's share of the work, shown beside the
    processes of the system under test."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of the service, the gateway, this load generator and
    PostgreSQL: what each costs per request, the whole budget of a 2-core
    machine at 1,000 requests/s being 2 ms."""
    spent = {name: cpu_seconds(pid) for name, pid in pids.items()}
    spent["load generator"] = time.process_time()
    spent["postgres"] = postgres_cpu_seconds()
    return spent


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


def serve_service(port: int, jwks_file: str) -> None:
    """Child mode: the afterschool service as `shuangjian serve afterschool`
    runs it, verifying tokens against a JWKS file (no identity service here)."""
    import uvicorn

    from chassis.auth import StaticKeySource
    from services.afterschool.app import create_app

    os.environ.setdefault("GC_FREEZE", "true")  # as `shuangjian serve` does

    app = create_app(key_source=StaticKeySource(json.loads(Path(jwks_file).read_text())))
    profile = os.environ.get("BENCH_PROFILE")  # a file: cProfile of the service process
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()

        def dump(*_: object) -> None:
            # uvicorn re-raises the SIGTERM it caught once it has shut down.
            profiler.disable()
            profiler.dump_stats(profile)
            os._exit(0)

        signal.signal(signal.SIGTERM, dump)
        profiler.enable()
    try:
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            proxy_headers=False,  # as `shuangjian serve` runs it
        )
    finally:
        if profiler is not None:
            dump()


async def wait_up(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


def start_processes(
    tmp: Path, nats_url: str, db_url: str, jwks_file: Path
) -> tuple[list[subprocess.Popen[bytes]], str, str]:
    service_port, gateway_port = free_port(), free_port()
    huge = {"per_second": 1e9, "burst": 1_000_000_000}
    (tmp / "var").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "VAR_DIR": str(tmp / "var"),
        "NATS_URL": nats_url,
        "LOG_LEVEL": "WARNING",
        "AUTH_ISSUER": ISSUER,
        "AUTH_AUDIENCE": AUDIENCE,
        "ID_HASH_PEPPER": "bench",
        "AFTERSCHOOL_DATABASE_URL": db_url,
        "AFTERSCHOOL_PORT": str(service_port),
        "GATEWAY_PORT": str(gateway_port),
        "GATEWAY_UPSTREAM_AFTERSCHOOL": f"http://127.0.0.1:{service_port}",
        "GATEWAY_WEBHOOKS_ENABLED": "false",
        "GATEWAY_RATE_LIMITS": json.dumps(
            [{"name": "default", "path": "/api/v1/**", "per_client": huge, "per_ip": huge}]
        ),
    }
    env.pop("REDIS_URL", None)
    quiet = {"env": env, "cwd": ROOT, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--serve-service", str(service_port), str(jwks_file)],
            **quiet,  # type: ignore[arg-type]
        ),
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "gateway.py"),
                "--serve-gateway",
                str(gateway_port),
                str(jwks_file),
            ],
            **quiet,  # type: ignore[arg-type]
        ),
    ]
    return (
        children,
        f"http://127.0.0.1:{service_port}",
        f"http://127.0.0.1:{gateway_port}/api/v1/afterschool",
    )


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
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps(issuer.jwks()))

    def mint(*roles: str, tenants: tuple[str, ...] = (), person_id: str | None = None) -> str:
        return issuer.access_token(
            subject=f"bench-{uuid.uuid4().hex[:8]}",
            kind="user",
            roles=list(roles),
            tenants=list(tenants),
            person_id=person_id,
        )

    n, extra, c = args.students, args.sold_out, args.concurrency
    target, seconds = args.rate, args.open_seconds
    per_open = int(target * seconds)  # students one open-loop enrollment run may use
    backend = "PostgreSQL" if admin_url else "SQLite"
    children, direct, gateway = start_processes(tmp, nats.url, url, jwks_file)
    db: Database | None = None
    try:
        await wait_up(f"{direct}/healthz")
        await wait_up(gateway.rsplit("/api/", 1)[0] + "/healthz")
        db = Database(url, service="bench", pool_size=10)
        client = httpx.AsyncClient(base_url=direct, timeout=60)
        # Students: [0, n) the gateway's closed loop, (c) and the raw SQL;
        # [n, 2n) the direct closed loop; then per path two open-loop pools of
        # rate x seconds each (a child enrolls once per hot course); the last
        # `extra` per path ask for full courses (refused, written nowhere:
        # reused within a path; each path has its own, so both pay for
        # verifying a token not seen before in their closed loop (4)).
        total = 2 * n + 4 * per_open + 2 * extra
        school = await helpers.seed_school(db, students=total)
        pools = iter(range(2 * n, 2 * n + 4 * per_open, per_open))
        askers = 2 * n + 4 * per_open
        admin = helpers.admin_token(mint, school)
        plan = await helpers.make_plan(client, admin, school)
        body = helpers.course_body

        async def hot_course(name: str) -> dict[str, Any]:
            return await helpers.add_course(
                client, admin, plan["id"], body(school, name=name, capacity=100)
            )

        hot = {path: [await hot_course(f"热门{path}{k}") for k in range(3)] for path in "gd"}
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
        await client.aclose()
        tokens = [helpers.parent_token(mint, school, i) for i in range(total)]
        clients = {base: LeanClient(base) for base in (gateway, direct)}

        async def post(base: str, i: int, course_id: str, key: str, waitlist: bool) -> int:
            body = json.dumps(
                {"student_id": school.students[i], "course_id": course_id, "consent": True}
            ).encode()
            return await clients[base].post(
                "/enrollments" + ("" if waitlist else "?waitlist=false"),
                body,
                {"Authorization": f"Bearer {tokens[i]}", "Idempotency-Key": key},
            )

        def tap(base: str, course_of: Callable[[int], str], offset: int = 0, waitlist: bool = True):
            async def one(i: int) -> tuple[int, float]:
                i += offset
                course_id = course_of(i)
                t = time.perf_counter()
                code = await post(base, i, course_id, f"k-{i}-{course_id}", waitlist)
                return code, time.perf_counter() - t

            return one

        def report_open(
            label: str, rate: float, results: list[tuple[int, float]], elapsed: float, good: int
        ) -> None:
            codes = sorted({code for code, _ in results})
            lat = [t for code, t in results if code == good]
            sold = good == 409
            print(
                f"\n{label}, open loop at {rate:,.0f}/s for {seconds:g} s; answers {codes},"
                f" {len(lat)} of {len(results)} {'told full' if sold else 'held or waitlisted'},"
                f" done at {len(results) / elapsed:,.0f}/s"
            )
            if not lat:
                return
            at_target = rate >= target
            name = "sold-out answer" if sold else "latency"
            line(f"{name} p50 ms", f"{statistics.median(lat):.1f}")
            bound = 20 if sold else 100
            line(
                f"{name} p99 ms",
                f"{pct(lat, 99):.1f}",
                f"<= {bound}" if at_target else f"(target: at {target:,.0f}/s)",
                (pct(lat, 99) <= bound) if at_target else None,
            )

        async def open_enrollments(label: str, base: str, rate: float, course: str) -> None:
            first = next(pools)
            count = int(rate * seconds)
            results, elapsed = await open_loop(
                rate,
                count,
                lambda j: post(base, first + j, course, f"o-{first + j}-{course}", True),
            )
            report_open(label, rate, results, elapsed, 201)
            print("  " + await check(db, [course]))

        sold_round = iter(range(1000))

        async def open_sold_out(
            label: str, base: str, rate: float, course: str, askers: int
        ) -> None:
            r = next(sold_round)
            results, elapsed = await open_loop(
                rate,
                int(rate * seconds),
                lambda j: post(base, askers + j % extra, course, f"s{r}-{j}-{course}", False),
            )
            report_open(label, rate, results, elapsed, 409)

        pids = {"service": children[0].pid, "gateway": children[1].pid}

        def cpu_line(what: str, before: dict[str, float], count: int, names: list[str]) -> None:
            now = cpu_snapshot(pids)
            per = ", ".join(
                f"{name} {(now[name] - before[name]) / count * 1000:.2f}"
                for name in [*names, "load generator", "postgres"]
            )
            line(f"CPU ms per {what}", per)

        async def rush(path: str, base: str, where: str, offset: int, askers: int) -> float:
            """One path: closed-loop peak, then open-loop latency at the target
            rate and at the peak if lower; sold-out answers likewise."""
            first, second, third = (x["id"] for x in hot[path])
            names = ["service", "gateway"] if path == "g" else ["service"]
            before = cpu_snapshot(pids)
            elapsed, results = await run_load(n, c, tap(base, lambda i: first, offset=offset))
            cpu_after = cpu_snapshot(pids)
            codes = sorted({code for code, _ in results})
            rate = len(results) / elapsed
            lat = [t * 1000 for _, t in results]
            print(
                f"\n({path}1) {where}: one hot course, 100 seats, closed loop at concurrency"
                f" {c} (peak throughput; latency here is just {c} / throughput); answers {codes}"
            )
            line("enrollments/s", f"{rate:,.0f}", ">= 1,000 (PostgreSQL)", rate >= 1000)
            line("latency p50 ms (closed loop)", f"{statistics.median(lat):.1f}")
            line("latency p99 ms (closed loop)", f"{pct(lat, 99):.1f}")
            now = cpu_snapshot(pids)
            spent = {k: before[k] + now[k] - cpu_after[k] for k in before}
            cpu_line("enrollment", spent, len(results), names)
            print("  " + await check(db, [first]))
            await open_enrollments(f"({path}2) {where}: a fresh hot course", base, target, second)
            if rate < target:
                await open_enrollments(f"({path}3) {where}: a fresh hot course", base, rate, third)
            # Sold out: the first hot course is full; no-waitlist askers.
            before = cpu_snapshot(pids)
            took, sold = await run_load(
                extra, c, tap(base, lambda i: first, offset=askers, waitlist=False)
            )
            full = [t for code, t in sold if code == 409]
            sold_rate = len(sold) / took
            print(
                f"\n({path}4) {where}: sold out, no waitlist wanted, closed loop at concurrency"
                f" {c}: {len(full)} of {len(sold)} told 'full'"
            )
            line("answers/s", f"{sold_rate:,.0f}")
            cpu_line("answer", before, len(sold), names)
            await open_sold_out(f"({path}5) {where}: sold out", base, target, first, askers)
            if sold_rate < target:
                await open_sold_out(f"({path}6) {where}: sold out", base, sold_rate, first, askers)
            return rate

        print(f"\nafter-school enrollment rush on {backend}, {n} students, concurrency {c},")
        print(f"open-loop target {target:,.0f} requests/s for {seconds:g} s per run")
        print("  (separate processes: load generator -> gateway -> afterschool -> database)")
        print(f"  this machine: a 10M-iteration Python loop takes {python_speed():.2f} s of CPU")

        rate = await rush("g", gateway, "through the gateway", 0, askers)

        elapsed, spread = await run_load(n, c, tap(gateway, lambda i: many[i % 100]["id"]))
        lat = [t * 1000 for _, t in spread]
        print(
            f"\n(c) through the gateway: 100 courses, 50 seats each, closed loop at concurrency"
            f" {c}; answers {sorted({s for s, _ in spread})}"
        )
        line("enrollments/s", f"{n / elapsed:,.0f}")
        line("latency p50 ms (closed loop)", f"{statistics.median(lat):.1f}")
        line("latency p99 ms (closed loop)", f"{pct(lat, 99):.1f}")
        print("  " + await check(db, [m["id"] for m in many]))

        if "d" in args.paths:
            await rush("d", direct, "directly to the service", n, askers + extra)
        for lean in clients.values():
            lean.close()
        if "r" not in args.paths:
            return

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
        print("\n(r) raw SQL of one enrollment, one transaction per request (no batching),")
        print("    same database, pool of 10, same concurrency")
        line("transactions/s", f"{raw_rate:,.0f}")
        line("latency p99 ms", f"{pct(lat, 99):.1f}")
        line("ratio gateway / raw (one hot course)", f"{rate / raw_rate:.2f}")
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
        if db is not None:
            await db.engine.dispose()
        nats.stop()
        if admin_url and pg_name:
            await drop_pg_database(admin_url, pg_name)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-service":
        serve_service(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--students", type=int, default=5000)
    parser.add_argument("--sold-out", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop target, requests/s")
    parser.add_argument("--open-seconds", type=float, default=3.0)
    parser.add_argument(
        "--paths",
        default="gdr",
        help="g: through the gateway (always), d: directly to the service, r: raw SQL",
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    # The load generator on uvloop, as the servers run: it shares the cores
    # with what it measures, so it should take as little of them as it can.
    try:
        import uvloop
    except ImportError:
        asyncio.run(bench(args))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(bench(args))


if __name__ == "__main__":
    main()
