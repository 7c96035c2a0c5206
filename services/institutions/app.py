"""institutions: licensing, white and black lists, trainers, courses, complaints."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from chassis.app import ServiceSpec, create_service_app
from chassis.roster import roster_subscription
from services.institutions.api import router
from services.institutions.models import Base, roster

SPEC = ServiceSpec(
    name="institutions",
    title="校外培训机构监管服务 institutions",
    description="机构登记审批、白名单与黑名单、从业人员、课程备案、投诉与检查（INST-01..INST-08）。",
    routers=[router],
    metadata=Base.metadata,
    migrations_dir=Path(__file__).resolve().parent / "migrations",
    subscriptions=[roster_subscription(roster)],
)


def create_app(**kwargs: object) -> FastAPI:
    return create_service_app(SPEC, **kwargs)  # type: ignore[arg-type]
