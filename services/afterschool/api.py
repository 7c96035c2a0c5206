"""afterschool's HTTP routes: parse, authorize, call a use case, shape the reply."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from chassis import idempotency
from chassis.app import DB, Ctx, Policies
from chassis.auth import CurrentPrincipal
from services.afterschool import schemas, service

router = APIRouter()


# ------------------------------------------------------------ AS-01 plans


@router.post(
    "/schools/{school_id}/plans",
    status_code=201,
    summary="制定学期课后服务方案（一校一案，AS-01）",
    tags=["方案与课程"],
)
async def create_plan(
    school_id: str,
    data: schemas.PlanIn,
    principal: CurrentPrincipal,
    db: DB,
    policies: Policies,
) -> schemas.PlanOut:
    return await service.create_plan(db, policies, principal, school_id, data)


@router.get("/schools/{school_id}/plans", summary="学校的课后服务方案", tags=["方案与课程"])
async def list_plans(school_id: str, principal: CurrentPrincipal, db: DB) -> list[schemas.PlanOut]:
    return await service.list_plans(db, principal, school_id)


@router.get("/plans/{plan_id}", summary="课后服务方案", tags=["方案与课程"])
async def get_plan(plan_id: str, principal: CurrentPrincipal, db: DB) -> schemas.PlanOut:
    async with db.read() as session:
        return service.plan_out(await service.load_plan(session, principal, plan_id))


# ------------------------------------------------------- AS-02/03 menu


@router.post(
    "/plans/{plan_id}/courses",
    status_code=201,
    summary="在课程菜单中增加课程（AS-02, AS-03, AS-05）",
    tags=["方案与课程"],
)
async def add_course(
    plan_id: str,
    data: schemas.CourseIn,
    principal: CurrentPrincipal,
    db: DB,
    policies: Policies,
) -> schemas.CourseOut:
    return await service.add_course(db, policies, principal, plan_id, data)


@router.get("/plans/{plan_id}/courses", summary="课程菜单", tags=["方案与课程"])
async def list_courses(
    plan_id: str, principal: CurrentPrincipal, db: DB
) -> list[schemas.CourseOut]:
    return await service.list_courses(db, principal, plan_id)


@router.get("/courses/{course_id}", summary="课程（含余位）", tags=["方案与课程"])
async def get_course(course_id: str, principal: CurrentPrincipal, db: DB) -> schemas.CourseOut:
    return await service.get_course(db, principal, course_id)


# ---------------------------------------------------- AS-04 enrollment


@router.put(
    "/plans/{plan_id}/window",
    summary="设置报名窗口：先到先得或抽签（AS-04）",
    tags=["报名"],
)
async def open_window(
    plan_id: str,
    data: schemas.WindowIn,
    principal: CurrentPrincipal,
    db: DB,
    policies: Policies,
) -> schemas.PlanOut:
    return await service.open_window(db, policies, principal, plan_id, data)


@router.post(
    "/enrollments",
    status_code=201,
    summary="家长为自己的孩子报名课程（自愿、须带 Idempotency-Key，AS-04）",
    tags=["报名"],
    response_model=schemas.EnrollmentOut,
)
async def enroll(
    request: Request,
    data: schemas.EnrollIn,
    principal: CurrentPrincipal,
    ctx: Ctx,
    waitlist: bool = Query(True, description="课程已满时是否进入候补（先到先得）"),
) -> Response:
    claim = await idempotency.begin(ctx.db, request, principal)
    if isinstance(claim, Response):
        return claim

    async def work(session: AsyncSession) -> Any:
        return await service.enroll(session, principal, data, join_waitlist=waitlist)

    return await idempotency.run(ctx.db, claim, work, status_code=201)


@router.post(
    "/enrollments/{enrollment_id}/withdraw",
    summary="退课：座位递补给候补第一位或释放（AS-04）",
    tags=["报名"],
)
async def withdraw(
    enrollment_id: str, principal: CurrentPrincipal, db: DB
) -> schemas.EnrollmentOut:
    return await service.withdraw(db, principal, enrollment_id)


@router.get("/students/{student_id}/enrollments", summary="学生的报名记录", tags=["报名"])
async def student_enrollments(
    student_id: str, principal: CurrentPrincipal, db: DB
) -> list[schemas.EnrollmentOut]:
    return await service.student_enrollments(db, principal, student_id)


@router.post(
    "/plans/{plan_id}/lottery",
    summary="报名截止后按公布的种子抽签（AS-04）",
    tags=["报名"],
)
async def draw_lottery(plan_id: str, principal: CurrentPrincipal, db: DB) -> dict[str, Any]:
    return await service.draw_lottery(db, principal, plan_id)


@router.get("/courses/{course_id}/lottery", summary="课程抽签的审计记录（AS-04）", tags=["报名"])
async def lottery_record(course_id: str, principal: CurrentPrincipal, db: DB) -> dict[str, Any]:
    return await service.lottery_record(db, principal, course_id)
