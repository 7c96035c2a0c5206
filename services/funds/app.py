"""funds: 预收费资金监管：专户、一课一消、退费、冻结与对账（FUND-01..FUND-09）。"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from chassis.app import ServiceSpec, create_service_app
from chassis.roster import roster_subscription
from services.funds.api import router
from services.funds.models import Base, roster

SPEC = ServiceSpec(
    name="funds",
    title="预收费资金监管服务 funds",
    description="预收费资金监管：专户、一课一消、退费、冻结与对账（FUND-01..FUND-09）。",
    routers=[router],
    metadata=Base.metadata,
    migrations_dir=Path(__file__).resolve().parent / "migrations",
    subscriptions=[roster_subscription(roster)],
)


def create_app(**kwargs: object) -> FastAPI:
    return create_service_app(SPEC, **kwargs)  # type: ignore[arg-type]
