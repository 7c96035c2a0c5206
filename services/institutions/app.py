"""institutions: licensing, white and black lists, trainers, courses, complaints."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

from chassis.app import ServiceContext, ServiceSpec, create_service_app
from chassis.calendar import load_holiday_files, load_school_terms
from chassis.roster import roster_subscription
from services.institutions import service
from services.institutions.api import router
from services.institutions.compliance import ComplianceSigner
from services.institutions.consumers import funds_subscription, trainer_screening_subscription
from services.institutions.models import Base, roster


async def _on_startup(ctx: ServiceContext, app: FastAPI) -> None:
    # The compliance-code key (合规码, INST-04); the public half is the JWKS.
    ctx.extras["compliance"] = ComplianceSigner.from_environment(ctx.platform.var_dir)
    ctx.extras["public_base_url"] = os.environ.get("INSTITUTIONS_PUBLIC_BASE_URL", "")
    # INST-07: public reports per client address and window (the gateway limits
    # first; this holds when the service is reached without it).
    ctx.extras["complaint_rate"] = service.ComplaintRate(
        limit=int(os.environ.get("INSTITUTIONS_COMPLAINT_LIMIT", "10")),
        window_seconds=int(os.environ.get("INSTITUTIONS_COMPLAINT_WINDOW_SECONDS", "3600")),
    )
    # X-05: published holiday arrangements and the regions' school terms.
    ctx.extras["holiday_files"] = load_holiday_files()
    ctx.extras["terms"] = load_school_terms()


SPEC = ServiceSpec(
    name="institutions",
    title="校外培训机构监管服务 institutions",
    description="机构登记审批、白名单与黑名单、从业人员、课程备案、投诉与检查（INST-01..INST-08）。",
    routers=[router],
    metadata=Base.metadata,
    migrations_dir=Path(__file__).resolve().parent / "migrations",
    subscriptions=[
        roster_subscription(roster),
        trainer_screening_subscription(),
        funds_subscription(),
    ],
    on_startup=_on_startup,
    openapi_tags=[
        {
            "name": "公开查询",
            "description": "白名单、黑名单、机构公开信息、合规码核验与举报（无需登录）",
        },
        {
            "name": "登记与许可",
            "description": "登记申请、审批、许可状态变更与黑名单（INST-01..04）",
        },
        {"name": "从业人员", "description": "实名登记、在职教师比对、资格与背景审查（INST-05）"},
        {"name": "课程备案", "description": "培训时间、时长与政府指导价核验（INST-06）"},
        {"name": "举报投诉", "description": "受理、分派、调查、办结与逾期督办（INST-07）"},
        {"name": "检查处罚与信用", "description": "检查、处罚与信用档案（INST-04、INST-08）"},
    ],
)


def create_app(**kwargs: object) -> FastAPI:
    return create_service_app(SPEC, **kwargs)  # type: ignore[arg-type]
