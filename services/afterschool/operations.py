"""afterschool use cases after enrollment: attendance and leaving (AS-06), fees
(AS-05), evaluation (AS-07) and oversight (AS-08)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import Principal
from chassis.csvexport import render_dicts
from chassis.db import Database, utcnow
from chassis.errors import FieldError, Problem, rule_violation
from chassis.messaging import emit
from chassis.policy import PolicyRegistry
from contracts import afterschool as ev
from services.afterschool import rules, schemas
from services.afterschool.access import (
    ensure,
    is_guardian,
    is_overseer,
    is_school_admin,
    is_staff,
)
from services.afterschool.models import (
    Attendance,
    Course,
    Enrollment,
    ExitRecord,
    FeeStatement,
    LeaveConsent,
    Payment,
    Plan,
    Rating,
    Survey,
    Waiver,
    roster,
)
from services.afterschool.service import BEIJING, local_today, new_id, profile_for


async def _student(session: AsyncSession, student_id: str) -> dict[str, Any] | None:
    row = (
        (await session.execute(select(roster.students).where(roster.students.c.id == student_id)))
        .mappings()
        .first()
    )
    return dict(row) if row is not None else None


def _local(ts: dt.datetime | None) -> dt.date | None:
    return None if ts is None else ts.astimezone(BEIJING).date()


# ------------------------------------------------------------ AS-06 roll call


async def _teacher_course(session: AsyncSession, principal: Principal, course_id: str) -> Course:
    """A provider teacher acts only on their own courses' roll calls."""
    course = await session.get(Course, course_id)
    ensure(
        course is not None
        and principal.person_id is not None
        and course.teacher_id == principal.person_id
        and principal.has_role("teacher", "head_teacher", "institution"),
        "课程",
    )
    assert course is not None
    return course


async def roll_call_sheet(db: Database, principal: Principal, course_id: str) -> dict[str, Any]:
    async with db.read() as session:
        course = await _teacher_course(session, principal, course_id)
        s = roster.students
        rows = (
            await session.execute(
                select(Enrollment.student_id, s.c.name)
                .join(s, s.c.id == Enrollment.student_id)
                .where(Enrollment.course_id == course.id, Enrollment.status == "held")
                .order_by(s.c.name)
            )
        ).all()
        return {
            "course_id": course.id,
            "name": course.name,
            "students": [{"student_id": r[0], "name": r[1]} for r in rows],
        }


async def roll_call(
    db: Database, principal: Principal, course_id: str, day: dt.date, data: schemas.RollCallIn
) -> list[dict[str, Any]]:
    """AS-06 在线点名: present / absent / excused per held student, one session."""
    async with db.transaction() as session:
        course = await _teacher_course(session, principal, course_id)
        plan = await session.get(Plan, course.plan_id)
        assert plan is not None
        weekday = rules.timetable_weekday(day, plan.make_up_weekdays or {})
        if day.isoformat() not in plan.service_days or weekday not in course.weekdays:
            raise rule_violation("AS-06", f"{day} 不是该课程的上课日。", date=day.isoformat())
        if day > local_today():
            raise rule_violation("AS-06", "不能为尚未到来的课次点名。", date=day.isoformat())
        ids = [m.student_id for m in data.marks]
        if len(set(ids)) != len(ids):
            raise Problem(
                422,
                "同一学生重复点名。",
                errors=[FieldError(field="body.marks", message="学生重复")],
            )
        held = set(
            (
                await session.execute(
                    select(Enrollment.student_id).where(
                        Enrollment.course_id == course.id, Enrollment.status == "held"
                    )
                )
            ).scalars()
        )
        strangers = sorted(set(ids) - held)
        if strangers:
            raise rule_violation(
                "AS-06", "点名名单中有未报名该课程的学生。", not_enrolled=strangers
            )
        existing = {
            a.student_id: a
            for a in (
                await session.execute(
                    select(Attendance).where(
                        Attendance.course_id == course.id, Attendance.day == day
                    )
                )
            ).scalars()
        }
        actor = principal.person_id or principal.subject
        for mark in data.marks:
            row = existing.get(mark.student_id)
            if row is None:
                session.add(
                    Attendance(
                        course_id=course.id,
                        school_id=course.school_id,
                        day=day,
                        student_id=mark.student_id,
                        status=mark.status,
                        recorded_by=actor,
                    )
                )
            elif row.status == mark.status:
                continue
            else:
                row.status, row.recorded_by, row.recorded_at = mark.status, actor, utcnow()
            await emit(
                session,
                ev.AttendanceRecorded(
                    course_id=course.id,
                    school_id=course.school_id,
                    student_id=mark.student_id,
                    date=day,
                    status=mark.status,
                    recorded_by=actor,
                ),
            )
        return [{"student_id": m.student_id, "status": m.status} for m in data.marks]


