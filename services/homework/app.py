"""homework: 作业公示、每日书面作业总量控制（HW-01..HW-08）。"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from chassis.app import ServiceContext, ServiceSpec, create_service_app
from chassis.calendar import load_school_terms
from chassis.roster import roster_subscription
from services.homework.api import router
from services.homework.models import Base, roster
from services.homework.service import TERMS_KEY


async def _on_startup(ctx: ServiceContext, app: FastAPI) -> None:
    # school terms and vacations per region (policy/calendar/terms), so
    # vacation days take the profile's vacation caps (HW-04).
    ctx.extras[TERMS_KEY] = load_school_terms()


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
