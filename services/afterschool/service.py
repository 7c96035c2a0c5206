"""afterschool use cases: one transaction each, rows + outbox events."""

from __future__ import annotations

import datetime as dt
import secrets
import time
import uuid
from collections.abc import Sequence
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import Principal
from chassis.calendar import (
    Calendar,
    HolidayArrangement,
    SchoolTerms,
    load_holiday_files,
    load_school_terms,
    today_in_china,
)
from chassis.db import Database, utcnow
from chassis.errors import FieldError, Problem, conflict, rule_violation
from chassis.messaging import emit
from chassis.policy import PolicyProfile, PolicyRegistry
from chassis.privacy import mask_name
from contracts import afterschool as ev
from services.afterschool import rules, schemas
from services.afterschool.access import (
    can_view_school,
    ensure,
    is_guardian,
    is_school_admin,
    is_staff,
    teaches_student,
)
from services.afterschool.models import (
    ACTIVE_STATUSES,
    CatalogInstitution,
    Course,
    Enrollment,
    FeeStatement,
    LotteryDraw,
    Payment,
    Plan,
    Refund,
    Waiver,
    roster,
)

BEIJING = ZoneInfo("Asia/Shanghai")


def new_id() -> str:
    return str(uuid.uuid4())


def local_today() -> dt.date:
    return today_in_china()


def _raise(violation: rules.Violation | None, status: int = 422) -> None:
    if violation is not None:
        raise rule_violation(violation.rule, violation.detail, status=status, **violation.facts)


# ------------------------------------------------------------------ calendar


@lru_cache(maxsize=1)
def _file_holidays() -> tuple[HolidayArrangement, ...]:
    return load_holiday_files()


@lru_cache(maxsize=1)
def _file_terms() -> dict[str, SchoolTerms]:
    return load_school_terms()


def terms_for(policies: PolicyRegistry, region_id: str) -> SchoolTerms | None:
    """The region's school terms, else the nearest ancestor profile's (X-05)."""
    all_terms = _file_terms()
    lineage = policies.lineage(region_id) if region_id in policies else ("national",)
    for pid in reversed(lineage):
        if pid in all_terms:
            return all_terms[pid]
    return None


async def calendar_for(session: AsyncSession, policies: PolicyRegistry, region_id: str) -> Calendar:
    """Operator-loaded holidays (identity's events) first, the shipped files for
    other years, and the region's terms."""
    rows = (await session.execute(select(roster.holidays))).mappings().all()
    by_year: dict[int, dict[str, list[Any]]] = {}
    for row in rows:
        entry = by_year.setdefault(row["year"], {"holidays": [], "workday_swaps": []})
        if row["is_workday_swap"]:
            entry["workday_swaps"].append(row["day"])
        else:
            entry["holidays"].append({"date": row["day"], "name": row["name"] or ""})
    arrangements = [
        HolidayArrangement.model_validate({"year": year, **entry})
        for year, entry in sorted(by_year.items())
    ]
    arrangements += [a for a in _file_holidays() if a.year not in by_year]
    return Calendar(arrangements, terms_for(policies, region_id))


def profile_for(
    policies: PolicyRegistry, region_id: str, on: dt.date | None = None
) -> PolicyProfile:
    return policies.profile(region_id if region_id in policies else "national", on=on)


# --------------------------------------------------------------------- plans


async def _school(session: AsyncSession, school_id: str) -> dict[str, Any]:
    row = (
        (await session.execute(select(roster.schools).where(roster.schools.c.id == school_id)))
        .mappings()
        .first()
    )
    if row is None:
        raise Problem(404, "学校不存在。")
    return dict(row)


def _sessions(plan: Plan) -> list[rules.Session]:
    return [
        rules.Session(s["kind"], dt.time.fromisoformat(s["start"]), dt.time.fromisoformat(s["end"]))
        for s in plan.sessions
    ]


def plan_out(plan: Plan) -> schemas.PlanOut:
    sessions = _sessions(plan)
    return schemas.PlanOut(
        id=plan.id,
        school_id=plan.school_id,
        region_id=plan.region_id,
        term=plan.term,
        stage=plan.stage,
        sessions=[schemas.SessionIn(kind=s.kind, start=s.start, end=s.end) for s in sessions],  # type: ignore[arg-type]
        service_days=[dt.date.fromisoformat(d) for d in plan.service_days],
        service_day_count=len(plan.service_days),
        daily_minutes=rules.daily_minutes(sessions),
        delayed_care_students=len(plan.delayed_care_student_ids),
        fee_standard_fen=plan.fee_standard_fen,
        fee_unit=plan.fee_unit,
        window_opens_at=plan.window_opens_at,
        window_closes_at=plan.window_closes_at,
        window_mode=plan.window_mode,
        lottery_seed_hash=plan.lottery_seed_hash,
        lottery_seed=plan.lottery_seed if plan.lottery_drawn_at else None,
        lottery_drawn_at=plan.lottery_drawn_at,
        make_up_weekdays=dict(plan.make_up_weekdays or {}),
    )