async def set_leave_consent(
    db: Database, principal: Principal, student_id: str, *, given: bool
) -> dict[str, Any]:
    """AS-06: a guardian's standing consent that the child may leave alone."""
    async with db.transaction() as session:
        ensure(await is_guardian(session, principal, student_id), "学生")
        consent = await session.get(LeaveConsent, student_id)
        if given:
            if consent is None:
                consent = LeaveConsent(student_id=student_id, guardian_id=principal.person_id)
                session.add(consent)
            consent.guardian_id = principal.person_id or ""
            consent.given_at, consent.revoked_at = utcnow(), None
        elif consent is not None:
            consent.revoked_at = utcnow()
        return {"student_id": student_id, "leave_alone_consent": given}


async def record_exit(
    db: Database, principal: Principal, school_id: str, data: schemas.ExitIn
) -> dict[str, Any]:
    """AS-06 进出校园管理: collected by a named guardian, alone with standing
    consent, or flexible early leave; the guardian is told by event."""
    ensure(is_staff(principal, school_id), "学校")
    async with db.transaction() as session:
        student = await _student(session, data.student_id)
        ensure(student is not None and student["school_id"] == school_id, "学生")
        if data.left_at.tzinfo is None:
            raise Problem(
                422,
                "离校时间须带时区。",
                errors=[FieldError(field="body.left_at", message="须带时区")],
            )
        if data.mode == "guardian_pickup":
            linked = (
                await session.execute(
                    select(roster.guardianships.c.guardian_id).where(
                        roster.guardianships.c.guardian_id == (data.guardian_id or ""),
                        roster.guardianships.c.student_id == data.student_id,
                    )
                )
            ).first()
            if linked is None:
                raise rule_violation("AS-06", "接学生的人不是该学生登记的监护人。")
        elif data.mode == "alone_with_consent":
            consent = await session.get(LeaveConsent, data.student_id)
            if consent is None or consent.revoked_at is not None:
                raise rule_violation("AS-06", "监护人未同意该学生自行离校，须由监护人接走。")
        record = ExitRecord(
            id=new_id(),
            school_id=school_id,
            student_id=data.student_id,
            day=data.date,
            left_at=data.left_at,
            mode=data.mode,
            guardian_id=data.guardian_id if data.mode == "guardian_pickup" else None,
            reason=data.reason,
            recorded_by=principal.person_id or principal.subject,
        )
        session.add(record)
        await emit(
            session,
            ev.StudentLeft(
                id=record.id,
                school_id=school_id,
                student_id=data.student_id,
                date=data.date,
                left_at=data.left_at,
                mode=data.mode,
                guardian_id=record.guardian_id,
            ),
        )
        return {"id": record.id, "student_id": data.student_id, "mode": data.mode}


# ------------------------------------------------------------------- AS-05 fees


async def set_waiver(
    db: Database, principal: Principal, school_id: str, data: schemas.WaiverIn
) -> dict[str, Any]:
    """AS-05 减免: the school marks a student from a family in difficulty."""
    ensure(is_school_admin(principal, school_id), "学校")
    async with db.transaction() as session:
        student = await _student(session, data.student_id)
        ensure(student is not None and student["school_id"] == school_id, "学生")
        waiver = await session.get(Waiver, (school_id, data.student_id))
        if waiver is None:
            waiver = Waiver(school_id=school_id, student_id=data.student_id)
            session.add(waiver)
        waiver.share_percent = data.share_percent
        waiver.marked_by = principal.person_id or principal.subject
        waiver.marked_at = utcnow()
        return {"student_id": data.student_id, "share_percent": data.share_percent}


def statement_out(st: FeeStatement) -> dict[str, Any]:
    return {
        "id": st.id,
        "enrollment_id": st.enrollment_id,
        "course_id": st.course_id,
        "student_id": st.student_id,
        "month": st.month,
        "planned_sessions": st.planned_sessions,
        "served_sessions": st.served_sessions,
        "gross_fen": st.gross_fen,
        "waiver_fen": st.waiver_fen,
        "amount_fen": st.amount_fen,
        "paid_fen": st.paid_fen,
        "refunded_fen": st.refunded_fen,
        "refund_fen": rules.refund_on_withdrawal(st.paid_fen - st.refunded_fen, st.amount_fen),
        "final": st.final,
    }


