"""Async database access: one engine per service, SQLite or PostgreSQL.

SQLite (the embedded default) runs in WAL mode with a busy timeout, and every
write transaction starts with `BEGIN IMMEDIATE`, so concurrent writers queue
for the lock instead of failing with "database is locked" when a deferred
transaction tries to upgrade. Inside one process writers also queue on an
asyncio lock, which is cheaper than SQLite's sleep-and-retry busy handler.
SQLite calls run on the event loop's thread (`chassis.sqlite_driver`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, MetaData, event, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.types import TypeDecorator

from chassis import sqlite_driver

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SQLITE_BUSY_TIMEOUT_MS = 30_000


def new_metadata() -> MetaData:
    """A service's own MetaData with the shared constraint naming convention."""
    return MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware timestamps on both backends (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; store aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# Python types of mapped columns in every service's declarative Base.
TYPE_ANNOTATION_MAP: dict[Any, Any] = {
    datetime: UTCDateTime(),
    dict[str, Any]: JSON,
    list[str]: JSON,
}


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite would not
        # emit IMMEDIATE).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("sqlite_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """A service's database: write transactions and read sessions."""

    def __init__(
        self, url: str, *, service: str = "unknown", pool_size: int = 10, echo: bool = False
    ) -> None:
        self.url = url
        self.service = service
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": not self.is_sqlite}
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["async_creator"] = sqlite_driver.async_creator(
                path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000
            )
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
        self.engine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        writer = self.engine.execution_options(sqlite_write=True)
        self._write_sessions = async_sessionmaker(writer, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # Called with the envelopes of each committed transaction that emitted
        # events, so they can be published without waiting for a poll.
        self.outbox_listeners: list[Callable[[list[Any]], None]] = []

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commits when the block ends, rolls back on error."""
        if self._write_lock is not None:
            async with self._write_lock:
                async with self._unit_of_work() as session:
                    yield session
        else:
            async with self._unit_of_work() as session:
                yield session

    @asynccontextmanager
    async def _unit_of_work(self) -> AsyncIterator[AsyncSession]:
        async with self._write_sessions() as session:
            session.info["service"] = self.service
            async with session.begin():
                yield session
            self._committed(session)

    def _committed(self, session: AsyncSession) -> None:
        committed_events = session.info.pop("outbox_events", None)
        if committed_events:
            for listener in self.outbox_listeners:
                listener(committed_events)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only session (no write lock taken)."""
        async with self._read_sessions() as session:
            async with session.begin():
                yield session

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


class KeptConnection:
    """Write transactions, one at a time, on a connection kept for them
    (PostgreSQL; on SQLite simply ``Database.transaction``). Each transaction
    skips the pool's checkout and its pre-ping: for the enrollment rush's
    batches that was one round trip of nine, and on a busy event loop every
    round trip waits behind the requests served meanwhile — the batch's wall
    time, which is the rush's latency. A transaction that fails in any way
    drops the connection (invalidated: its state is unknown); the next one
    checks a new one out of the pool, pre-pinged. The caller never runs two
    transactions on one KeptConnection at once."""

    def __init__(self, db: Database, *, settings: Mapping[str, str] | None = None) -> None:
        self.db = db
        # Session settings of the kept connection (PostgreSQL `SET`), e.g. the
        # planner's, for a worker whose statements are all of one kind.
        self.settings = dict(settings or {})
        self._conn: AsyncConnection | None = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        if self.db.is_sqlite:
            async with self.db.transaction() as session:
                yield session
            return
        if self._conn is None:
            self._conn = await self._connect()
        conn = self._conn
        try:
            async with AsyncSession(bind=conn, expire_on_commit=False) as session:
                session.info["service"] = self.db.service
                async with session.begin():
                    yield session
                self.db._committed(session)
        except BaseException:
            self._conn = None
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise

    async def _connect(self) -> AsyncConnection:
        conn = await self.db.engine.connect()
        try:
            for name, value in self.settings.items():
                await conn.execute(
                    text("SELECT set_config(:name, :value, false)"), {"name": name, "value": value}
                )
            await conn.commit()  # a session setting outlives its transaction
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                if self.settings:
                    await conn.invalidate()  # its settings must not reach the pool
                else:
                    await conn.close()