async def create_plan(
    db: Database,
    policies: PolicyRegistry,
    principal: Principal,
    school_id: str,
    data: schemas.PlanIn,
) -> schemas.PlanOut:
    """AS-01 一校一案: validate sessions against the profile, compute service days."""
    ensure(is_school_admin(principal, school_id), "学校")
    async with db.transaction() as session:
        school = await _school(session, school_id)
        stage = data.stage
        if school["stage"] in ("primary", "junior"):
            if stage is not None and stage != school["stage"]:
                raise Problem(
                    422,
                    "学段与学校不符。",
                    errors=[FieldError(field="body.stage", message="学段与学校不符")],
                )
            stage = school["stage"]
        elif stage is None:
            raise Problem(
                422,
                "九年一贯制学校须指明方案的学段（primary 或 junior）。",
                errors=[FieldError(field="body.stage", message="须指明学段")],
            )
        calendar = await calendar_for(session, policies, school["region_id"])
        term = next(
            (t for t in (calendar.terms.terms if calendar.terms else ()) if t.name == data.term),
            None,
        )
        if term is None:
            raise Problem(
                422,
                f"本地区校历中没有学期“{data.term}”。",
                errors=[FieldError(field="body.term", message="未知学期")],
            )
        profile = profile_for(policies, school["region_id"], term.start)
        sessions = [rules.Session(s.kind, s.start, s.end) for s in data.sessions]
        _raise(rules.check_sessions(profile.afterschool, stage, sessions))
        days = rules.service_days(calendar, term.start, term.end, profile.afterschool)
        if not days:
            _raise(rules.Violation("AS-01", "该学期没有可提供课后服务的日子。"))
        make_up_days = [
            d for d in days if d.isoweekday() not in profile.afterschool.service_weekdays
        ]
        unknown = sorted(set(data.make_up_weekdays) - set(make_up_days))
        bad = [w for w in data.make_up_weekdays.values() if not 1 <= w <= 5]
        if unknown or bad:
            raise Problem(
                422,
                "make_up_weekdays 只能为本学期的调休上班日指定周一至周五的课表。",
                errors=[
                    FieldError(field="body.make_up_weekdays", message="不是调休上班日或星期无效")
                ],
            )
        make_up = {
            d.isoformat(): rules.make_up_weekday(calendar, d, data.make_up_weekdays.get(d))
            for d in make_up_days
        }
        if data.delayed_care_student_ids:
            wanted = set(data.delayed_care_student_ids)
            found = set(
                (
                    await session.execute(
                        select(roster.students.c.id).where(
                            roster.students.c.id.in_(wanted),
                            roster.students.c.school_id == school_id,
                        )
                    )
                ).scalars()
            )
            if found != wanted:
                raise Problem(
                    422,
                    "延时托管名单中有不属于本校的学生。",
                    errors=[
                        FieldError(field="body.delayed_care_student_ids", message="学生不存在")
                    ],
                )
        exists = await session.execute(
            select(Plan.id).where(Plan.school_id == school_id, Plan.term == data.term)
        )
        if exists.first() is not None:
            raise conflict("本校该学期的课后服务方案已存在。")
        plan = Plan(
            id=new_id(),
            school_id=school_id,
            region_id=school["region_id"],
            term=data.term,
            stage=stage,
            sessions=[
                {
                    "kind": s.kind,
                    "start": s.start.isoformat("minutes"),
                    "end": s.end.isoformat("minutes"),
                }
                for s in sessions
            ],
            service_days=[d.isoformat() for d in days],
            service_weekdays=list(profile.afterschool.service_weekdays),
            delayed_care_student_ids=sorted(set(data.delayed_care_student_ids)),
            make_up_weekdays=make_up,
            fee_standard_fen=data.fee_standard_fen,
            fee_unit=data.fee_unit,
        )
        session.add(plan)
        await emit(
            session,
            ev.PlanPublished(
                id=plan.id,
                school_id=school_id,
                region_id=plan.region_id,
                term=plan.term,
                service_days=len(days),
                first_day=days[0],
                last_day=days[-1],
                daily_minutes=rules.daily_minutes(sessions),
                end_time=rules.end_time(sessions),
            ),
        )
        return plan_out(plan)


async def load_plan(session: AsyncSession, principal: Principal, plan_id: str) -> Plan:
    plan = await session.get(Plan, plan_id)
    ensure(
        plan is not None
        and await can_view_school(session, principal, plan.school_id, plan.region_id),
        "方案",
    )
    assert plan is not None
    return plan


async def _admin_plan(
    session: AsyncSession, principal: Principal, plan_id: str, *, lock: bool = False
) -> Plan:
    query = select(Plan).where(Plan.id == plan_id)
    if lock:
        query = query.with_for_update()
    plan = (await session.execute(query)).scalar_one_or_none()
    ensure(plan is not None and is_school_admin(principal, plan.school_id), "方案")
    assert plan is not None
    return plan


async def list_plans(db: Database, principal: Principal, school_id: str) -> list[schemas.PlanOut]:
    async with db.read() as session:
        school = await _school(session, school_id)
        ensure(await can_view_school(session, principal, school_id, school["region_id"]), "学校")
        plans = (
            await session.execute(
                select(Plan).where(Plan.school_id == school_id).order_by(Plan.created_at)
            )
        ).scalars()
        return [plan_out(p) for p in plans]


# -------------------------------------------------------------------- courses


