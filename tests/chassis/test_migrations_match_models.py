"""X-01: every service's migrations build exactly the tables its models and the
chassis messaging tables (outbox, inbox, dead_letters, idempotency_keys)
declare — no model change without its migration — on SQLite and on
PostgreSQL (TEST_DATABASE=postgresql)."""

from __future__ import annotations

import asyncio
import importlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from chassis.messaging import messaging_metadata
from chassis.migrations import upgrade

pytestmark = pytest.mark.asyncio

# A few tables of each service, so a migration that builds nothing cannot pass.
SERVICES = {
    "identity": {"schools", "students", "guardianships"},
    "homework": {"assignments", "burden_states", "evening_study_classes"},
    "afterschool": {"plans", "courses", "enrollments", "fee_statements", "refunds"},
    "institutions": {"institutions", "trainers", "courses", "complaints", "credit_records"},
    "funds": {"escrow_accounts", "contracts", "journal_transactions", "journal_entries"},
}


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_x01_migrations_match_the_models_and_messaging_tables(databases, service):
    spec = importlib.import_module(f"services.{service}.app").SPEC
    url = await databases.url(f"migrations_{service}")
    await asyncio.to_thread(upgrade, spec.migrations_dir, url)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:

            def compare(sync_conn):  # type: ignore[no-untyped-def]
                context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
                diffs = compare_metadata(context, [messaging_metadata, spec.metadata])
                return diffs, set(inspect(sync_conn).get_table_names())

            diffs, tables = await conn.run_sync(compare)
    finally:
        await engine.dispose()
    assert {"outbox", "inbox", "dead_letters", "idempotency_keys"} <= tables
    assert SERVICES[service] <= tables, sorted(tables)
    assert diffs == []
