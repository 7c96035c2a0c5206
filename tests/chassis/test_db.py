"""Concurrent writers on the embedded SQLite database never see "database is locked"."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, text

from chassis.db import Database
from tests.conftest import USE_POSTGRES

pytestmark = pytest.mark.asyncio
metadata = MetaData()
rows = Table(
    "rows",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("writer", String(20)),
    Column("n", Integer),
)
counter = Table(
    "counter", metadata, Column("id", Integer, primary_key=True), Column("value", Integer)
)

OTHER_PROCESS = textwrap.dedent("""
    import asyncio, sys
    from sqlalchemy import text
    from chassis.db import Database

    async def main(url):
        db = Database(url)
        async def one(i):
            async with db.transaction() as s:
                await s.execute(text("INSERT INTO rows (writer, n) VALUES ('other', :n)"), {"n": i})
                await s.execute(text("UPDATE counter SET value = value + 1 WHERE id = 1"))
        await asyncio.gather(*(one(i) for i in range(200)))
        await db.dispose()

    asyncio.run(main(sys.argv[1]))
""")


async def test_concurrent_writers_in_two_processes_all_commit(databases):
    url = await databases.url("concurrency")
    db = Database(url)
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.execute(counter.insert().values(id=1, value=0))
    other = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, url], stderr=subprocess.PIPE)

    async def one(i: int) -> None:
        # A read-then-write transaction: the pattern that deadlocks deferred
        # SQLite transactions ("database is locked") without BEGIN IMMEDIATE.
        # FOR UPDATE is what makes it safe on PostgreSQL (SQLite ignores it:
        # BEGIN IMMEDIATE already holds the write lock).
        async with db.transaction() as s:
            value = await s.scalar(
                select(counter.c.value).where(counter.c.id == 1).with_for_update()
            )
            await s.execute(rows.insert().values(writer="self", n=i))
            await s.execute(counter.update().where(counter.c.id == 1).values(value=value + 1))

    await asyncio.gather(*(one(i) for i in range(200)))
    _, stderr = await asyncio.to_thread(other.communicate, timeout=120)
    assert other.returncode == 0, stderr.decode()
    async with db.read() as s:
        assert await s.scalar(select(func.count()).select_from(rows)) == 400
        assert await s.scalar(select(counter.c.value)) == 400
    if not USE_POSTGRES:
        async with db.read() as s:
            assert (await s.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
    await db.dispose()
