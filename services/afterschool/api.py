"""afterschool's HTTP routes: parse, authorize, call a use case, shape the reply."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from chassis import idempotency
from chassis.app import DB, Ctx, Policies, ServiceContext
from chassis.auth import CurrentPrincipal, current_principal
from chassis.csvexport import csv_response
from chassis.errors import Problem, problem_response
from services.afterschool import operations, rush, schemas, service

router = APIRouter()


# ------------------------------------------- AS-04 enrollment (the rush)
# First in the router: the busiest route is matched first.


async def _enroll_lean(request: Request) -> Response:
    """POST /enrollments as it runs (the busiest route, AS-04): the same
    checks as the declared signature below, in FastAPI's order (token, query,
    body), without its per-request dependency solving — one token check
    (cached), one Pydantic parse of the body — then the rush queue."""
    principal = await current_principal(request, None)
    raw_waitlist = _waitlist_of(request.scope["query_string"])
    waitlist = True
    errors: list[dict[str, Any]] = []
    if raw_waitlist is not None:
        flag = _FLAGS.get(raw_waitlist.lower())
        if flag is None:
            errors.append(
                {
                    "type": "bool_parsing",
                    "loc": ("query", "waitlist"),
                    "msg": "Input should be a valid boolean, unable to interpret input",
                    "input": raw_waitlist,
                }
            )
        else:
            waitlist = flag
    data: schemas.EnrollIn | None = None
    try:
        data = schemas.EnrollIn.model_validate_json(await request.body())
    except ValidationError as exc:
        errors.extend({**e, "loc": ("body", *e["loc"])} for e in exc.errors())
    if errors or data is None:
        raise RequestValidationError(errors)
    return await enroll(request, data, principal, request.app.state.ctx, waitlist)


_WAITLIST_OF_QUERY: dict[bytes, str | None] = {b"": None}


def _waitlist_of(query: bytes) -> str | None:
    """``request.query_params.get("waitlist")``, remembered per query string:
    a rush sends the same few (Starlette parses each anew through urllib —
    a few per cent of the route's CPU)."""
    try:
        return _WAITLIST_OF_QUERY[query]
    except KeyError:
        value = QueryParams(query).get("waitlist")
        if len(_WAITLIST_OF_QUERY) < 64:
            _WAITLIST_OF_QUERY[query] = value
        return value


_FLAGS = {
    "true": True, "1": True, "yes": True, "on": True, "t": True, "y": True,
    "false": False, "0": False, "no": False, "off": False, "f": False, "n": False,
}  # fmt: skip


class EnrollFastPath:
    """Innermost middleware (inside the chassis's request id, metrics and
    access log): POST /enrollments goes straight to ``_enroll_lean``, past
    FastAPI's exception middleware, exit stacks and router — a fifth of the
    CPU of a rush request. Errors become the same answers: the app's own
    exception handlers (problem+json) are looked up by class, as Starlette's
    ExceptionMiddleware does; anything unhandled goes on to the server-error
    handler (a 500 problem). Any other request passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != "/enrollments"
            or scope["method"] != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = _ENROLL_ROUTE  # the metrics' route label
        request = Request(scope, receive, send)
        try:
            response = await _enroll_lean(request)
        except Exception as exc:
            handler = _handler_for(scope["app"].exception_handlers, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)


def _handler_for(handlers: dict[Any, Any], exc: Exception) -> Any:
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None  # the server-error middleware's (500)
        if cls in handlers:
            return handlers[cls]
    return None


class _LeanEnrollRoute(APIRoute):
    """The declared endpoint documents the route (OpenAPI); _enroll_lean runs it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return _enroll_lean


async def enroll(
    request: Request,
    data: schemas.EnrollIn,
    principal: CurrentPrincipal,
    ctx: Ctx,
    waitlist: bool = Query(True, description="课程已满时是否进入候补（先到先得）"),
) -> Response:
    claim = await idempotency.identify(request, principal)
    attempt = rush.Attempt(principal, data, waitlist, claim)
    if not waitlist and rush.sold_out_now(data.course_id):
        # Known full and no waitlist wanted: told from one read shared by all
        # such askers waiting, nothing written (services/afterschool/rush.py).
        answer = await _enroller(ctx).ask_sold_out(attempt)
    else:
        # Group commit: the attempts waiting in this process are decided
        # together in one transaction (services/afterschool/rush.py).
        answer = await _enroller(ctx).submit(attempt)
    if isinstance(answer, Problem):
        # A refusal comes back as a value, not raised through the queue's
        # future: an exception stored in a future and raised from it ties the
        # future, its traceback and the waiting frames into a cycle only the
        # garbage collector frees — per refusal, thousands a second when a
        # course is full (the young collections grew to 10-20 ms).
        return problem_response(request, answer)
    return answer


router.add_api_route(
    "/enrollments",
    enroll,
    methods=["POST"],
    status_code=201,
    summary="家长为自己的孩子报名课程（自愿、须带 Idempotency-Key，AS-04）",
    tags=["报名"],
    response_model=schemas.EnrollmentOut,
    route_class_override=_LeanEnrollRoute,
)
_ENROLL_ROUTE = router.routes[-1]


def _enroller(ctx: ServiceContext) -> rush.Enroller:
    enroller = ctx.extras.get("enroller")
    if enroller is None:
        # At most pool-size enrollment transactions at once: a rush queues in
        # memory, in arrival order, instead of holding locks while waiting for
        # a connection.
        gate = asyncio.Semaphore(max(1, ctx.settings.db_pool_size))
        enroller = ctx.extras["enroller"] = rush.Enroller(ctx.db, gate)
    assert isinstance(enroller, rush.Enroller)
    return enroller


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
    "/enrollments/{enrollment_id}/withdraw",
    summary="退课：座位递补给候补第一位或释放（AS-04）",
    tags=["报名"],
)
async def withdraw(
    enrollment_id: str, principal: CurrentPrincipal, db: DB
) -> schemas.EnrollmentOut:
    return await service.withdraw(db, principal, enrollment_id)


