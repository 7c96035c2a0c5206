"""The NATS JetStream connection every service shares.

Connects in the background and reconnects for ever: a service starts and
serves HTTP while NATS is away; the outbox keeps its events until it is back.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from chassis.lifecycle import stop_within
from contracts.base import DEAD_LETTER_STREAM, StreamSpec

log = structlog.get_logger("bus")

# Server-side de-duplication by Nats-Msg-Id covers a retry window this long;
# consumers' inboxes cover anything older.
DUPLICATE_WINDOW_SECONDS = 600.0
STREAM_MAX_AGE_SECONDS = 90 * 24 * 3600.0


class Bus:
    def __init__(self, servers: list[str], *, name: str) -> None:
        self.servers = servers
        self.name = name
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ensured: set[str] = set()
        self._closing = False
        self.replicas = int(os.environ.get("NATS_STREAM_REPLICAS", "1"))

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("NATS not connected yet")
        return self._js

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect_forever(), name=f"bus-connect-{self.name}")

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _connect_forever(self) -> None:
        delay = 0.2
        while not self._closing:
            try:
                nc = await nats.connect(
                    servers=self.servers,
                    name=self.name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    ping_interval=5,
                    max_outstanding_pings=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
            except Exception as exc:  # initial connect: keep trying for ever
                log.warning("nats_connect_failed", servers=self.servers, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closing:  # nats-py may swallow the cancellation of connect()
                await nc.close()
                return
            self.nc = nc
            self._js = nc.jetstream(timeout=5)
            self._ready.set()
            log.info("nats_connected", servers=self.servers)
            return

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats_error", error=str(exc))

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        log.info("nats_reconnected")

    async def ensure_stream(self, spec: StreamSpec) -> None:
        if spec.name in self._ensured:
            return
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            description=spec.description,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            max_age=STREAM_MAX_AGE_SECONDS,
            num_replicas=self.replicas,
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            # Exists with another config (e.g. created by an older release).
            await self.js.update_stream(config)
        self._ensured.add(spec.name)

    async def dead_letter(self, subject: str, payload: bytes, headers: dict[str, Any]) -> None:
        await self.ensure_stream(DEAD_LETTER_STREAM)
        await self.js.publish(subject, payload, headers=headers)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await stop_within(self._task, "nats connector")
        if self.nc is not None and not self.nc.is_closed:
            await stop_within(self.nc.close(), "nats connection")
