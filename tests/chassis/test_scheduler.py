"""X-03 time-driven work: a service's periodic jobs run on their interval from
start-up, survive a failing run, can be switched off, and stop at shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from chassis.app import ServiceContext, create_service_app
from chassis.auth import StaticKeySource
from chassis.config import PlatformSettings, service_settings
from chassis.scheduler import PeriodicJob
from launcher.nats_server import EmbeddedNats
from services.homework.app import SPEC
from tests.conftest import AUDIENCE, ISSUER, PEPPER
from tests.support import eventually


def _platform(tmp_path: Path, nats_url: str) -> PlatformSettings:
    return PlatformSettings(
        NATS_URL=nats_url,
        VAR_DIR=tmp_path / "var",
        AUTH_ISSUER=ISSUER,
        AUTH_AUDIENCE=AUDIENCE,
        ID_HASH_PEPPER=PEPPER,
        LOG_LEVEL="WARNING",
    )


@pytest.mark.asyncio
async def test_x03_periodic_jobs_run_retry_after_failure_and_stop(
    tmp_path: Path, databases, nats_server: EmbeddedNats, issuer
) -> None:
    calls: list[str] = []

    async def flaky(ctx: ServiceContext) -> dict[str, int]:
        calls.append("flaky")
        if len(calls) == 1:
            raise RuntimeError("first run fails")
        async with ctx.db.transaction():  # a job gets the service's database
            pass
        return {"run": len(calls)}

    async def never(ctx: ServiceContext) -> None:
        calls.append("never")

    spec = dataclasses.replace(
        SPEC,
        periodic_jobs=[
            PeriodicJob("flaky", flaky, interval_seconds=0.05, run_at_start=True),
            PeriodicJob("never", never, interval_seconds=0.05, run_at_start=True),
        ],
    )
    settings = service_settings(
        "homework", database_url=await databases.url("jobs"), job_intervals={"never": 0}
    )
    app = create_service_app(
        spec,
        settings=settings,
        platform=_platform(tmp_path, nats_server.url),
        key_source=StaticKeySource(issuer.jwks()),
    )
    async with app.router.lifespan_context(app):
        ctx: ServiceContext = app.state.ctx
        runner = ctx.jobs["flaky"]

        async def ran_twice() -> bool:
            return runner.runs >= 2

        await eventually(ran_twice, timeout=5)
        assert runner.failures == 1  # the failing first run did not end the job
        assert "never" not in ctx.jobs
    runs_at_stop = len(calls)
    assert "never" not in calls
    await asyncio.sleep(0.2)
    assert len(calls) == runs_at_stop  # no run after shutdown


def test_x03_job_intervals_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("HOMEWORK_JOB_INTERVALS", '{"alerts": 30}')
    assert service_settings("homework").job_intervals == {"alerts": 30.0}
