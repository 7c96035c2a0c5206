"""Alembic per service: each service keeps `migrations/` beside its models.

A service's `migrations/env.py` is one call to `run_env(...)`; `upgrade()`
runs on start in the embedded mode and as a one-shot step in production.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_engine_from_config


def alembic_config(migrations_dir: Path, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def head_revisions(migrations_dir: Path) -> set[str]:
    """The revisions the code expects the database to be at."""
    script = ScriptDirectory.from_config(alembic_config(migrations_dir, ""))
    return set(script.get_heads())


async def database_revisions(engine: AsyncEngine) -> set[str]:
    """The revisions recorded in the database (empty when never migrated)."""
    async with engine.connect() as conn:
        try:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        except DBAPIError:
            return set()
    return {row[0] for row in rows}


def upgrade(migrations_dir: Path, url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(migrations_dir, url), revision)


async def upgrade_async(migrations_dir: Path, url: str) -> None:
    # env.py runs its own event loop; keep it off the caller's loop.
    await asyncio.to_thread(upgrade, migrations_dir, url)


def run_env(target_metadata: list[MetaData]) -> None:
    """The body of every service's `migrations/env.py`."""
    config = context.config
    url = config.get_main_option("sqlalchemy.url") or ""
    batch = url.startswith("sqlite")
    if context.is_offline_mode():
        context.configure(
            url=url,
            target_metadata=target_metadata,
            literal_binds=True,
            render_as_batch=batch,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    def do_run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=batch,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def run_async() -> None:
        engine = async_engine_from_config(
            config.get_section(config.config_ini_section, {}),
            prefix="sqlalchemy.",
            poolclass=pool.NullPool,
        )
        async with engine.connect() as connection:
            await connection.run_sync(do_run)
        await engine.dispose()

    asyncio.run(run_async())