def course_out(c: Course) -> schemas.CourseOut:
    return schemas.CourseOut(
        id=c.id,
        plan_id=c.plan_id,
        school_id=c.school_id,
        name=c.name,
        kind=c.kind,
        weekdays=list(c.weekdays),
        start=c.start,
        end=c.end,
        capacity=c.capacity,
        seats_taken=c.seats_taken,
        seats_left=max(0, c.capacity - c.seats_taken),
        provider_type=c.provider_type,
        provider_name=c.provider_name,
        institution_id=c.institution_id,
        teacher_id=c.teacher_id,
        fee_fen=c.fee_fen,
        fee_unit=c.fee_unit,
        status=c.status,
        flag_reason=c.flag_reason,
    )


async def catalog_entry(session: AsyncSession, institution_id: str) -> dict[str, Any] | None:
    row = await session.get(CatalogInstitution, institution_id)
    if row is None:
        return None
    return {
        "category": row.category,
        "can_enroll": row.can_enroll,
        "blacklisted": row.blacklisted,
        "status": row.status,
        "region_id": row.region_id,
        "licence_valid_until": row.licence_valid_until,
    }


async def add_course(
    db: Database,
    policies: PolicyRegistry,
    principal: Principal,
    plan_id: str,
    data: schemas.CourseIn,
) -> schemas.CourseOut:
    """AS-02 menu, AS-03 providers and external share, AS-05 fee standard."""
    async with db.transaction() as session:
        plan = await _admin_plan(session, principal, plan_id, lock=True)
        profile = profile_for(policies, plan.region_id)
        _raise(rules.check_course_kind(data.kind))
        _raise(
            rules.slot_within_plan(
                _sessions(plan), data.weekdays, profile.afterschool, data.start, data.end
            )
        )
        if data.provider_type == "institution":
            if not data.institution_id:
                raise Problem(
                    422,
                    "机构提供的课程须指明机构。",
                    errors=[FieldError(field="body.institution_id", message="必填")],
                )
            entry = await catalog_entry(session, data.institution_id)
            if entry is not None and entry["region_id"] != plan.region_id:
                entry = None
            _raise(rules.check_institution_provider(entry, local_today()))
        elif data.institution_id:
            raise Problem(
                422,
                "只有机构提供的课程可以指明机构。",
                errors=[FieldError(field="body.institution_id", message="不适用")],
            )
        if data.provider_type == "own_teacher":
            teacher = None
            if data.teacher_id:
                teacher = (
                    await session.execute(
                        select(roster.teachers.c.id).where(
                            roster.teachers.c.id == data.teacher_id,
                            roster.teachers.c.school_id == plan.school_id,
                        )
                    )
                ).first()
            if teacher is None:
                raise Problem(
                    422,
                    "本校教师授课须指明本校在册教师。",
                    errors=[FieldError(field="body.teacher_id", message="不是本校教师")],
                )
        counts = (
            await session.execute(
                select(
                    func.count(),
                    func.count().filter(Course.provider_type == "institution"),
                ).where(Course.plan_id == plan.id, Course.status == "active")
            )
        ).one()
        total, external = int(counts[0]) + 1, int(counts[1])
        if data.provider_type == "institution":
            external += 1
        _raise(rules.check_external_share(profile.afterschool, external, total))
        _raise(rules.check_fee(plan.fee_standard_fen, plan.fee_unit, data.fee_fen, data.fee_unit))
        course = Course(
            id=new_id(),
            plan_id=plan.id,
            school_id=plan.school_id,
            name=data.name,
            kind=data.kind,
            weekdays=sorted(set(data.weekdays)),
            start=data.start,
            end=data.end,
            capacity=data.capacity,
            seats_taken=0,
            waitlist_seq=0,
            provider_type=data.provider_type,
            provider_name=data.provider_name,
            institution_id=data.institution_id,
            teacher_id=data.teacher_id,
            fee_fen=data.fee_fen,
            fee_unit=data.fee_unit,
            status="active",
        )
        session.add(course)
        return course_out(course)


async def list_courses(db: Database, principal: Principal, plan_id: str) -> list[schemas.CourseOut]:
    async with db.read() as session:
        plan = await load_plan(session, principal, plan_id)
        courses = (
            await session.execute(
                select(Course)
                .where(Course.plan_id == plan.id)
                .order_by(Course.created_at, Course.id)
            )
        ).scalars()
        return [course_out(c) for c in courses]


async def get_course(db: Database, principal: Principal, course_id: str) -> schemas.CourseOut:
    async with db.read() as session:
        course = await session.get(Course, course_id)
        ensure(course is not None, "课程")
        assert course is not None
        await load_plan(session, principal, course.plan_id)
        return course_out(course)


# --------------------------------------------------------------------- window


