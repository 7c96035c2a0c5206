"""X-03 operations: /readyz says ready only when the database answers at the
schema the code expects and NATS is connected.

In production migrations run as a one-shot job before the new pods; a pod whose
database is not (yet) at its migration head must not receive traffic.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from chassis.auth import StaticKeySource
from chassis.config import PlatformSettings, service_settings
from chassis.migrations import head_revisions
from launcher.nats_server import EmbeddedNats
from services.homework.app import SPEC
from tests.conftest import AUDIENCE, ISSUER, PEPPER
from tests.support import eventually

pytestmark = pytest.mark.asyncio


async def test_x03_readyz_reports_database_schema_and_nats_ok(start_service) -> None:
    svc = await start_service("homework")

    async def ready() -> dict | None:
        r = await svc.client.get("/readyz")
        return r.json() if r.status_code == 200 else None

    body = await eventually(ready, timeout=10)  # NATS connects in the background
    assert body["checks"] == {"database": "ok", "schema": "ok", "nats": "ok"}


async def test_x03_readyz_is_503_while_the_database_is_not_at_the_migration_head(
    tmp_path: Path, databases, nats_server: EmbeddedNats, issuer
) -> None:
    from services.homework.app import create_app

    url = await databases.url("unmigrated")
    platform = PlatformSettings(
        NATS_URL=nats_server.url,
        VAR_DIR=tmp_path / "var",
        AUTH_ISSUER=ISSUER,
        AUTH_AUDIENCE=AUDIENCE,
        ID_HASH_PEPPER=PEPPER,
        LOG_LEVEL="WARNING",
    )
    settings = service_settings("homework", database_url=url, run_migrations=False)
    app = create_app(
        settings=settings, platform=platform, key_source=StaticKeySource(issuer.jwks())
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://homework") as client:
            ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["content-type"].startswith("application/problem+json")
    body = ready.json()
    assert body["checks"]["database"] == "ok"
    [head] = sorted(head_revisions(SPEC.migrations_dir))
    assert body["checks"]["schema"] == f"mismatch: database empty, code ['{head}']"
    assert "schema=mismatch" in body["detail"]