async def settle_month(
    db: Database, principal: Principal, plan_id: str, data: schemas.SettleIn
) -> list[dict[str, Any]]:
    """AS-05: bill a month per enrollment.

    ``final = false``: in advance, on the course's sessions of the month while
    the seat is held. ``final = true``: on the sessions actually served (roll
    call "present"); what was paid beyond that is refunded per day (e.g. after
    a withdrawal). Waivers come off the gross.
    """
    async with db.transaction() as session:
        plan = await session.get(Plan, plan_id, with_for_update=True)
        ensure(plan is not None and is_school_admin(principal, plan.school_id), "方案")
        assert plan is not None
        month_days = [dt.date.fromisoformat(d) for d in plan.service_days if d[:7] == data.month]
        waivers = {
            w.student_id: w.share_percent
            for w in (
                await session.execute(select(Waiver).where(Waiver.school_id == plan.school_id))
            ).scalars()
        }
        pairs = (
            await session.execute(
                select(Enrollment, Course)
                .join(Course, Course.id == Enrollment.course_id)
                .where(Enrollment.plan_id == plan.id, Enrollment.held_from.is_not(None))
                .order_by(Enrollment.created_at)
            )
        ).all()
        present = set(
            (
                await session.execute(
                    select(Attendance.course_id, Attendance.student_id, Attendance.day).where(
                        Attendance.school_id == plan.school_id, Attendance.status == "present"
                    )
                )
            ).all()
        )
        out = []
        for enrollment, course in pairs:
            start = _local(enrollment.held_from)
            stop = _local(enrollment.withdrawn_at)
            course_days = [
                d
                for d in month_days
                if rules.timetable_weekday(d, plan.make_up_weekdays or {}) in course.weekdays
            ]
            held_days = [
                d
                for d in course_days
                if start is not None and start <= d and (stop is None or d < stop)
            ]
            if not held_days:
                continue
            if data.final:
                served = sum(
                    1 for d in held_days if (course.id, enrollment.student_id, d) in present
                )
            else:
                served = len(held_days)
            line = rules.settle_fee(
                course.fee_fen,
                course.fee_unit,
                len(course_days),
                served,
                waivers.get(enrollment.student_id, 0),
            )
            statement = (
                await session.execute(
                    select(FeeStatement).where(
                        FeeStatement.enrollment_id == enrollment.id,
                        FeeStatement.month == data.month,
                    )
                )
            ).scalar_one_or_none()
            if statement is None:
                statement = FeeStatement(
                    id=new_id(),
                    enrollment_id=enrollment.id,
                    school_id=plan.school_id,
                    course_id=course.id,
                    student_id=enrollment.student_id,
                    month=data.month,
                    paid_fen=0,
                )
                session.add(statement)
            elif statement.final:
                out.append(statement_out(statement))
                continue
            statement.planned_sessions = len(course_days)
            statement.served_sessions = served
            statement.gross_fen = line.gross_fen
            statement.waiver_fen = line.waiver_fen
            statement.amount_fen = line.amount_fen
            statement.final = data.final
            await emit(
                session,
                ev.FeeSettled(
                    id=statement.id,
                    school_id=plan.school_id,
                    student_id=enrollment.student_id,
                    course_id=course.id,
                    month=data.month,
                    amount_fen=line.amount_fen,
                    waived=line.waiver_fen > 0,
                ),
            )
            out.append(statement_out(statement))
        return out


async def record_payment(
    session: AsyncSession, principal: Principal, statement_id: str, data: schemas.PaymentIn
) -> dict[str, Any]:
    """AS-05 收支两条线: a payment into the school's non-tax account, named by
    its reference; never more than is due, never via the institution escrow."""
    statement = await session.get(FeeStatement, statement_id, with_for_update=True)
    ensure(statement is not None and is_school_admin(principal, statement.school_id), "账单")
    assert statement is not None
    outstanding = statement.amount_fen - (statement.paid_fen - statement.refunded_fen)
    if data.amount_fen > outstanding:
        raise rule_violation(
            "AS-05",
            f"缴费金额 {data.amount_fen} 分超过应缴余额 {outstanding} 分。",
            outstanding_fen=outstanding,
        )
    payment = Payment(
        id=new_id(),
        statement_id=statement.id,
        school_id=statement.school_id,
        amount_fen=data.amount_fen,
        non_tax_account_ref=data.non_tax_account_ref,
        recorded_by=principal.person_id or principal.subject,
        paid_at=utcnow(),
    )
    session.add(payment)
    statement.paid_fen += data.amount_fen
    await emit(
        session,
        ev.FeePaid(
            id=payment.id,
            statement_id=statement.id,
            school_id=statement.school_id,
            amount_fen=data.amount_fen,
            non_tax_account_ref=data.non_tax_account_ref,
        ),
    )
    return {
        "id": payment.id,
        "statement_id": statement.id,
        "amount_fen": data.amount_fen,
        "non_tax_account_ref": data.non_tax_account_ref,
        "statement": statement_out(statement),
    }