async def open_window(
    db: Database,
    policies: PolicyRegistry,
    principal: Principal,
    plan_id: str,
    data: schemas.WindowIn,
) -> schemas.PlanOut:
    """AS-04: the school's enrollment window (first come or lottery); the menu
    must satisfy AS-02 "1+1" and the AS-03 external share before it opens."""
    if data.closes_at <= data.opens_at:
        raise Problem(
            422,
            "报名截止时间须晚于开始时间。",
            errors=[FieldError(field="body.closes_at", message="须晚于 opens_at")],
        )
    if data.opens_at.tzinfo is None or data.closes_at.tzinfo is None:
        raise Problem(
            422,
            "报名时间须带时区。",
            errors=[FieldError(field="body.opens_at", message="须带时区")],
        )
    async with db.transaction() as session:
        plan = await _admin_plan(session, principal, plan_id, lock=True)
        started = await session.execute(
            select(Enrollment.id).where(Enrollment.plan_id == plan.id).limit(1)
        )
        if started.first() is not None:
            raise conflict("已有家长报名，报名窗口不能再更改。")
        profile = profile_for(policies, plan.region_id)
        courses = list(
            (
                await session.execute(
                    select(Course).where(Course.plan_id == plan.id, Course.status == "active")
                )
            ).scalars()
        )
        if not courses:
            _raise(rules.Violation("AS-02", "课程菜单为空，不能开放报名。"))
        _raise(
            rules.check_interest_daily(profile.afterschool, [(c.kind, c.weekdays) for c in courses])
        )
        external = sum(1 for c in courses if c.provider_type == "institution")
        _raise(rules.check_external_share(profile.afterschool, external, len(courses)))
        plan.window_opens_at = data.opens_at
        plan.window_closes_at = data.closes_at
        plan.window_mode = data.mode
        if data.mode == "lottery":
            seed = data.seed or secrets.token_hex(16)
            plan.lottery_seed = seed
            plan.lottery_seed_hash = rules.seed_hash(seed)
        else:
            plan.lottery_seed = None
            plan.lottery_seed_hash = None
        forget_sold_out()
        out = plan_out(plan)
    forget_sold_out()  # again after commit: no "full" remembered from the old window
    return out


# ----------------------------------------------------------------- enrollment

#: Courses this process saw full: course id -> monotonic time it was seen.
#: Only routes parents who do not want the waitlist to the sold-out read
#: (services/afterschool/rush.py), which answers "full" from the committed
#: course, never from this memory; cleared when this process frees a seat,
#: flags the course or changes a window, renewed by every read that tells
#: someone "full", and trusted for SOLD_OUT_TTL seconds at most.
_sold_out: dict[str, float] = {}
#: Bumped whenever this process frees a seat of the course: a decision that
#: read the course before the bump may not mark it full afterwards.
_freed: dict[str, int] = {}
_epoch = [0]  # bumped when every mark is dropped (a window changed)
SOLD_OUT_TTL = 1.0


def seat_freed(course_id: str) -> None:
    _freed[course_id] = _freed.get(course_id, 0) + 1
    _sold_out.pop(course_id, None)


def forget_sold_out() -> None:
    """Drop every mark (and let no decision read before now set one again)."""
    _epoch[0] += 1
    _sold_out.clear()


def sold_out_generation(course_id: str) -> tuple[int, int]:
    return _epoch[0], _freed.get(course_id, 0)


def mark_sold_out(course_id: str, generation: tuple[int, int]) -> None:
    if sold_out_generation(course_id) == generation:
        _sold_out[course_id] = time.monotonic()


def forget_sold_out_course(course_id: str) -> None:
    """Drop one course's mark (a read found a seat free)."""
    _sold_out.pop(course_id, None)


def is_sold_out(course_id: str, now: float) -> bool:
    seen = _sold_out.get(course_id)
    return seen is not None and now - seen < SOLD_OUT_TTL


def enrollment_out(e: Enrollment) -> schemas.EnrollmentOut:
    return schemas.EnrollmentOut(
        id=e.id,
        course_id=e.course_id,
        student_id=e.student_id,
        status=e.status,
        waitlist_position=e.waitlist_position,
        consent_at=e.consent_at,
        created_at=e.created_at,
    )


def _changed(e: Enrollment, previous: str | None) -> ev.EnrollmentChanged:
    return ev.EnrollmentChanged(
        id=e.id,
        course_id=e.course_id,
        school_id=e.school_id,
        student_id=e.student_id,
        status=e.status,  # type: ignore[arg-type]
        previous_status=previous,  # type: ignore[arg-type]
        waitlist_position=e.waitlist_position,
        occurred_at=utcnow(),
    )


async def _lock_student(session: AsyncSession, student_id: str) -> dict[str, Any] | None:
    """Row lock on the student's roster copy: a student's enrollments are
    decided one at a time (no duplicate, no clash), whatever the concurrency."""
    row = (
        (
            await session.execute(
                select(roster.students).where(roster.students.c.id == student_id).with_for_update()
            )
        )
        .mappings()
        .first()
    )
    return dict(row) if row is not None else None


async def _lock_own_child(
    session: AsyncSession, principal: Principal, student_id: str
) -> dict[str, Any] | None:
    """The caller's own child, locked as in ``_lock_student`` (one statement)."""
    if not principal.has_role("parent") or not principal.person_id:
        return None
    s, g = roster.students, roster.guardianships
    row = (
        (
            await session.execute(
                select(s)
                .join(g, g.c.student_id == s.c.id)
                .where(s.c.id == student_id, g.c.guardian_id == principal.person_id)
                .with_for_update(of=s)
            )
        )
        .mappings()
        .first()
    )
    return dict(row) if row is not None else None


