from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.funds.harness import Funds


@pytest.fixture
async def funds(start_service, mint, nats_server) -> AsyncIterator[Funds]:  # type: ignore[no-untyped-def]
    svc = await start_service("funds")
    harness = Funds(svc, mint, nats_server.url)
    yield harness
    await harness.close()
