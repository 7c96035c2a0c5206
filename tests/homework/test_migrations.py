"""X-01: homework's migrations (0001, 0002) build exactly the tables its
models (with the roster read copy) and the chassis messaging tables declare,
on SQLite and on PostgreSQL (TEST_DATABASE=postgresql)."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from chassis.messaging import messaging_metadata
from chassis.migrations import upgrade
from services.homework.app import SPEC
from services.homework.models import Base

pytestmark = pytest.mark.asyncio


async def test_x01_homework_migrations_match_the_models(databases):
    url = await databases.url("homework")
    await asyncio.to_thread(upgrade, SPEC.migrations_dir, url)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:

            def compare(sync_conn):
                context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
                diffs = compare_metadata(context, [messaging_metadata, Base.metadata])
                columns = {c["name"] for c in inspect(sync_conn).get_columns("burden_states")}
                return diffs, set(inspect(sync_conn).get_table_names()), columns

            diffs, tables, columns = await conn.run_sync(compare)
    finally:
        await engine.dispose()
    assert {"evening_study_classes", "burden_states", "assignments"} <= tables
    assert "evaluated_for" in columns
    assert diffs == []
