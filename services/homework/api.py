"""homework's HTTP routes: parse, authorize, call a use case, shape the reply."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel

from chassis.app import DB, Ctx
from chassis.auth import CurrentPrincipal
from chassis.csvexport import CSV_OPENAPI, csv_response, render
from chassis.errors import FieldError, Problem, not_found
from services.homework import exports, schemas, service
from services.homework.models import roster

router = APIRouter()

MAX_RANGE_DAYS = 400


class DateRange:
    """`?from=&to=` (local dates); default the four weeks up to today."""

    def __init__(
        self,
        date_from: Annotated[dt.date | None, Query(alias="from", description="起始日期")] = None,
        date_to: Annotated[dt.date | None, Query(alias="to", description="截止日期")] = None,
    ) -> None:
        self.to = date_to or service.local_today()
        self.start = date_from or (self.to - dt.timedelta(days=27))
        if self.start > self.to:
            raise Problem(
                422,
                "起始日期不能晚于截止日期。",
                errors=[FieldError(field="query.from", message="晚于 to")],
            )
        if (self.to - self.start).days > MAX_RANGE_DAYS:
            raise Problem(
                422,
                f"日期范围不能超过 {MAX_RANGE_DAYS} 天。",
                errors=[FieldError(field="query.from", message="范围过大")],
            )


Range = Annotated[DateRange, Depends()]


class ClassCopy(BaseModel):
    id: str
    school_id: str
    grade: int
    name: str
    head_teacher_id: str | None
    school_system: str | None


# ---------------------------------------------------------------- classes


@router.get(
    "/classes/{class_id}",
    response_model=ClassCopy,
    tags=["班级"],
    summary="班级（来自名册事件的只读副本）",
)
async def get_class(class_id: str, principal: CurrentPrincipal, db: DB) -> ClassCopy:
    classes, schools = roster.classes, roster.schools
    async with db.read() as session:
        row = (
            (
                await session.execute(
                    classes.select()
                    .add_columns(schools.c.school_system, schools.c.region_id)
                    .join(schools, schools.c.id == classes.c.school_id, isouter=True)
                    .where(classes.c.id == class_id)
                )
            )
            .mappings()
            .first()
        )
    if row is None:
        raise not_found("班级不存在。")
    allowed = principal.has_tenant("school", row["school_id"]) or (
        principal.has_role("bureau", "regulator", "auditor")
        and row["region_id"] is not None
        and principal.has_tenant("region", row["region_id"])
    )
    if not allowed:
        raise not_found("班级不存在。")
    return ClassCopy(**{k: row[k] for k in ClassCopy.model_fields})


@router.get(
    "/me/classes",
    response_model=list[schemas.ClassRef],
    tags=["家长与学生"],
    summary="家长的孩子所在班级（学生：本人班级）",
)
async def my_classes(principal: CurrentPrincipal, ctx: Ctx) -> list[schemas.ClassRef]:
    return await service.my_classes(ctx, principal)


# ---------------------------------------------------------------- assignments (HW-01..HW-05)


@router.post(
    "/classes/{class_id}/assignments",
    response_model=schemas.AssignmentReply,
    status_code=201,
    tags=["作业发布"],
    summary="发布作业（HW-01..HW-05；答复中给出班级当日已用与剩余分钟）",
)
async def publish(
    class_id: str, body: schemas.AssignmentIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.AssignmentReply:
    return await service.publish(ctx, principal, class_id, body)


@router.get(
    "/classes/{class_id}/assignments",
    response_model=list[schemas.AssignmentOut],
    tags=["作业发布"],
    summary="班级作业列表（本校教师、教育局、本班家长与学生）",
)
async def class_assignments(
    class_id: str,
    principal: CurrentPrincipal,
    ctx: Ctx,
    date: Annotated[dt.date | None, Query(description="某一天；不给则用 from/to")] = None,
    date_from: Annotated[dt.date | None, Query(alias="from")] = None,
    date_to: Annotated[dt.date | None, Query(alias="to")] = None,
    include_withdrawn: bool = False,
) -> list[schemas.AssignmentOut]:
    if date is not None:
        start = end = date
    else:
        span = DateRange(date_from, date_to)
        start, end = span.start, span.to
    return await service.class_assignments(ctx, principal, class_id, start, end, include_withdrawn)


@router.get(
    "/classes/{class_id}/usage",
    response_model=schemas.Usage,
    tags=["作业发布"],
    summary="班级某日书面家庭作业用量：上限、已用、剩余（HW-02）",
)
async def class_usage(
    class_id: str, principal: CurrentPrincipal, ctx: Ctx, date: dt.date
) -> schemas.Usage:
    return await service.class_usage(ctx, principal, class_id, date)


@router.patch(
    "/assignments/{assignment_id}",
    response_model=schemas.AssignmentReply,
    tags=["作业发布"],
    summary="修改作业（保留修改记录，重新检查全部规则）",
)
async def edit(
    assignment_id: str, body: schemas.AssignmentPatch, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.AssignmentReply:
    return await service.edit(ctx, principal, assignment_id, body)


@router.post(
    "/assignments/{assignment_id}/withdraw",
    response_model=schemas.AssignmentReply,
    tags=["作业发布"],
    summary="撤回作业（保留记录）",
)
async def withdraw(
    assignment_id: str, body: schemas.WithdrawIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.AssignmentReply:
    return await service.withdraw(ctx, principal, assignment_id, body.reason)


@router.get(
    "/assignments/{assignment_id}/history",
    response_model=list[schemas.RevisionOut],
    tags=["作业发布"],
    summary="作业的发布、修改、撤回记录",
)
async def history(
    assignment_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> list[schemas.RevisionOut]:
    return await service.assignment_history(ctx, principal, assignment_id)


# ---------------------------------------------------------------- quotas (HW-03)


@router.get(
    "/classes/{class_id}/quotas",
    response_model=schemas.QuotasOut,
    tags=["班主任统筹"],
    summary="班级各学科每日书面作业配额",
)
async def get_quotas(class_id: str, principal: CurrentPrincipal, ctx: Ctx) -> schemas.QuotasOut:
    return await service.get_quotas(ctx, principal, class_id)


@router.put(
    "/classes/{class_id}/quotas",
    response_model=schemas.QuotasOut,
    tags=["班主任统筹"],
    summary="班主任设定各学科每日配额（合计不超过年级上限；空列表即取消）",
)
async def set_quotas(
    class_id: str, body: schemas.QuotasIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.QuotasOut:
    return await service.set_quotas(ctx, principal, class_id, body)


# ---------------------------------------------------------------- evening self-study (HW-02)


@router.get(
    "/classes/{class_id}/evening-study",
    response_model=schemas.EveningStudyOut,
    tags=["作业发布"],
    summary="班级参加晚自习的星期（环翠：当日书面作业不带回家）",
)
async def get_evening_study(
    class_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.EveningStudyOut:
    return await service.get_evening_study(ctx, principal, class_id)


@router.put(
    "/classes/{class_id}/evening-study",
    response_model=schemas.EveningStudyOut,
    tags=["作业发布"],
    summary="学校管理员设定初中班级参加晚自习的星期（HW-02）",
)
async def set_evening_study(
    class_id: str, body: schemas.EveningStudyIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.EveningStudyOut:
    return await service.set_evening_study(ctx, principal, class_id, body.weekdays)


# ---------------------------------------------------------------- no-written days (HW-04)


@router.put(
    "/schools/{school_id}/no-written-homework-days/{day}",
    response_model=schemas.NoWrittenDayOut,
    tags=["无书面作业日"],
    summary="学校设定无书面作业日（学校管理员）",
)
async def declare_day(
    school_id: str,
    day: dt.date,
    body: schemas.NoWrittenDayIn,
    principal: CurrentPrincipal,
    ctx: Ctx,
) -> schemas.NoWrittenDayOut:
    return await service.declare_no_written_day(ctx, principal, school_id, day, body.reason)


@router.delete(
    "/schools/{school_id}/no-written-homework-days/{day}",
    status_code=204,
    tags=["无书面作业日"],
    summary="取消学校的无书面作业日（学校管理员）",
)
async def remove_day(
    school_id: str, day: dt.date, principal: CurrentPrincipal, ctx: Ctx
) -> Response:
    await service.remove_no_written_day(ctx, principal, school_id, day)
    return Response(status_code=204)


# ---------------------------------------------------------------- actual time (HW-06)


@router.put(
    "/assignments/{assignment_id}/reports/{student_id}",
    response_model=schemas.ReportOut,
    tags=["实际用时反馈"],
    summary="学生或家长反馈实际用时（每生每作业一条，当天可改）",
)
async def report_time(
    assignment_id: str,
    student_id: str,
    body: schemas.ReportIn,
    principal: CurrentPrincipal,
    ctx: Ctx,
) -> schemas.ReportOut:
    return await service.report_time(ctx, principal, assignment_id, student_id, body.minutes)


@router.get(
    "/classes/{class_id}/actual-vs-estimated",
    response_model=schemas.CompareOut,
    tags=["实际用时反馈"],
    summary="实际用时与预计用时对比：全班、按学科、按教师",
)
async def compare(
    class_id: str, principal: CurrentPrincipal, ctx: Ctx, span: Range
) -> schemas.CompareOut:
    return await service.compare_actual(ctx, principal, class_id, span.start, span.to)


# ---------------------------------------------------------------- publicity (HW-01, HW-07)


@router.get(
    "/public/schools/{school_id}/assignments",
    response_model=schemas.PublicSchoolDay,
    tags=["公示"],
    summary="学校某日作业公示（无需登录，不含学生姓名）",
)
async def public_day(school_id: str, ctx: Ctx, date: dt.date) -> schemas.PublicSchoolDay:
    return await service.public_school_day(ctx, school_id, date)


@router.get(
    "/public/schools/{school_id}/weekly-summary",
    response_model=schemas.WeeklySummary,
    tags=["公示"],
    summary="学校每周各年级各学科作业总量与时长公示（无需登录）",
)
async def public_week(
    school_id: str,
    ctx: Ctx,
    week_of: Annotated[dt.date | None, Query(description="该周内任意一天；默认本周")] = None,
) -> schemas.WeeklySummary:
    return await service.weekly_summary(ctx, school_id, week_of or service.local_today())


@router.get(
    "/public/schools/{school_id}/no-written-homework-days",
    response_model=list[schemas.NoWrittenDayOut],
    tags=["公示"],
    summary="学校的无书面作业日（无需登录）",
)
async def public_days(school_id: str, ctx: Ctx) -> list[schemas.NoWrittenDayOut]:
    return await service.list_no_written_days(ctx, None, school_id)


# ---------------------------------------------------------------- oversight (HW-08)


@router.get(
    "/oversight/schools",
    response_model=schemas.OversightReport,
    tags=["监管"],
    summary="各校作业监管：合规率、按规则的拒绝次数、各年级日均与 P90 用时、负担预警",
)
async def oversight(
    principal: CurrentPrincipal,
    ctx: Ctx,
    span: Range,
    region_id: str | None = None,
    school_id: str | None = None,
) -> schemas.OversightReport:
    return await service.oversight_report(ctx, principal, span.start, span.to, region_id, school_id)


@router.get(
    "/oversight/alerts",
    response_model=list[schemas.AlertOut],
    tags=["监管"],
    summary="作业负担预警（进行中与已解除）",
)
async def alerts(
    principal: CurrentPrincipal,
    ctx: Ctx,
    status: Literal["open", "closed"] | None = None,
    region_id: str | None = None,
    school_id: str | None = None,
) -> list[schemas.AlertOut]:
    return await service.list_alerts(ctx, principal, status, region_id, school_id)


@router.get(
    "/oversight/estimate-gaps",
    response_model=list[schemas.EstimateGapOut],
    tags=["监管"],
    summary="预计用时明显低于反馈用时的教师",
)
async def estimate_gaps(
    principal: CurrentPrincipal,
    ctx: Ctx,
    span: Range,
    region_id: str | None = None,
    school_id: str | None = None,
    flagged_only: bool = True,
) -> list[schemas.EstimateGapOut]:
    return await service.estimate_gaps(
        ctx, principal, span.start, span.to, region_id, school_id, flagged_only
    )


@router.get(
    "/oversight/acknowledged-warnings",
    response_model=list[schemas.WarningOut],
    tags=["监管"],
    summary="教师确认内容筛查提示后发布的作业（HW-05）",
)
async def warnings(
    principal: CurrentPrincipal,
    ctx: Ctx,
    span: Range,
    region_id: str | None = None,
    school_id: str | None = None,
) -> list[schemas.WarningOut]:
    return await service.acknowledged_warnings(
        ctx, principal, span.start, span.to, region_id, school_id
    )


# ---------------------------------------------------------------- CSV exports (HW-08)

CSV_RESPONSE = {
    "response_class": Response,
    "responses": CSV_OPENAPI,
}


def _suffix(span: DateRange) -> str:
    return f"{span.start}-{span.to}"


@router.get(
    "/oversight/schools.csv",
    tags=["监管"],
    summary="导出：各校合规率、按规则拒绝次数、预警数与各年级用时（每校每年级一行）",
    **CSV_RESPONSE,
)
async def oversight_csv(
    principal: CurrentPrincipal,
    ctx: Ctx,
    span: Range,
    region_id: str | None = None,
    school_id: str | None = None,
) -> Response:
    report = await service.oversight_report(
        ctx, principal, span.start, span.to, region_id, school_id
    )
    text = render(exports.SCHOOLS_COLUMNS, exports.schools_rows(report))
    return csv_response(f"homework-oversight-{_suffix(span)}", text)


@router.get(
    "/oversight/refusals.csv",
    tags=["监管"],
    summary="导出：各校按规则的被拒次数（每校每条规则一行）",
    **CSV_RESPONSE,
)
async def refusals_csv(
    principal: CurrentPrincipal,
    ctx: Ctx,
    span: Range,
    region_id: str | None = None,
    school_id: str | None = None,
) -> Response:
    report = await service.oversight_report(
        ctx, principal, span.start, span.to, region_id, school_id
    )
    text = render(exports.REFUSALS_COLUMNS, exports.refusals_rows(report))
    return csv_response(f"homework-refusals-{_suffix(span)}", text)


@router.get(
    "/oversight/grades.csv",
    tags=["监管"],
    summary="导出：各校各年级日均与 P90 书面作业用时（预计与反馈）",
    **CSV_RESPONSE,
)
async def grades_csv(
    principal: CurrentPrincipal,
    ctx: Ctx,
    span: Range,
    region_id: str | None = None,
    school_id: str | None = None,
) -> Response:
    report = await service.oversight_report(
        ctx, principal, span.start, span.to, region_id, school_id
    )
    text = render(exports.GRADES_COLUMNS, exports.grades_rows(report))
    return csv_response(f"homework-grades-{_suffix(span)}", text)


@router.get(
    "/oversight/alerts.csv",
    tags=["监管"],
    summary="导出：作业负担预警（进行中与已解除）",
    **CSV_RESPONSE,
)
async def alerts_csv(
    principal: CurrentPrincipal,
    ctx: Ctx,
    status: Literal["open", "closed"] | None = None,
    region_id: str | None = None,
    school_id: str | None = None,
) -> Response:
    items = await service.list_alerts(ctx, principal, status, region_id, school_id)
    text = render(exports.ALERTS_COLUMNS, exports.alerts_rows(items))
    return csv_response(f"homework-alerts-{status or 'all'}", text)


@router.get(
    "/oversight/estimate-gaps.csv",
    tags=["监管"],
    summary="导出：预计用时明显低于反馈用时的教师",
    **CSV_RESPONSE,
)
async def estimate_gaps_csv(
    principal: CurrentPrincipal,
    ctx: Ctx,
    span: Range,
    region_id: str | None = None,
    school_id: str | None = None,
    flagged_only: bool = True,
) -> Response:
    items = await service.estimate_gaps(
        ctx, principal, span.start, span.to, region_id, school_id, flagged_only
    )
    text = render(exports.GAPS_COLUMNS, exports.gaps_rows(items))
    return csv_response(f"homework-estimate-gaps-{_suffix(span)}", text)


@router.get(
    "/oversight/acknowledged-warnings.csv",
    tags=["监管"],
    summary="导出：教师确认内容筛查提示后发布的作业（HW-05）",
    **CSV_RESPONSE,
)
async def warnings_csv(
    principal: CurrentPrincipal,
    ctx: Ctx,
    span: Range,
    region_id: str | None = None,
    school_id: str | None = None,
) -> Response:
    items = await service.acknowledged_warnings(
        ctx, principal, span.start, span.to, region_id, school_id
    )
    text = render(exports.WARNINGS_COLUMNS, exports.warnings_rows(items))
    return csv_response(f"homework-acknowledged-warnings-{_suffix(span)}", text)