def check_attempt(
    school_id: str, course: Any, data: schemas.EnrollIn, mine: Sequence[Any], now: dt.datetime
) -> None:
    """AS-04/AS-03: why an enrollment attempt is refused before any seat is
    looked at (the same checks, in the same order, for one attempt and for a
    batch). ``course`` carries the course's and its plan's window columns;
    ``mine`` the student's live enrollments (with their courses' slots)."""
    if course is None or course.school_id != school_id:
        raise Problem(404, "课程不存在。")
    if not data.consent:
        raise rule_violation("AS-04", "参加课后服务须由监护人明确表示自愿同意（不得“被自愿”）。")
    state = rules.window_state(now, course.window_opens_at, course.window_closes_at)
    if state != "open":
        detail = {
            "unset": "学校尚未开放报名。",
            "before": "报名尚未开始。",
            "closed": "报名已截止。",
        }[state]
        raise rule_violation("AS-04", detail, status=409, window=state)
    if course.status != "active":
        raise rule_violation("AS-03", "该课程的提供机构已移出目录，课程已暂停报名。", status=409)
    for other in mine:
        if other.course_id == data.course_id:
            raise rule_violation(
                "AS-04",
                "该学生已报名此课程。",
                status=409,
                enrollment_id=other.id,
                enrollment_status=other.status,
            )
    for other in mine:
        if rules.slots_clash(
            (other.weekdays, other.start, other.end), (course.weekdays, course.start, course.end)
        ):
            raise rule_violation(
                "AS-04",
                f"与已报名的课程“{other.name}”时间冲突：同一时段只能选一门课程。",
                status=409,
                clashes_with=other.course_id,
            )


def full() -> Problem:
    return rule_violation("AS-04", "该课程已报满。", status=409, full=True)


#: The course columns (with its plan's window) an enrollment decision reads.
COURSE_FOR_ENROLLMENT = (
    Course.school_id,
    Course.plan_id,
    Course.status,
    Course.weekdays,
    Course.start,
    Course.end,
    Course.capacity,
    Course.seats_taken,
    Course.waitlist_seq,
    Plan.window_mode,
    Plan.window_opens_at,
    Plan.window_closes_at,
)


