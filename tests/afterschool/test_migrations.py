"""X-01: afterschool's migrations (0001, 0002) build exactly the tables its models and
the chassis messaging tables (outbox, inbox, dead_letters, idempotency_keys)
declare, on SQLite and on PostgreSQL (TEST_DATABASE=postgresql)."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from chassis.messaging import messaging_metadata
from chassis.migrations import upgrade
from services.afterschool.app import SPEC
from services.afterschool.models import Base

pytestmark = pytest.mark.asyncio


async def test_x01_migrations_match_the_models_and_messaging_tables(databases):
    url = await databases.url("afterschool")
    await asyncio.to_thread(upgrade, SPEC.migrations_dir, url)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:

            def compare(sync_conn):
                context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
                diffs = compare_metadata(context, [messaging_metadata, Base.metadata])
                return diffs, set(inspect(sync_conn).get_table_names())

            diffs, tables = await conn.run_sync(compare)
    finally:
        await engine.dispose()
    assert {"outbox", "inbox", "dead_letters", "idempotency_keys"} <= tables
    assert {"plans", "courses", "enrollments", "fee_statements", "refunds"} <= tables
    assert diffs == []