@router.get(
    "/courses/{course_id}/enrollments",
    summary="课程的报名与候补名单（学校教职工，姓名脱敏）",
    tags=["报名"],
)
async def course_enrollments(
    course_id: str, principal: CurrentPrincipal, db: DB
) -> list[dict[str, Any]]:
    return await service.course_enrollments(db, principal, course_id)


@router.post(
    "/courses/{course_id}/reapprove",
    summary="机构恢复后学校重新批准被暂停的课程（AS-03）",
    tags=["方案与课程"],
)
async def reapprove_course(
    course_id: str, principal: CurrentPrincipal, db: DB, policies: Policies
) -> schemas.CourseOut:
    return await service.reapprove_course(db, policies, principal, course_id)


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


# ---------------------------------------------------- AS-06 attendance


@router.get(
    "/courses/{course_id}/roll-call-sheet",
    summary="点名名单（仅该课程的任课教师）",
    tags=["考勤与离校"],
)
async def roll_call_sheet(course_id: str, principal: CurrentPrincipal, db: DB) -> dict[str, Any]:
    return await operations.roll_call_sheet(db, principal, course_id)


@router.put(
    "/courses/{course_id}/sessions/{day}/roll-call",
    summary="课次点名：出勤、缺勤、请假（AS-06）",
    tags=["考勤与离校"],
)
async def roll_call(
    course_id: str,
    day: dt.date,
    data: schemas.RollCallIn,
    principal: CurrentPrincipal,
    db: DB,
) -> list[dict[str, Any]]:
    return await operations.roll_call(db, principal, course_id, day, data)


@router.put(
    "/students/{student_id}/leave-alone-consent",
    summary="监护人同意孩子自行离校（长期有效，AS-06）",
    tags=["考勤与离校"],
)
async def give_leave_consent(
    student_id: str, principal: CurrentPrincipal, db: DB
) -> dict[str, Any]:
    return await operations.set_leave_consent(db, principal, student_id, given=True)


@router.delete(
    "/students/{student_id}/leave-alone-consent",
    summary="撤回自行离校同意（AS-06）",
    tags=["考勤与离校"],
)
async def revoke_leave_consent(
    student_id: str, principal: CurrentPrincipal, db: DB
) -> dict[str, Any]:
    return await operations.set_leave_consent(db, principal, student_id, given=False)


