"""Small helpers tests import (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = 15.0, interval: float = 0.05
) -> T:
    """Poll `check` until it returns a truthy value (events are asynchronous)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