async def enroll(
    session: AsyncSession,
    principal: Principal,
    data: schemas.EnrollIn,
    *,
    join_waitlist: bool = True,
) -> schemas.EnrollmentOut:
    """AS-04: a guardian enrolls their own child, with consent, in the window.

    The seat is taken by an atomic conditional UPDATE (``seats_taken <
    capacity``) in the same transaction that inserts the held enrollment, so
    at every committed instant seats taken = enrollments held. (Core
    statements on this hot path: the ORM's unit of work is not needed here.)
    """
    student = await _lock_own_child(session, principal, data.student_id)
    if student is None or not student["active"]:
        raise Problem(404, "学生不存在。")
    course = (
        await session.execute(
            select(
                Course.school_id,
                Course.plan_id,
                Course.status,
                Course.weekdays,
                Course.start,
                Course.end,
                Plan.window_mode,
                Plan.window_opens_at,
                Plan.window_closes_at,
            )
            .join(Plan, Plan.id == Course.plan_id)
            .where(Course.id == data.course_id)
        )
    ).first()
    # The student's rows by its own index, live ones kept here (a status
    # filter in SQL can pick a scan of the partial index uq_enrollments_live
    # on a table grown since its last ANALYZE; rush.decide does the same).
    mine = [
        row
        for row in await session.execute(
            select(
                Enrollment.id,
                Enrollment.course_id,
                Enrollment.status,
                Course.name,
                Course.weekdays,
                Course.start,
                Course.end,
            )
            .join(Course, Course.id == Enrollment.course_id)
            .where(Enrollment.student_id == data.student_id)
        )
        if row.status in ACTIVE_STATUSES
    ]
    check_attempt(student["school_id"], course, data, mine, utcnow())
    now = utcnow()
    position: int | None = None
    held_from: dt.datetime | None = None
    if course.window_mode == "lottery":
        status = "applied"
    else:
        taken = await session.execute(
            update(Course)
            .where(
                Course.id == data.course_id,
                Course.seats_taken < Course.capacity,
                Course.status == "active",
            )
            .values(seats_taken=Course.seats_taken + 1)
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            status, held_from = "held", now
        elif not join_waitlist:
            raise full()
        else:
            position = int(
                (
                    await session.execute(
                        update(Course)
                        .where(Course.id == data.course_id)
                        .values(waitlist_seq=Course.waitlist_seq + 1)
                        .returning(Course.waitlist_seq)
                        .execution_options(synchronize_session=False)
                    )
                ).scalar_one()
            )
            status = "waitlisted"
    enrollment_id = new_id()
    await session.execute(
        insert(Enrollment).values(
            id=enrollment_id,
            course_id=data.course_id,
            plan_id=course.plan_id,
            school_id=course.school_id,
            student_id=data.student_id,
            guardian_id=principal.person_id or "",
            status=status,
            waitlist_position=position,
            consent_at=now,
            consent_statement=data.consent_statement,
            created_at=now,
            held_from=held_from,
        )
    )
    await emit(
        session,
        ev.EnrollmentChanged(
            id=enrollment_id,
            course_id=data.course_id,
            school_id=course.school_id,
            student_id=data.student_id,
            status=status,  # type: ignore[arg-type]
            waitlist_position=position,
            occurred_at=now,
        ),
    )
    return schemas.EnrollmentOut(
        id=enrollment_id,
        course_id=data.course_id,
        student_id=data.student_id,
        status=status,
        waitlist_position=position,
        consent_at=now,
        created_at=now,
    )


async def _promote(session: AsyncSession, course: Course) -> Enrollment | None:
    """Give a freed seat to the first on the FIFO waitlist (AS-04)."""
    candidates = (
        await session.execute(
            select(Enrollment.id)
            .where(Enrollment.course_id == course.id, Enrollment.status == "waitlisted")
            .order_by(Enrollment.waitlist_position)
            .limit(5)
        )
    ).scalars()
    for candidate in list(candidates):
        now = utcnow()
        done = await session.execute(
            update(Enrollment)
            .where(Enrollment.id == candidate, Enrollment.status == "waitlisted")
            .values(status="held", held_from=now)
            .execution_options(synchronize_session=False)
        )
        if done.rowcount == 1:  # type: ignore[attr-defined]
            promoted = await session.get(Enrollment, candidate, populate_existing=True)
            assert promoted is not None
            await emit(session, _changed(promoted, "waitlisted"))
            return promoted
    return None


async def end_seat(
    session: AsyncSession, enrollment_id: str, *, reason: str = "withdrawn"
) -> tuple[Enrollment, str] | None:
    """AS-04/AS-05: end a live enrollment (the caller holds the student's row
    lock): a held seat goes to the waitlist's head or back to the course, fees
    paid for days not served are refunded per day with a record. None when the
    enrollment was no longer live (so a replay changes nothing)."""
    enrollment = await session.get(Enrollment, enrollment_id, populate_existing=True)
    assert enrollment is not None
    previous = enrollment.status
    if previous not in ACTIVE_STATUSES:
        return None
    now = utcnow()
    if previous == "held":
        course = (
            await session.execute(
                select(Course).where(Course.id == enrollment.course_id).with_for_update()
            )
        ).scalar_one()
    done = await session.execute(
        update(Enrollment)
        .where(Enrollment.id == enrollment.id, Enrollment.status == previous)
        .values(status="withdrawn", withdrawn_at=now)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        raise conflict("报名状态已变化，请刷新后重试。")
    if previous == "held":
        # No one is moved into a course whose provider left the catalog (AS-03).
        promoted = await _promote(session, course) if course.status == "active" else None
        if promoted is None:
            await session.execute(
                update(Course)
                .where(Course.id == course.id)
                .values(seats_taken=Course.seats_taken - 1)
                .execution_options(synchronize_session=False)
            )
            seat_freed(course.id)
    enrollment = await session.get(Enrollment, enrollment_id, populate_existing=True)
    assert enrollment is not None
    if enrollment.held_from is not None:
        await _refund_unserved(session, enrollment, reason)
    await emit(session, _changed(enrollment, previous))
    return enrollment, previous


async def _refund_unserved(session: AsyncSession, enrollment: Enrollment, reason: str) -> None:
    """AS-05 per-day refund: each not yet final statement of the enrollment is
    re-billed on the days held before the seat ended; what was paid beyond
    that goes back, recorded with the non-tax account it was paid into."""
    statements = list(
        (
            await session.execute(
                select(FeeStatement)
                .where(FeeStatement.enrollment_id == enrollment.id, FeeStatement.final.is_(False))
                .order_by(FeeStatement.month)
                .with_for_update()
            )
        ).scalars()
    )
    if not statements:
        return
    plan = await session.get(Plan, enrollment.plan_id)
    course = await session.get(Course, enrollment.course_id)
    assert plan is not None and course is not None
    waiver = await session.get(Waiver, (enrollment.school_id, enrollment.student_id))
    start = enrollment.held_from.astimezone(BEIJING).date() if enrollment.held_from else None
    stop = enrollment.withdrawn_at.astimezone(BEIJING).date() if enrollment.withdrawn_at else None
    make_up = plan.make_up_weekdays or {}
    for st in statements:
        course_days = [
            d
            for d in (dt.date.fromisoformat(x) for x in plan.service_days if x[:7] == st.month)
            if rules.timetable_weekday(d, make_up) in course.weekdays
        ]
        held_days = [
            d
            for d in course_days
            if start is not None and start <= d and (stop is None or d < stop)
        ]
        line = rules.settle_fee(
            course.fee_fen,
            course.fee_unit,
            len(course_days),
            len(held_days),
            waiver.share_percent if waiver else 0,
        )
        unserved = max(0, st.served_sessions - len(held_days))
        st.served_sessions = len(held_days)
        st.gross_fen, st.waiver_fen, st.amount_fen = (
            line.gross_fen,
            line.waiver_fen,
            line.amount_fen,
        )
        amount = rules.refund_on_withdrawal(st.paid_fen - st.refunded_fen, st.amount_fen)
        if amount <= 0:
            continue
        account = (
            await session.execute(
                select(Payment.non_tax_account_ref)
                .where(Payment.statement_id == st.id)
                .order_by(Payment.paid_at.desc())
                .limit(1)
            )
        ).scalar_one()
        st.refunded_fen += amount
        session.add(
            Refund(
                id=new_id(),
                enrollment_id=enrollment.id,
                statement_id=st.id,
                school_id=st.school_id,
                course_id=st.course_id,
                student_id=st.student_id,
                month=st.month,
                days=unserved,
                amount_fen=amount,
                non_tax_account_ref=account,
                reason=reason,
                created_at=utcnow(),
            )
        )


async def withdraw(db: Database, principal: Principal, enrollment_id: str) -> schemas.EnrollmentOut:
    """AS-04: a guardian withdraws; a held seat goes to the waitlist's head or back."""
    async with db.transaction() as session:
        found = await session.get(Enrollment, enrollment_id)
        ensure(
            found is not None and await is_guardian(session, principal, found.student_id),
            "报名记录",
        )
        assert found is not None
        await _lock_student(session, found.student_id)
        ended = await end_seat(session, enrollment_id)
        if ended is None:
            raise conflict("该报名已退出。")
        out = enrollment_out(ended[0])
    seat_freed(out.course_id)  # again after commit: no stale "full" here
    return out


async def student_left(session: AsyncSession, student_id: str, school_id: str, active: bool) -> int:
    """AS-04: a student who leaves the school (roster: inactive, or now at
    another school) gives up every live enrollment at the old school — seats
    freed to the waitlist, fees refunded per day — in the roster event's own
    transaction. Idempotent: a redelivery finds nothing live. Returns how
    many enrollments ended."""
    if active:
        condition = Enrollment.school_id != school_id
    else:
        condition = Enrollment.school_id.is_not(None)
    await _lock_student(session, student_id)
    ids = list(
        (
            await session.execute(
                select(Enrollment.id)
                .where(
                    Enrollment.student_id == student_id,
                    Enrollment.status.in_(ACTIVE_STATUSES),
                    condition,
                )
                .order_by(Enrollment.course_id)
            )
        ).scalars()
    )
    ended = 0
    for enrollment_id in ids:
        if await end_seat(session, enrollment_id, reason="left_school") is not None:
            ended += 1
    return ended


def refund_out(r: Refund) -> dict[str, Any]:
    return {
        "id": r.id,
        "enrollment_id": r.enrollment_id,
        "statement_id": r.statement_id,
        "course_id": r.course_id,
        "student_id": r.student_id,
        "month": r.month,
        "days": r.days,
        "amount_fen": r.amount_fen,
        "non_tax_account_ref": r.non_tax_account_ref,
        "reason": r.reason,
        "created_at": r.created_at,
    }


async def student_refunds(
    db: Database, principal: Principal, student_id: str
) -> list[dict[str, Any]]:
    """AS-05: a child's refunds, for their guardians and the school admin."""
    async with db.read() as session:
        student = (
            (
                await session.execute(
                    select(roster.students).where(roster.students.c.id == student_id)
                )
            )
            .mappings()
            .first()
        )
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
                select(Refund).where(Refund.student_id == student_id).order_by(Refund.created_at)
            )
        ).scalars()
        return [refund_out(r) for r in rows]