@router.post(
    "/schools/{school_id}/exits",
    status_code=201,
    summary="离校记录：监护人接走、经同意自行离校、弹性离校（AS-06）",
    tags=["考勤与离校"],
)
async def record_exit(
    school_id: str, data: schemas.ExitIn, principal: CurrentPrincipal, db: DB
) -> dict[str, Any]:
    return await operations.record_exit(db, principal, school_id, data)


# ------------------------------------------------------------ AS-05 fees


@router.put(
    "/schools/{school_id}/waivers",
    summary="标记家庭经济困难学生的减免（仅学校可见，AS-05）",
    tags=["收费"],
)
async def set_waiver(
    school_id: str, data: schemas.WaiverIn, principal: CurrentPrincipal, db: DB
) -> dict[str, Any]:
    return await operations.set_waiver(db, principal, school_id, data)


@router.post(
    "/plans/{plan_id}/fees/settle",
    summary="按月预收或按实际服务天数结算（AS-05）",
    tags=["收费"],
)
async def settle_month(
    plan_id: str, data: schemas.SettleIn, principal: CurrentPrincipal, db: DB
) -> list[dict[str, Any]]:
    return await operations.settle_month(db, principal, plan_id, data)


@router.post(
    "/fee-statements/{statement_id}/payments",
    status_code=201,
    summary="登记缴入学校非税账户的款项（须带 Idempotency-Key，AS-05）",
    tags=["收费"],
)
async def record_payment(
    statement_id: str,
    request: Request,
    data: schemas.PaymentIn,
    principal: CurrentPrincipal,
    ctx: Ctx,
) -> Response:
    claim = await idempotency.begin(ctx.db, request, principal)
    if isinstance(claim, Response):
        return claim

    async def work(session: AsyncSession) -> Any:
        return await operations.record_payment(session, principal, statement_id, data)

    return await idempotency.run(ctx.db, claim, work, status_code=201)


@router.get(
    "/students/{student_id}/fee-statements",
    summary="孩子的课后服务费账单（监护人与学校）",
    tags=["收费"],
)
async def student_statements(
    student_id: str, principal: CurrentPrincipal, db: DB
) -> list[dict[str, Any]]:
    return await operations.student_statements(db, principal, student_id)


@router.get(
    "/students/{student_id}/refunds",
    summary="孩子的退费记录：金额、天数、非税账户（监护人与学校，AS-05）",
    tags=["收费"],
)
async def student_refunds(
    student_id: str, principal: CurrentPrincipal, db: DB
) -> list[dict[str, Any]]:
    return await service.student_refunds(db, principal, student_id)


@router.get(
    "/schools/{school_id}/refunds",
    summary="学校的退费台账（AS-05）",
    tags=["收费"],
)
async def school_refunds(
    school_id: str, principal: CurrentPrincipal, db: DB
) -> list[dict[str, Any]]:
    return await service.school_refunds(db, principal, school_id)


# ------------------------------------------------------ AS-07 evaluation


@router.post(
    "/courses/{course_id}/ratings",
    status_code=201,
    summary="家长评价孩子参加的课程（每月一次，AS-07）",
    tags=["评价与监管"],
)
async def rate_course(
    course_id: str, data: schemas.RatingIn, principal: CurrentPrincipal, db: DB
) -> dict[str, Any]:
    return await operations.rate_course(db, principal, course_id, data)


@router.post(
    "/plans/{plan_id}/surveys",
    status_code=201,
    summary="学期满意度调查（AS-07）",
    tags=["评价与监管"],
)
async def answer_survey(
    plan_id: str, data: schemas.SurveyIn, principal: CurrentPrincipal, db: DB
) -> dict[str, Any]:
    return await operations.answer_survey(db, principal, plan_id, data)


# ------------------------------------------------------- AS-08 oversight


@router.get(
    "/oversight/regions/{region_id}",
    summary="区域课后服务监管：覆盖率、参与率、困难学生、校外占比、满意度（AS-08）",
    tags=["评价与监管"],
    response_model=None,
)
async def region_oversight(
    region_id: str,
    principal: CurrentPrincipal,
    db: DB,
    policies: Policies,
    term: str = Query(min_length=1, max_length=100),
    school_id: str | None = None,
    format: str = Query("json", pattern="^(json|csv)$"),
) -> Any:
    report = await operations.region_oversight(db, policies, principal, region_id, term, school_id)
    if format == "csv":
        return csv_response(f"afterschool-{region_id}", operations.oversight_csv(report))
    return report
