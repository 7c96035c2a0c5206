"""funds: 预收费资金监管：专户、一课一消、退费、冻结与对账（FUND-01..FUND-09）。"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import structlog
from fastapi import FastAPI

from chassis.app import ServiceContext, ServiceSpec, create_service_app
from chassis.messaging import Subscription
from chassis.roster import roster_subscription
from contracts import institutions as inst
from services.funds import service
from services.funds.api import router
from services.funds.models import Base, roster

# Shared secret of the custodian banks' signed callbacks (X-Bank-Signature).
BANK_SECRET_ENV = "FUNDS_BANK_CALLBACK_SECRET"
DEV_BANK_SECRET = "dev-only-bank-callback-secret"

institutions_subscription = Subscription(
    "institutions",
    "institutions",
    handlers={
        inst.LicenceGranted.TYPE: service.on_institution_facts,
        inst.LicenceReviewStarted.TYPE: service.on_institution_facts,
        inst.LicenceRejected.TYPE: service.on_institution_facts,
        inst.LicenceSuspended.TYPE: service.on_institution_facts,
        inst.LicenceReinstated.TYPE: service.on_institution_facts,
        inst.LicenceRevoked.TYPE: service.on_institution_facts,
        inst.LicenceTransformed.TYPE: service.on_institution_facts,
        inst.LicenceTerminated.TYPE: service.on_institution_facts,
        inst.Blacklisted.TYPE: service.on_institution_facts,
        inst.Delisted.TYPE: service.on_institution_facts,
        inst.CourseFiled.TYPE: service.on_course_filed,
    },
)


SWEEP_INTERVAL_ENV = "FUNDS_SWEEP_INTERVAL_SECONDS"
log = structlog.get_logger("funds")


class SweepScheduler:
    """Runs the time-driven steps (auto-confirmation, deemed agreement, overdue
    refunds, catch-up releases, risk scan) every ``interval`` seconds, the
    first run one interval after start. Stopped with the consumers at shutdown
    (it is registered among them: the chassis has no other hook)."""

    def __init__(self, ctx: ServiceContext, interval: float) -> None:
        self.ctx = ctx
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="funds-sweep")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                async with self.ctx.db.transaction() as session:
                    result = await service.sweep(
                        session, self.ctx.policies, service.today_in_china()
                    )
                log.info("funds_sweep", **result.__dict__)
            except Exception as exc:  # keep sweeping; the next run retries
                log.warning("funds_sweep_failed", error=repr(exc))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def on_startup(ctx: ServiceContext, app: FastAPI) -> None:
    ctx.extras["bank_secret"] = os.environ.get(BANK_SECRET_ENV, DEV_BANK_SECRET)
    interval = float(os.environ.get(SWEEP_INTERVAL_ENV, "600"))
    if interval > 0:
        scheduler = SweepScheduler(ctx, interval)
        scheduler.start()
        ctx.consumers.append(scheduler)  # type: ignore[arg-type]


SPEC = ServiceSpec(
    name="funds",
    title="预收费资金监管服务 funds",
    description="预收费资金监管：专户、一课一消、退费、冻结与对账（FUND-01..FUND-09）。",
    routers=[router],
    metadata=Base.metadata,
    migrations_dir=Path(__file__).resolve().parent / "migrations",
    subscriptions=[roster_subscription(roster), institutions_subscription],
    on_startup=on_startup,
    openapi_tags=[
        {"name": "专户", "description": "资金监管专户（FUND-01/07）"},
        {"name": "合同", "description": "购课与合同（FUND-02/03）"},
        {"name": "课次", "description": "一课一消（FUND-04/05）"},
        {"name": "退费", "description": "退费与冻结退费计划（FUND-06/07）"},
        {"name": "结算", "description": "机构结算划付（FUND-04）"},
        {"name": "银行", "description": "监管银行签名回调与对账（FUND-08）"},
        {"name": "风险", "description": "风险预警（FUND-08）"},
        {"name": "审计", "description": "日记账、试算平衡与哈希链（FUND-09）"},
    ],
)


def create_app(**kwargs: object) -> FastAPI:
    return create_service_app(SPEC, **kwargs)  # type: ignore[arg-type]
