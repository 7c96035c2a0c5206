"""afterschool: 课后服务方案、课程菜单、自愿报名、考勤、收费与评价（AS-01..AS-08）。"""

from __future__ import annotations

import gc
from pathlib import Path

from fastapi import FastAPI
from starlette.middleware import Middleware

from chassis.app import ServiceContext, ServiceSpec, create_service_app
from chassis.config import platform_settings
from chassis.scheduler import PeriodicJob
from services.afterschool import service
from services.afterschool.api import EnrollFastPath, router
from services.afterschool.consumers import (
    afterschool_roster_subscription,
    flag_lapsed_licences,
    institutions_subscription,
)
from services.afterschool.models import Base


async def run_licence_expiry(ctx: ServiceContext) -> dict[str, int]:
    async with ctx.db.transaction() as session:
        return {"flagged": await flag_lapsed_licences(session, service.local_today())}


# Hourly (AFTERSCHOOL_JOB_INTERVALS='{"licence_expiry": seconds}'), so a licence
# that ends today is out of the catalog soon after local midnight.
licence_expiry_job = PeriodicJob(
    "licence_expiry", run_licence_expiry, interval_seconds=3600, run_at_start=True
)

SPEC = ServiceSpec(
    name="afterschool",
    title="课后服务 afterschool",
    description="课后服务方案、课程菜单、自愿报名、考勤、收费与评价（AS-01..AS-08）。",
    routers=[router],
    metadata=Base.metadata,
    migrations_dir=Path(__file__).resolve().parent / "migrations",
    subscriptions=[afterschool_roster_subscription(), institutions_subscription()],
    periodic_jobs=[licence_expiry_job],
)


# The collector's thresholds when the process runs as a server (GC_FREEZE, as
# `shuangjian serve` sets it): a rush allocates fast, and with the default
# (700, 10, 10) the collector ran ~40 young and ~4 middle collections per
# second and a full one every few seconds — each a stall of every request in
# flight (full ones 50-70 ms under load: the p99). Young collections every
# 10,000 net allocations and full ones 200 times rarer still: the same
# garbage collected, in fewer, larger sweeps of the young objects only.
SERVER_GC_THRESHOLDS = (10_000, 20, 100)


def create_app(**kwargs: object) -> FastAPI:
    if platform_settings().gc_freeze:
        gc.set_threshold(*SERVER_GC_THRESHOLDS)
    app = create_service_app(SPEC, **kwargs)  # type: ignore[arg-type]
    # Innermost: inside the chassis's request-context middleware (added first).
    app.user_middleware.append(Middleware(EnrollFastPath))
    return app