async def school_refunds(
    db: Database, principal: Principal, school_id: str
) -> list[dict[str, Any]]:
    """AS-05: the school's refund ledger (its non-tax account's outgoings)."""
    ensure(is_school_admin(principal, school_id), "学校")
    async with db.read() as session:
        rows = (
            await session.execute(
                select(Refund).where(Refund.school_id == school_id).order_by(Refund.created_at)
            )
        ).scalars()
        return [refund_out(r) for r in rows]


async def reapprove_course(
    db: Database, policies: PolicyRegistry, principal: Principal, course_id: str
) -> schemas.CourseOut:
    """AS-03: a course flagged when its institution left the catalog stays
    flagged after the institution is reinstated, until the school re-approves
    it here — and only while the institution is back in the catalog and the
    external share still holds. Seats freed while it was flagged go to its
    waitlist, in order."""
    async with db.transaction() as session:
        course = (
            await session.execute(select(Course).where(Course.id == course_id).with_for_update())
        ).scalar_one_or_none()
        ensure(course is not None and is_school_admin(principal, course.school_id), "课程")
        assert course is not None
        if course.status != "flagged":
            raise conflict("该课程未被暂停，无需重新批准。")
        plan = await _admin_plan(session, principal, course.plan_id, lock=True)
        entry = (
            await catalog_entry(session, course.institution_id) if course.institution_id else None
        )
        if entry is not None and entry["region_id"] != plan.region_id:
            entry = None
        _raise(rules.check_institution_provider(entry, local_today()), status=409)
        profile = profile_for(policies, plan.region_id)
        counts = (
            await session.execute(
                select(
                    func.count(),
                    func.count().filter(Course.provider_type == "institution"),
                ).where(Course.plan_id == plan.id, Course.status == "active")
            )
        ).one()
        _raise(
            rules.check_external_share(profile.afterschool, int(counts[1]) + 1, int(counts[0]) + 1),
            status=409,
        )
        course.status = "active"
        course.flag_reason = None
        # Seats freed while flagged went to nobody: the waitlist's head gets
        # them now, in order (AS-04).
        while course.seats_taken < course.capacity:
            if await _promote(session, course) is None:
                break
            course.seats_taken += 1
        return course_out(course)


