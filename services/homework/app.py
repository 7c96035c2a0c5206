"""homework: 作业公示、每日书面作业总量控制（HW-01..HW-08）。"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from chassis.app import ServiceContext, ServiceSpec, create_service_app
from chassis.calendar import load_school_terms
from chassis.roster import roster_subscription
from chassis.scheduler import PeriodicJob
from services.homework import service
from services.homework.api import router
from services.homework.models import Base, roster
from services.homework.service import TERMS_KEY


async def _on_startup(ctx: ServiceContext, app: FastAPI) -> None:
    # school terms and vacations per region (policy/calendar/terms), so
    # vacation days take the profile's vacation caps (HW-04).
    ctx.extras[TERMS_KEY] = load_school_terms()


async def run_burden_recheck(ctx: ServiceContext) -> service.RecheckResult:
    """HW-06: re-evaluate burden alerts as the school-day window slides."""
    return await service.recheck_burden(ctx)


# Hourly by default, so the window moves soon after local midnight whenever the
# service started; a class is evaluated once per local date (the run skips
# classes already evaluated for today). HOMEWORK_JOB_INTERVALS=
# '{"burden_recheck": seconds}' overrides, 0 switches it off.
burden_recheck_job = PeriodicJob(
    "burden_recheck", run_burden_recheck, interval_seconds=3600, run_at_start=True
)


SPEC = ServiceSpec(
    name="homework",
    title="作业公示与负担监测服务 homework",
    description="作业公示、每日书面作业总量控制、班主任统筹、无书面作业日、禁止事项筛查、"
    "实际用时反馈与负担预警、每周公示与教育局监管（HW-01..HW-08）。",
    routers=[router],
    metadata=Base.metadata,
    migrations_dir=Path(__file__).resolve().parent / "migrations",
    subscriptions=[roster_subscription(roster)],
    on_startup=_on_startup,
    periodic_jobs=[burden_recheck_job],
    openapi_tags=[
        {"name": "作业发布", "description": "发布、修改、撤回作业；班级当日用量（HW-01..HW-05）"},
        {"name": "班主任统筹", "description": "各学科每日配额（HW-03）"},
        {"name": "无书面作业日", "description": "学校自设的无书面作业日（HW-04）"},
        {"name": "实际用时反馈", "description": "学生、家长反馈实际用时；负担预警（HW-06）"},
        {"name": "公示", "description": "无需登录的作业公示与每周汇总（HW-01、HW-07）"},
        {"name": "监管", "description": "教育局与学校的监管视图和导出（HW-08）"},
        {"name": "家长与学生", "description": "家长、学生可见的班级"},
        {"name": "班级", "description": "名册只读副本"},
    ],
)


def create_app(**kwargs: object) -> FastAPI:
    return create_service_app(SPEC, **kwargs)  # type: ignore[arg-type]
