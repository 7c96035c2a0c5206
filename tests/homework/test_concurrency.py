"""HW-02 under concurrency: teachers publishing at the same instant can never
push a class past its limit — on SQLite and on PostgreSQL, with two service
replicas sharing one database (so no in-process lock can help)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from chassis.auth import StaticKeySource
from chassis.config import PlatformSettings, service_settings
from services.homework.app import create_app
from services.homework.models import Assignment, ClassDayUsage, Refusal
from tests.conftest import AUDIENCE, ISSUER, PEPPER, POSTGRES_ADMIN_URL, RunningService
from tests.homework.conftest import SCHOOL_DAY, Roster
from tests.support import auth

pytestmark = pytest.mark.asyncio

StartReplica = Callable[[str], Awaitable[RunningService]]


async def _postgres_url() -> tuple[str, str]:
    import asyncpg

    name = f"sjtest_hwconc_{uuid.uuid4().hex[:10]}"
    # No skip: the PostgreSQL half of this test is a Show item (HW-02), so an
    # unreachable server fails it (TEST_POSTGRES_URL names another server).
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}", name


@pytest.fixture
async def replicas(tmp_path: Path, nats_server, issuer) -> AsyncIterator[StartReplica]:
    stack = AsyncExitStack()
    created: list[str] = []

    async def start(url: str) -> RunningService:
        platform = PlatformSettings(
            NATS_URL=nats_server.url,
            VAR_DIR=tmp_path / "var",
            AUTH_ISSUER=ISSUER,
            AUTH_AUDIENCE=AUDIENCE,
            ID_HASH_PEPPER=PEPPER,
            LOG_LEVEL="WARNING",
        )
        settings = service_settings("homework", database_url=url, db_pool_size=25)
        app = create_app(
            settings=settings, platform=platform, key_source=StaticKeySource(issuer.jwks())
        )
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hw")
        await stack.enter_async_context(client)
        return RunningService("homework", app, client)

    start.created = created  # type: ignore[attr-defined]
    yield start
    await stack.aclose()
    if created:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            for name in created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_hw02_twenty_teachers_at_once_never_exceed_the_limit(
    backend: str, replicas: StartReplica, tmp_path: Path, mint
):
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'homework-shared.sqlite3'}"
    else:
        url, name = await _postgres_url()
        replicas.created.append(name)  # type: ignore[attr-defined]
    first = await replicas(url)
    second = await replicas(url)  # a second replica on the same database

    r = Roster(first.ctx)
    await r.region("jinhua")
    await r.school("S1", "jinhua", "6-3", "primary")
    teachers = [f"T{i:02d}" for i in range(20)]
    await r.klass("C1", "S1", 4, None, [(t, f"subject{t}") for t in teachers])

    async def publish(i: int, teacher: str) -> httpx.Response:
        client = (first if i % 2 else second).client
        token = mint("teacher", tenants=["school:S1"], person_id=teacher)
        return await client.post(
            "/classes/C1/assignments",
            headers=auth(token),
            json={
                "date": SCHOOL_DAY.isoformat(),
                "subject": f"subject{teacher}",
                "content": "练习",
                "kind": "written",
                "layer": "basic",
                "location": "at_home",
                "estimated_minutes": 15,
            },
        )

    responses = await asyncio.gather(*(publish(i, t) for i, t in enumerate(teachers)))
    statuses = Counter(resp.status_code for resp in responses)
    assert statuses == {201: 4, 422: 16}, [resp.text for resp in responses]
    refused = [resp.json() for resp in responses if resp.status_code == 422]
    assert {p["rule"] for p in refused} == {"HW-02"}
    assert {p["limit"] for p in refused} == {60}
    assert all(p["used"] + 15 > 60 for p in refused)
    assert sorted(
        resp.json()["usage"]["used"] for resp in responses if resp.status_code == 201
    ) == [
        15,
        30,
        45,
        60,
    ]
    async with first.ctx.db.read() as session:
        usage = await session.get(ClassDayUsage, ("C1", SCHOOL_DAY))
        published = await session.scalar(select(func.count()).select_from(Assignment))
        total = await session.scalar(select(func.sum(Assignment.counted_minutes)))
        recorded = await session.scalar(select(func.count()).select_from(Refusal))
    assert (usage.used, published, total, recorded) == (60, 4, 60, 16)
