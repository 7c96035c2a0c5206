"""Fixtures shared by the after-school tests."""

from __future__ import annotations

import pytest


@pytest.fixture
async def svc(start_service):
    """The afterschool service, started on the test's database and NATS."""
    return await start_service("afterschool")