async def student_statements(
    db: Database, principal: Principal, student_id: str
) -> list[dict[str, Any]]:
    """A child's fee statements: their guardians and the school admin only
    (a waiver is shown to no other parent)."""
    async with db.read() as session:
        student = await _student(session, student_id)
        ensure(
            student is not None
            and (
                await is_guardian(session, principal, student_id)
                or is_school_admin(principal, student["school_id"])
            ),
            "学生",
        )
        rows = (
            await session.execute(
                select(FeeStatement)
                .where(FeeStatement.student_id == student_id)
                .order_by(FeeStatement.month, FeeStatement.created_at)
            )
        ).scalars()
        return [statement_out(st) for st in rows]


# ------------------------------------------------------------- AS-07 evaluation


async def rate_course(
    db: Database, principal: Principal, course_id: str, data: schemas.RatingIn
) -> dict[str, Any]:
    """AS-07: a guardian rates a course their child attended, once a month."""
    violation = rules.check_score(data.score)
    if violation is not None:
        raise rule_violation(violation.rule, violation.detail, **violation.facts)
    try:
        async with db.transaction() as session:
            ensure(await is_guardian(session, principal, data.student_id), "学生")
            course = await session.get(Course, course_id)
            ensure(course is not None, "课程")
            assert course is not None
            attended = (
                await session.execute(
                    select(func.count()).where(
                        Attendance.course_id == course_id,
                        Attendance.student_id == data.student_id,
                        Attendance.status == "present",
                        Attendance.day >= dt.date.fromisoformat(data.month + "-01"),
                        Attendance.day < _next_month(data.month),
                    )
                )
            ).scalar_one()
            if not attended:
                raise rule_violation("AS-07", "孩子当月未参加该课程，不能评价。")
            dup = await session.execute(
                select(Rating.id).where(
                    Rating.course_id == course_id,
                    Rating.student_id == data.student_id,
                    Rating.month == data.month,
                )
            )
            if dup.first() is not None:
                raise rule_violation("AS-07", "每门课程每月只能评价一次。", status=409)
            rating = Rating(
                id=new_id(),
                course_id=course_id,
                school_id=course.school_id,
                student_id=data.student_id,
                guardian_id=principal.person_id or "",
                month=data.month,
                score=data.score,
                comment=data.comment,
            )
            session.add(rating)
            return {"id": rating.id, "course_id": course_id, "month": data.month}
    except IntegrityError:
        raise rule_violation("AS-07", "每门课程每月只能评价一次。", status=409) from None


