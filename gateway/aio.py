"""Small asyncio helpers shared by the gateway's background loops."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set or `timeout` passes, whichever comes first.

    Not `asyncio.wait_for(event.wait(), timeout)`: on Python 3.11 that
    swallows a cancellation that arrives as the event is set, and a loop
    built on it then never stops.
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
