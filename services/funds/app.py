"""funds: 预收费资金监管：专户、一课一消、退费、冻结与对账（FUND-01..FUND-09）。"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.app import ServiceContext, ServiceSpec, create_service_app
from chassis.messaging import Subscription
from chassis.roster import roster_subscription
from chassis.scheduler import PeriodicJob
from contracts import institutions as inst
from services.funds import service
from services.funds.api import router
from services.funds.models import Base, roster
from services.funds.writer import PostingWriter

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


async def run_sweep(ctx: ServiceContext) -> service.SweepResult:
    """The time-driven steps: auto-confirmation, deemed agreement, overdue
    refunds, catch-up releases and the risk scan (each idempotent)."""
    writer: PostingWriter = ctx.extras["posting_writer"]

    async def work(session: AsyncSession) -> service.SweepResult:
        return await service.sweep(session, ctx.policies, service.today_in_china())

    # Through the posting writer, like every ledger write of this process.
    result: service.SweepResult = await writer.run(work)
    return result


# Every 10 minutes by default; FUNDS_JOB_INTERVALS='{"sweep": seconds}' overrides.
sweep_job = PeriodicJob("sweep", run_sweep, interval_seconds=600, run_at_start=True)


async def on_startup(ctx: ServiceContext, app: FastAPI) -> None:
    ctx.extras["bank_secret"] = os.environ.get(BANK_SECRET_ENV, DEV_BANK_SECRET)
    ctx.extras["posting_writer"] = PostingWriter(ctx.db)


SPEC = ServiceSpec(
    name="funds",
    title="预收费资金监管服务 funds",
    description="预收费资金监管：专户、一课一消、退费、冻结与对账（FUND-01..FUND-09）。",
    routers=[router],
    metadata=Base.metadata,
    migrations_dir=Path(__file__).resolve().parent / "migrations",
    subscriptions=[roster_subscription(roster), institutions_subscription],
    on_startup=on_startup,
    periodic_jobs=[sweep_job],
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