def _next_month(month: str) -> dt.date:
    year, mon = int(month[:4]), int(month[5:])
    return dt.date(year + mon // 12, mon % 12 + 1, 1)


async def answer_survey(
    db: Database, principal: Principal, plan_id: str, data: schemas.SurveyIn
) -> dict[str, Any]:
    """AS-07: the term satisfaction survey, once per child and plan."""
    violation = rules.check_score(data.score)
    if violation is not None:
        raise rule_violation(violation.rule, violation.detail, **violation.facts)
    try:
        async with db.transaction() as session:
            ensure(await is_guardian(session, principal, data.student_id), "学生")
            plan = await session.get(Plan, plan_id)
            ensure(plan is not None, "方案")
            assert plan is not None
            served = (
                await session.execute(
                    select(func.count()).where(
                        Enrollment.plan_id == plan_id,
                        Enrollment.student_id == data.student_id,
                        Enrollment.held_from.is_not(None),
                    )
                )
            ).scalar_one()
            if not served:
                raise rule_violation("AS-07", "孩子本学期未参加课后服务，不能填写满意度调查。")
            dup = await session.execute(
                select(Survey.id).where(
                    Survey.plan_id == plan_id, Survey.student_id == data.student_id
                )
            )
            if dup.first() is not None:
                raise rule_violation("AS-07", "本学期满意度调查已填写。", status=409)
            survey = Survey(
                id=new_id(),
                plan_id=plan_id,
                school_id=plan.school_id,
                student_id=data.student_id,
                guardian_id=principal.person_id or "",
                score=data.score,
                comment=data.comment,
            )
            session.add(survey)
            return {"id": survey.id, "plan_id": plan_id}
    except IntegrityError:
        raise rule_violation("AS-07", "本学期满意度调查已填写。", status=409) from None


# -------------------------------------------------------------- AS-08 oversight

CSV_COLUMNS = (
    "school_id",
    "school_name",
    "has_plan",
    "students",
    "served",
    "served_share",
    "difficulty",
    "difficulty_served",
    "difficulty_served_share",
    "external_share",
    "satisfaction",
    "meets_target",
)


async def region_oversight(
    db: Database,
    policies: PolicyRegistry,
    principal: Principal,
    region_id: str,
    term: str,
    school_id: str | None = None,
) -> dict[str, Any]:
    """AS-08: per school and for the region; aggregates only (no child named)."""
    async with db.read() as session:
        if school_id is not None:
            school = (
                (
                    await session.execute(
                        select(roster.schools).where(roster.schools.c.id == school_id)
                    )
                )
                .mappings()
                .first()
            )
            ensure(
                school is not None
                and school["region_id"] == region_id
                and (is_school_admin(principal, school_id) or is_overseer(principal, region_id)),
                "学校",
            )
        else:
            ensure(is_overseer(principal, region_id), "区域")
        policy = profile_for(policies, region_id).afterschool
        sq = select(roster.schools).where(roster.schools.c.region_id == region_id)
        if school_id is not None:
            sq = sq.where(roster.schools.c.id == school_id)
        schools = (await session.execute(sq.order_by(roster.schools.c.name))).mappings().all()
        reports = []
        for school in schools:
            sid = school["id"]
            students = set(
                (
                    await session.execute(
                        select(roster.students.c.id).where(
                            roster.students.c.school_id == sid, roster.students.c.active.is_(True)
                        )
                    )
                ).scalars()
            )
            plan = (
                await session.execute(select(Plan).where(Plan.school_id == sid, Plan.term == term))
            ).scalar_one_or_none()
            served: set[str] = set()
            external = total = 0
            sat_sum = sat_count = 0
            if plan is not None:
                served = (
                    set(
                        (
                            await session.execute(
                                select(Enrollment.student_id).where(
                                    Enrollment.plan_id == plan.id, Enrollment.status == "held"
                                )
                            )
                        ).scalars()
                    )
                    & students
                )
                counts = (
                    await session.execute(
                        select(
                            func.count(),
                            func.count().filter(Course.provider_type == "institution"),
                        ).where(Course.plan_id == plan.id, Course.status == "active")
                    )
                ).one()
                total, external = int(counts[0]), int(counts[1])
                sat = (
                    await session.execute(
                        select(func.coalesce(func.sum(Survey.score), 0), func.count()).where(
                            Survey.plan_id == plan.id
                        )
                    )
                ).one()
                sat_sum, sat_count = int(sat[0]), int(sat[1])
            difficulty = (
                set(
                    (
                        await session.execute(
                            select(Waiver.student_id).where(Waiver.school_id == sid)
                        )
                    ).scalars()
                )
                & students
            )
            report = rules.school_report(
                policy,
                rules.SchoolFigures(
                    school_id=sid,
                    has_plan=plan is not None,
                    students=len(students),
                    served=len(served),
                    difficulty=len(difficulty),
                    difficulty_served=len(difficulty & served),
                    external_courses=external,
                    courses=total,
                    satisfaction_sum=sat_sum,
                    satisfaction_count=sat_count,
                ),
            )
            reports.append({"school_name": school["name"], **report.__dict__})
        all_students = sum(r["students"] for r in reports)
        all_served = sum(r["served"] for r in reports)
        with_plan = sum(1 for r in reports if r["has_plan"])
        return {
            "region_id": region_id,
            "term": term,
            "target": str(policy.served_share_target),
            "schools": len(reports),
            "schools_with_plan": with_plan,
            "coverage": str(rules.share(with_plan, len(reports))),
            "students": all_students,
            "served": all_served,
            "served_share": str(rules.share(all_served, all_students)),
            "below_target": [
                {"school_id": r["school_id"], "school_name": r["school_name"]}
                for r in reports
                if not r["meets_target"]
            ],
            "by_school": [
                {
                    k: (str(v) if not isinstance(v, bool | int | str | None) else v)
                    for k, v in r.items()
                }
                for r in reports
            ],
        }


def oversight_csv(report: dict[str, Any]) -> str:
    return render_dicts(CSV_COLUMNS, report["by_school"])
