"""afterschool: 课后服务方案、课程菜单、自愿报名、考勤、收费与评价（AS-01..AS-08）。"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.middleware import Middleware

from chassis.app import ServiceContext, ServiceSpec, create_service_app
from chassis.scheduler import PeriodicJob
from services.afterschool import service
from services.afterschool.api import EnrollFastPath, router
from services.afterschool.consumers import (
    afterschool_roster_subscription,
    flag_lapsed_licences,
    institutions_subscription,
)
from services.afterschool.models import Base


async def close_enroller(ctx: ServiceContext) -> None:
    enroller = ctx.extras.get("enroller")
    if enroller is not None:
        await enroller.close()


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
    on_shutdown=close_enroller,
)


def create_app(**kwargs: object) -> FastAPI:
    app = create_service_app(SPEC, **kwargs)  # type: ignore[arg-type]
    # Innermost: inside the chassis's request-context middleware (added first).
    app.user_middleware.append(Middleware(EnrollFastPath))
    return app
