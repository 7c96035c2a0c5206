"""homework: 作业公示、每日书面作业总量控制（HW-01..HW-08）。"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from chassis.app import ServiceSpec, create_service_app
from chassis.roster import roster_subscription
from services.homework.api import router
from services.homework.models import Base, roster

SPEC = ServiceSpec(
    name="homework",
    title="作业公示与负担监测服务 homework",
    description="作业公示、每日书面作业总量控制（HW-01..HW-08）。",
    routers=[router],
    metadata=Base.metadata,
    migrations_dir=Path(__file__).resolve().parent / "migrations",
    subscriptions=[roster_subscription(roster)],
)


def create_app(**kwargs: object) -> FastAPI:
    return create_service_app(SPEC, **kwargs)  # type: ignore[arg-type]