async def draw_lottery(db: Database, principal: Principal, plan_id: str) -> dict[str, Any]:
    """AS-04: the seeded draw at the window's close; the seed is revealed."""
    async with db.transaction() as session:
        plan = await _admin_plan(session, principal, plan_id, lock=True)
        if plan.window_mode != "lottery":
            raise rule_violation("AS-04", "该方案的报名方式不是抽签。", status=409)
        if plan.lottery_drawn_at is not None:
            raise rule_violation("AS-04", "已经抽签，不能重抽。", status=409)
        if rules.window_state(utcnow(), plan.window_opens_at, plan.window_closes_at) != "closed":
            raise rule_violation("AS-04", "报名截止后才能抽签。", status=409)
        assert plan.lottery_seed is not None
        courses = list(
            (
                await session.execute(
                    select(Course)
                    .where(Course.plan_id == plan.id)
                    .order_by(Course.id)
                    .with_for_update()
                )
            ).scalars()
        )
        summary = []
        for course in courses:
            applied = {
                e.student_id: e
                for e in (
                    await session.execute(
                        select(Enrollment).where(
                            Enrollment.course_id == course.id, Enrollment.status == "applied"
                        )
                    )
                ).scalars()
            }
            order = rules.lottery_order(plan.lottery_seed, course.id, applied)
            free = max(0, course.capacity - course.seats_taken) if course.status == "active" else 0
            now = utcnow()
            for rank, student_id in enumerate(order):
                e = applied[student_id]
                if rank < free:
                    e.status, e.held_from = "held", now
                else:
                    course.waitlist_seq += 1
                    e.status, e.waitlist_position = "waitlisted", course.waitlist_seq
                await emit(session, _changed(e, "applied"))
            course.seats_taken += min(free, len(order))
            session.add(
                LotteryDraw(
                    course_id=course.id,
                    plan_id=plan.id,
                    seed=plan.lottery_seed,
                    applicants=sorted(applied),
                    order=order,
                    drawn_at=now,
                )
            )
            summary.append(
                {"course_id": course.id, "applicants": len(order), "held": min(free, len(order))}
            )
        plan.lottery_drawn_at = utcnow()
        return {
            "plan_id": plan.id,
            "seed": plan.lottery_seed,
            "seed_hash": plan.lottery_seed_hash,
            "courses": summary,
        }


async def lottery_record(db: Database, principal: Principal, course_id: str) -> dict[str, Any]:
    """AS-04: the audit record of a course's draw (student ids only, X-06)."""
    async with db.read() as session:
        course = await session.get(Course, course_id)
        ensure(course is not None, "课程")
        assert course is not None
        plan = await load_plan(session, principal, course.plan_id)
        ensure(plan.lottery_drawn_at is not None, "抽签记录")
        draw = await session.get(LotteryDraw, course_id)
        ensure(draw is not None, "抽签记录")
        assert draw is not None
        return {
            "course_id": course_id,
            "seed": draw.seed,
            "seed_hash": plan.lottery_seed_hash,
            "applicants": draw.applicants,
            "order": draw.order,
            "capacity": course.capacity,
            "drawn_at": draw.drawn_at.isoformat(),
        }


async def student_enrollments(
    db: Database, principal: Principal, student_id: str
) -> list[schemas.EnrollmentOut]:
    async with db.read() as session:
        student = (
            (
                await session.execute(
                    select(roster.students).where(roster.students.c.id == student_id)
                )
            )
            .mappings()
            .first()
        )
        ensure(
            student is not None
            and (
                await is_guardian(session, principal, student_id)
                or await teaches_student(session, principal, dict(student))
            ),
            "学生",
        )
        rows = (
            await session.execute(
                select(Enrollment)
                .where(Enrollment.student_id == student_id)
                .order_by(Enrollment.created_at)
            )
        ).scalars()
        return [enrollment_out(e) for e in rows]


async def course_enrollments(
    db: Database, principal: Principal, course_id: str
) -> list[dict[str, Any]]:
    """AS-04 for the school's staff: who holds or waits for a course, in order;
    names masked (X-06) — the full name is on the course teacher's roll-call sheet."""
    async with db.read() as session:
        course = await session.get(Course, course_id)
        ensure(
            course is not None
            and (
                is_school_admin(principal, course.school_id)
                or (
                    is_staff(principal, course.school_id)
                    and principal.person_id is not None
                    and principal.person_id == course.teacher_id
                )
            ),
            "课程",
        )
        assert course is not None
        s = roster.students
        rows = (
            await session.execute(
                select(Enrollment, s.c.name)
                .join(s, s.c.id == Enrollment.student_id)
                .where(Enrollment.course_id == course_id, Enrollment.status.in_(ACTIVE_STATUSES))
                .order_by(Enrollment.status, Enrollment.waitlist_position, Enrollment.created_at)
            )
        ).all()
        return [
            {
                "id": e.id,
                "student_id": e.student_id,
                "student_name": mask_name(name),
                "status": e.status,
                "waitlist_position": e.waitlist_position,
            }
            for e, name in rows
        ]
