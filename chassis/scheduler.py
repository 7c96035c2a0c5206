"""Time-driven work of a service: deadlines that pass without a request.

A service lists its `PeriodicJob`s in its `ServiceSpec`; the chassis runs each
in its own task from start-up to shutdown. A job must be idempotent and
catch-up safe: it may run on several replicas, twice in a row after a restart,
or late after a pause. Intervals come from the environment
(`<SERVICE>_JOB_INTERVALS='{"<job>": seconds}'`); 0 or less switches a job off
(tests drive jobs by calling their use case directly).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from chassis.app import ServiceContext

log = structlog.get_logger("scheduler")


@dataclass(frozen=True)
class PeriodicJob:
    name: str
    run: Callable[[ServiceContext], Awaitable[Any]]
    interval_seconds: float
    # Catch up at once after a restart instead of one interval later.
    run_at_start: bool = False


class JobRunner:
    """One task per job; a failed run is logged and retried next interval."""

    def __init__(self, ctx: ServiceContext, job: PeriodicJob, interval: float) -> None:
        self.ctx = ctx
        self.job = job
        self.interval = interval
        self.runs = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"{self.ctx.name}-job-{self.job.name}")

    async def run_once(self) -> None:
        try:
            result = await self.job.run(self.ctx)
            self.runs += 1
            log.info("job_ran", service=self.ctx.name, job=self.job.name, result=_loggable(result))
        except Exception as exc:  # the next interval retries
            self.failures += 1
            log.warning("job_failed", service=self.ctx.name, job=self.job.name, error=repr(exc))

    async def _loop(self) -> None:
        if self.job.run_at_start:
            await self.run_once()
        while True:
            await asyncio.sleep(self.interval)
            await self.run_once()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def job_interval(job: PeriodicJob, overrides: dict[str, float]) -> float:
    return float(overrides.get(job.name, job.interval_seconds))


def _loggable(result: object) -> object:
    if result is None or isinstance(result, (int, float, str, bool, dict, list)):
        return result
    fields = getattr(result, "__dict__", None)
    return dict(fields) if isinstance(fields, dict) else repr(result)
