"""institutions's use cases: each one transaction writing rows and events together.

Every check runs before the first write, inside the unit of work; a refusal
raises a problem and the transaction rolls back, so nothing is half-written.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.app import ServiceContext
from chassis.auth import Principal
from chassis.calendar import (
    Calendar,
    CalendarDataError,
    HolidayArrangement,
    SchoolTerms,
)
from chassis.errors import FieldError, Problem, conflict, not_found, rule_violation
from chassis.messaging import emit
from chassis.policy import PolicyProfile, PolicyRegistry, UnknownRegionError, class_size_band
from chassis.privacy import hash_identity_number, is_valid_resident_id, mask_identity_number
from contracts import institutions as ev
from services.institutions import access, rules, schemas
from services.institutions.models import (
    BlacklistEntry,
    Complaint,
    ComplaintStep,
    Course,
    CourseLesson,
    CreditRecord,
    Inspection,
    Institution,
    LicenceTransition,
    Penalty,
    Trainer,
    roster,
)

SHANGHAI = timezone(timedelta(hours=8))
DEFAULT_LICENCE_YEARS = 3
MAX_LICENCE_YEARS = 10  # a sanity bound on a typed validity, not a policy figure
LICENCE_PREFIX = {"education": "教民", "sports": "体民", "culture": "文民", "science": "科民"}


def now() -> datetime:
    """The clock (tests replace it)."""
    return datetime.now(UTC)


def today() -> date:
    """Today in Asia/Shanghai: policy dates are local dates."""
    return now().astimezone(SHANGHAI).date()


def new_id() -> str:
    return str(uuid.uuid4())


def _field(field: str, message: str) -> FieldError:
    return FieldError(field=field, message=message)


def _violations_problem(rule: str, detail: str, violations: Sequence[rules.Violation]) -> Problem:
    return rule_violation(rule, detail, violations=[v.as_dict() for v in violations])


# ---------------------------------------------------------------- policy and calendar


async def resolve_profile_id(
    session: AsyncSession, policies: PolicyRegistry, region_id: str
) -> str:
    """A region's profile: from identity's region (roster copy), else the id itself."""
    row = await session.scalar(
        select(roster.regions.c.profile_id).where(roster.regions.c.id == region_id)
    )
    if row is not None and row in policies:
        return str(row)
    if region_id in policies and region_id != "national":
        return region_id
    raise Problem(
        422,
        f"区域 {region_id} 不存在。",
        errors=[_field("body.region_id", "未知区域")],
    )


def profile_for(policies: PolicyRegistry, profile_id: str, on: date | None = None) -> PolicyProfile:
    try:
        return policies.profile(profile_id, on=on or today())
    except UnknownRegionError:
        return policies.profile("national", on=on or today())


async def region_calendar(
    session: AsyncSession, ctx: ServiceContext, region_id: str, profile_id: str
) -> Calendar:
    """X-05: holiday arrangements (the policy files, overridden year by year by
    what operators loaded into identity), plus the region's school terms.
    Years without an arrangement use the computed statutory days."""
    by_year: dict[int, HolidayArrangement] = {
        a.year: a for a in ctx.extras.get("holiday_files", ())
    }
    rows = (await session.execute(select(roster.holidays))).mappings().all()
    loaded: dict[int, dict[str, list[Any]]] = {}
    for row in rows:
        entry = loaded.setdefault(row["year"], {"holidays": [], "workday_swaps": []})
        if row["is_workday_swap"]:
            entry["workday_swaps"].append(row["day"])
        else:
            entry["holidays"].append({"date": row["day"], "name": row["name"] or "节假日"})
    for year, entry in loaded.items():
        by_year[year] = HolidayArrangement.model_validate({"year": year, **entry})
    all_terms: dict[str, SchoolTerms] = ctx.extras.get("terms", {})
    terms = all_terms.get(region_id) or all_terms.get(profile_id)
    try:
        return Calendar(by_year.values(), terms)
    except CalendarDataError:
        # Two sources disagree across a year boundary: the operator's data wins.
        return Calendar([a for y, a in by_year.items() if y in loaded], terms)


def credit_level_of(policies: PolicyRegistry, inst: Institution) -> str:
    return rules.credit_level(inst.credit_score, profile_for(policies, inst.profile_id))


# ---------------------------------------------------------------- helpers


@asynccontextmanager
async def _unique_or_conflict(detail: str) -> AsyncIterator[None]:
    """A unique key taken by a concurrent transaction (PostgreSQL: both passed
    the check, the second commit fails) is a 409, like the checked case."""
    try:
        yield
    except IntegrityError:
        raise conflict(detail) from None


async def _get_institution(
    session: AsyncSession, institution_id: str, *, lock: bool = False
) -> Institution | None:
    query = select(Institution).where(Institution.id == institution_id)
    if lock:
        query = query.with_for_update()
    return (await session.scalars(query)).first()


def _application_facts(inst: Institution) -> rules.ApplicationFacts:
    return rules.ApplicationFacts(
        category=inst.category,  # type: ignore[arg-type]
        target_groups=frozenset(inst.target_groups),  # type: ignore[arg-type]
        profit_status=inst.profit_status,  # type: ignore[arg-type]
        existing=inst.existing_permit_number is not None,
    )


def _refresh_flags(inst: Institution) -> None:
    """INST-02/03/08: what the institution may do now."""
    inst.reregistration_pending = rules.reregistration_required(_application_facts(inst))
    allowed = rules.may_enroll_and_charge(
        status=inst.status,
        blacklisted=inst.blacklisted,
        reregistration_pending=inst.reregistration_pending,
    )
    inst.can_enroll = inst.can_charge = allowed


def _facts(
    inst: Institution, *, previous_status: str | None, reason: str, actor: str, at: datetime
) -> dict[str, Any]:
    return {
        "institution_id": inst.id,
        "name": inst.name,
        "region_id": inst.region_id,
        "category": inst.category,
        "department": inst.department,
        "credit_code": inst.credit_code,
        "licence_number": inst.licence_number,
        "licence_valid_until": inst.licence_valid_until,
        "status": inst.status,
        "previous_status": previous_status,
        "profit_status": inst.profit_status,
        "blacklisted": inst.blacklisted,
        "reregistration_pending": inst.reregistration_pending,
        "can_enroll": inst.can_enroll,
        "can_charge": inst.can_charge,
        "reason": reason,
        "actor": actor,
        "occurred_at": at,
    }


async def _record(
    session: AsyncSession,
    inst: Institution,
    *,
    action: str,
    from_status: str | None,
    reason: str,
    principal: Principal | None,
    actor: str,
    event: ev.InstitutionFacts | None,
    detail: dict[str, Any] | None = None,
    at: datetime,
) -> None:
    """INST-03: the history row and (exactly one) event of a transition."""
    session.add(
        LicenceTransition(
            institution_id=inst.id,
            action=action,
            from_status=from_status,
            to_status=inst.status,
            detail=detail or {},
            reason=reason,
            actor=actor,
            actor_roles=sorted(principal.roles) if principal else [],
            event_type=event.TYPE if event else None,
            at=at,
        )
    )
    if event is not None:
        await emit(session, event)


async def _insert_ignore(session: AsyncSession, model: Any, values: dict[str, Any]) -> bool:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    result = await session.execute(insert(model).values(**values).on_conflict_do_nothing())
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def add_credit_record(
    session: AsyncSession,
    inst: Institution,
    *,
    source: str,
    source_ref: str,
    kind: str,
    reason: str,
) -> bool:
    """INST-04: add one credit line (once per natural key) and recompute the score."""
    inserted = await _insert_ignore(
        session,
        CreditRecord,
        {
            "institution_id": inst.id,
            "source": source,
            "source_ref": source_ref[:120],
            "delta": rules.CREDIT_DELTAS[kind],
            "reason": reason[:2000],
            "recorded_at": now(),
        },
    )
    if inserted:
        total = await session.scalar(
            select(func.coalesce(func.sum(CreditRecord.delta), 0)).where(
                CreditRecord.institution_id == inst.id
            )
        )
        inst.credit_score = rules.credit_score([int(total or 0)])
    return inserted


# ---------------------------------------------------------------- INST-01/02 registration


async def register(
    ctx: ServiceContext, data: schemas.ApplicationIn, principal: Principal
) -> Institution:
    # Who the application is for.
    if principal.has_role("institution") and not principal.has_role("regulator"):
        own = principal.tenant_ids("institution")
        if data.id is None and len(own) == 1:
            institution_id = next(iter(own))
        elif data.id is not None and data.id in own:
            institution_id = data.id
        else:
            raise Problem(
                422,
                "机构账号只能为本机构（令牌中的 institution 租户）提交申请。",
                errors=[_field("body.id", "须为本机构编号")],
            )
    elif principal.has_role("regulator"):
        if not access.can_regulate(principal, region_id=data.region_id, category=data.category):
            raise Problem(403, "只能为本部门主管类别、本区域的机构登记。")
        institution_id = data.id or new_id()
    else:
        raise Problem(403, "只有机构或监管部门可以提交登记申请。")

    # INST-01: the credit code.
    code = rules.normalize_credit_code(data.credit_code)
    problems = rules.credit_code_problems(code)
    if problems:
        raise Problem(
            422,
            "统一社会信用代码无效：" + "；".join(problems),
            rule="INST-01",
            errors=[_field("body.credit_code", p) for p in problems],
        )
    # INST-02: forbidden registrations, all reasons at once.
    facts = rules.ApplicationFacts(
        category=data.category,
        target_groups=frozenset(data.target_groups),
        profit_status=data.profit_status,
        existing=data.existing_permit_number is not None,
    )
    violations = rules.approval_violations(facts)
    if violations:
        raise _violations_problem("INST-02", "不予受理：" + violations[0].message, violations)

    async with (
        _unique_or_conflict("该机构或该统一社会信用代码已登记。"),
        ctx.db.transaction() as session,
    ):
        profile_id = await resolve_profile_id(session, ctx.policies, data.region_id)
        if await session.get(Institution, institution_id) is not None:
            raise conflict("该机构已有登记记录。", institution_id=institution_id)
        if await session.scalar(select(Institution.id).where(Institution.credit_code == code)):
            raise conflict("该统一社会信用代码已登记。")
        at = now()
        inst = Institution(
            id=institution_id,
            name=data.name,
            credit_code=code,
            region_id=data.region_id,
            profile_id=profile_id,
            district=data.district,
            category=data.category,
            department=rules.competent_department(data.category),
            legal_representative=data.legal_representative,
            contact_phone=data.contact_phone,
            registered_address=data.registered_address,
            training_addresses=data.training_addresses,
            target_groups=sorted(data.target_groups),
            profit_status=data.profit_status,
            modes=sorted(data.modes),
            existing_permit_number=data.existing_permit_number,
            status="applied",
            blacklisted=False,
            credit_score=rules.CREDIT_START,
            created_by=principal.subject,
            created_at=at,
            updated_at=at,
        )
        _refresh_flags(inst)
        session.add(inst)
        await session.flush()
        # Not a transition of the licence state machine: recorded, no event.
        await _record(
            session,
            inst,
            action="apply",
            from_status=None,
            reason="提交登记申请",
            principal=principal,
            actor=principal.subject,
            event=None,
            at=at,
        )
        return inst


# ---------------------------------------------------------------- INST-03 licence transitions


_EVENT_OF_ACTION: dict[str, type[ev.InstitutionFacts]] = {
    "start_review": ev.LicenceReviewStarted,
    "grant": ev.LicenceGranted,
    "reject": ev.LicenceRejected,
    "suspend": ev.LicenceSuspended,
    "reinstate": ev.LicenceReinstated,
    "revoke": ev.LicenceRevoked,
    "transform": ev.LicenceTransformed,
    "terminate": ev.LicenceTerminated,
}


def _illegal(status: str, action: str) -> Problem:
    allowed = rules.allowed_licence_actions(status)
    return Problem(
        409,
        f"当前状态「{rules.LICENCE_STATUS_NAMES_ZH.get(status, status)}」不能执行 {action}；"
        f"可执行：{', '.join(allowed) or '无'}。",
        rule="INST-03",
        status_now=status,
        allowed=allowed,
    )


def _years_later(day: date, years: int) -> date:
    """The same day ``years`` on; 29 February becomes 28 February."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


async def _unique_licence_number(session: AsyncSession, department: str, on: date) -> str:
    while True:
        number = f"{LICENCE_PREFIX[department]}{on.year}{secrets.randbelow(10**8):08d}号"
        if not await session.scalar(
            select(Institution.id).where(Institution.licence_number == number)
        ):
            return number


async def _apply_transition(
    session: AsyncSession,
    inst: Institution,
    body: schemas.TransitionIn,
    principal: Principal,
    *,
    at: datetime,
) -> None:
    target = rules.next_licence_status(inst.status, body.action)
    if target is None:
        raise _illegal(inst.status, body.action)
    previous = inst.status
    extra: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    on = at.astimezone(SHANGHAI).date()
    if body.action == "grant":
        violations = rules.approval_violations(_application_facts(inst))
        if violations:
            raise _violations_problem("INST-02", "不予许可：" + violations[0].message, violations)
        valid_until = body.valid_until or _years_later(on, DEFAULT_LICENCE_YEARS)
        if valid_until <= on:
            raise Problem(
                422,
                "许可有效期须晚于今天。",
                errors=[_field("body.valid_until", "须晚于今天")],
            )
        if valid_until > _years_later(on, MAX_LICENCE_YEARS):
            raise Problem(
                422,
                f"许可有效期不能超过 {MAX_LICENCE_YEARS} 年。",
                errors=[_field("body.valid_until", f"不超过 {MAX_LICENCE_YEARS} 年")],
            )
        inst.licence_number = await _unique_licence_number(session, inst.department, on)
        inst.licence_valid_from = on
        inst.licence_valid_until = valid_until
        detail = {"licence_number": inst.licence_number, "valid_until": valid_until.isoformat()}
    elif body.action == "transform":
        kind = body.transformation
        if kind is None:
            raise Problem(
                422,
                "转型须指明 transformation。",
                errors=[_field("body.transformation", "必填")],
            )
        violations = rules.transformation_violations(
            kind,
            category=inst.category,  # type: ignore[arg-type]
            profit_status=inst.profit_status,  # type: ignore[arg-type]
        )
        if violations:
            raise _violations_problem("INST-03", violations[0].message, violations)
        extra = {
            "transformation": kind,
            "previous_category": inst.category,
            "previous_profit_status": inst.profit_status,
        }
        if kind == "to_non_subject":
            if body.new_category is None or body.new_category == "subject":
                raise Problem(
                    422,
                    "转为非学科类须指明新类别（sports / arts / science_tech）。",
                    errors=[_field("body.new_category", "须为非学科类类别")],
                )
            inst.category = body.new_category
            inst.department = rules.competent_department(body.new_category)
        elif kind == "to_non_profit":
            inst.profit_status = "non_profit"
        else:
            if body.staff_reassigned is None:
                raise Problem(
                    422,
                    "人员分流须填写分流人数。",
                    errors=[_field("body.staff_reassigned", "必填")],
                )
            extra["staff_reassigned"] = body.staff_reassigned
        detail = {k: v for k, v in extra.items()}
        if kind == "to_non_subject":
            detail["new_category"] = inst.category
    inst.status = target
    _refresh_flags(inst)
    inst.updated_at = at
    event_cls = _EVENT_OF_ACTION[body.action]
    event = event_cls(
        **_facts(
            inst,
            previous_status=previous,
            reason=body.reason,
            actor=principal.subject,
            at=at,
        ),
        **extra,
    )
    await _record(
        session,
        inst,
        action=body.action,
        from_status=previous,
        reason=body.reason,
        principal=principal,
        actor=principal.subject,
        event=event,
        detail=detail,
        at=at,
    )
    if body.action == "revoke":
        # INST-08: a revocation blacklists.
        await _blacklist(
            session, inst, reason=body.reason, source="revocation", principal=principal, at=at
        )


async def transition(
    ctx: ServiceContext, institution_id: str, body: schemas.TransitionIn, principal: Principal
) -> Institution:
    async with ctx.db.transaction() as session:
        inst = await _get_institution(session, institution_id, lock=True)
        access.ensure_regulator(principal, inst)
        assert inst is not None
        await _apply_transition(session, inst, body, principal, at=now())
        return inst


async def _blacklist(
    session: AsyncSession,
    inst: Institution,
    *,
    reason: str,
    source: str,
    principal: Principal,
    at: datetime,
) -> bool:
    if inst.blacklisted:
        return False
    on = at.astimezone(SHANGHAI).date()
    session.add(
        BlacklistEntry(
            institution_id=inst.id,
            reason=reason,
            source=source,
            listed_on=on,
            listed_by=principal.subject,
        )
    )
    inst.blacklisted = True
    _refresh_flags(inst)
    event = ev.Blacklisted(
        **_facts(inst, previous_status=inst.status, reason=reason, actor=principal.subject, at=at),
        listed_on=on,
    )
    await _record(
        session,
        inst,
        action="blacklist",
        from_status=inst.status,
        reason=reason,
        principal=principal,
        actor=principal.subject,
        event=event,
        detail={"source": source},
        at=at,
    )
    return True


async def blacklist(
    ctx: ServiceContext, institution_id: str, reason: str, principal: Principal
) -> Institution:
    async with ctx.db.transaction() as session:
        inst = await _get_institution(session, institution_id, lock=True)
        access.ensure_regulator(principal, inst)
        assert inst is not None
        if inst.blacklisted:
            raise conflict("该机构已在黑名单中。")
        await _blacklist(
            session, inst, reason=reason, source="regulator", principal=principal, at=now()
        )
        return inst


async def delist(
    ctx: ServiceContext, institution_id: str, reason: str, principal: Principal
) -> Institution:
    async with ctx.db.transaction() as session:
        inst = await _get_institution(session, institution_id, lock=True)
        access.ensure_regulator(principal, inst)
        assert inst is not None
        entry = (
            await session.scalars(
                select(BlacklistEntry).where(
                    BlacklistEntry.institution_id == inst.id,
                    BlacklistEntry.delisted_on.is_(None),
                )
            )
        ).first()
        if not inst.blacklisted or entry is None:
            raise conflict("该机构不在黑名单中。")
        at = now()
        on = at.astimezone(SHANGHAI).date()
        entry.delisted_on, entry.delist_reason, entry.delisted_by = on, reason, principal.subject
        inst.blacklisted = False
        _refresh_flags(inst)
        event = ev.Delisted(
            **_facts(
                inst, previous_status=inst.status, reason=reason, actor=principal.subject, at=at
            ),
            delisted_on=on,
        )
        await _record(
            session,
            inst,
            action="delist",
            from_status=inst.status,
            reason=reason,
            principal=principal,
            actor=principal.subject,
            event=event,
            at=at,
        )
        return inst


async def update_application(
    ctx: ServiceContext, institution_id: str, data: dict[str, Any], principal: Principal
) -> Institution:
    async with ctx.db.transaction() as session:
        inst = await _get_institution(session, institution_id, lock=True)
        access.ensure_owner_or_regulator(principal, inst)
        assert inst is not None
        if inst.status in ("rejected", "revoked", "terminated"):
            raise _illegal(inst.status, "update")
        for key, value in data.items():
            setattr(inst, key, value)
        inst.updated_at = now()
        return inst


# ---------------------------------------------------------------- INST-05 trainers


async def add_trainer(
    ctx: ServiceContext, institution_id: str, data: schemas.TrainerIn, principal: Principal
) -> Trainer:
    if data.id_type == "resident_id" and not is_valid_resident_id(data.id_number):
        raise Problem(
            422,
            "身份证号无效（校验位不符）。",
            errors=[_field("body.id_number", "身份证号无效")],
        )
    async with _unique_or_conflict("该人员已在本机构登记。"), ctx.db.transaction() as session:
        inst = await _get_institution(session, institution_id, lock=True)
        access.ensure_owner_or_regulator(principal, inst)
        assert inst is not None
        if inst.status in ("rejected", "revoked", "terminated"):
            raise _illegal(inst.status, "add_trainer")
        id_hash = hash_identity_number(data.id_number, ctx.platform.id_hash_pepper)
        in_service = await session.scalar(
            select(func.count())
            .select_from(roster.teachers)
            .where(
                roster.teachers.c.id_number_hash == id_hash,
                roster.teachers.c.in_service.is_(True),
            )
        )
        violations = rules.trainer_violations(
            rules.TrainerFacts(
                institution_category=inst.category,  # type: ignore[arg-type]
                nationality=data.nationality,
                located_abroad=data.located_abroad,
                teacher_certificate_number=data.teacher_certificate_number,
                consent_given=data.consent_given,
                background_check=data.background_check.result,
                matches_in_service_teacher=bool(in_service),
            )
        )
        if violations:
            raise _violations_problem("INST-05", "不予登记：" + violations[0].message, violations)
        if await session.scalar(
            select(Trainer.id).where(
                Trainer.institution_id == inst.id, Trainer.id_number_hash == id_hash
            )
        ):
            raise conflict("该人员已在本机构登记。")
        at = now()
        trainer = Trainer(
            id=new_id(),
            institution_id=inst.id,
            name=data.name,
            id_type=data.id_type,
            id_number_hash=id_hash,
            id_number_masked=mask_identity_number(data.id_number),
            nationality=data.nationality,
            located_abroad=data.located_abroad,
            teacher_certificate_number=data.teacher_certificate_number,
            subjects=data.subjects,
            consent_at=at,
            background_check=data.background_check.result,
            background_checked_on=data.background_check.checked_on,
            background_check_authority=data.background_check.authority,
            status="active" if data.background_check.result == "clear" else "pending_check",
            created_at=at,
            updated_at=at,
        )
        session.add(trainer)
        return trainer


async def remove_trainer(
    ctx: ServiceContext, institution_id: str, trainer_id: str, principal: Principal
) -> Trainer:
    async with ctx.db.transaction() as session:
        inst = await _get_institution(session, institution_id)
        access.ensure_owner_or_regulator(principal, inst)
        trainer = await session.get(Trainer, trainer_id)
        if trainer is None or trainer.institution_id != institution_id:
            raise not_found("人员不存在。")
        trainer.status = "left"
        trainer.updated_at = now()
        return trainer


# ---------------------------------------------------------------- INST-06 courses


@dataclass
class FiledCourse:
    course: Course
    lessons: list[CourseLesson]
    warnings: list[str]


async def file_course(
    ctx: ServiceContext, institution_id: str, data: schemas.CourseIn, principal: Principal
) -> FiledCourse:
    lessons = [rules.Lesson(lesson.date, lesson.start, lesson.end) for lesson in data.lessons]
    shape = rules.lesson_input_problems(
        lessons, lesson_minutes=data.lesson_minutes, lesson_count=data.lesson_count
    )
    if shape:
        raise Problem(
            422,
            "课表有误，请检查标出的字段。",
            errors=[_field(f, m) for f, m in shape],
        )
    async with ctx.db.transaction() as session:
        inst = await _get_institution(session, institution_id, lock=True)
        access.ensure_owner_or_regulator(principal, inst)
        assert inst is not None
        if inst.status != "licensed":
            raise _illegal(inst.status, "file_course")
        if inst.blacklisted:
            raise rule_violation("INST-08", "机构已列入黑名单，不能备案课程。")
        if inst.reregistration_pending:
            raise rule_violation(
                "INST-02",
                "学科类机构完成非营利性登记前暂停招生及收费，不能备案课程。",
            )
        profile = profile_for(ctx.policies, inst.profile_id)
        calendar = await region_calendar(session, ctx, inst.region_id, inst.profile_id)
        facts = rules.CourseFacts(
            institution_category=inst.category,  # type: ignore[arg-type]
            institution_target_groups=frozenset(inst.target_groups),  # type: ignore[arg-type]
            subject=data.subject,
            mode=data.mode,
            target_grades=frozenset(data.target_grades),
            lesson_minutes=data.lesson_minutes,
            price_per_lesson_fen=data.price_per_lesson_fen,
            lesson_count=data.lesson_count,
            max_class_size=data.max_class_size,
            lessons=tuple(lessons),
            min_age_years=data.min_age_years,
            overseas_curriculum=data.overseas_curriculum,
            exams_or_rankings=data.exams_or_rankings,
        )
        verdict = rules.course_violations(facts, profile, calendar)
        if verdict.violations:
            raise rule_violation(
                "INST-06",
                f"课程备案未通过：共 {len(verdict.violations)} 处违反校外培训规定。",
                violations=[v.as_dict() for v in verdict.violations],
                warnings=verdict.warnings,
            )
        at = now()
        band = verdict.class_size_band or class_size_band(data.max_class_size)
        course = Course(
            id=new_id(),
            institution_id=inst.id,
            name=data.name,
            subject=data.subject,
            subject_category=inst.category,
            mode=data.mode,
            target_grades=list(data.target_grades),
            min_age_years=data.min_age_years,
            lesson_minutes=data.lesson_minutes,
            price_per_lesson_fen=data.price_per_lesson_fen,
            lesson_count=data.lesson_count,
            max_class_size=data.max_class_size,
            class_size_band=band,
            price_group=verdict.price_group,
            period_start=min(lesson.date for lesson in lessons),
            period_end=max(lesson.date for lesson in lessons),
            status="filed",
            filed_by=principal.subject,
            filed_at=at,
        )
        session.add(course)
        await session.flush()
        ordered = sorted(lessons, key=lambda lesson: (lesson.date, lesson.start))
        rows = [
            CourseLesson(course_id=course.id, seq=i, day=x.date, start=x.start, end=x.end)
            for i, x in enumerate(ordered, start=1)
        ]
        session.add_all(rows)
        await emit(
            session,
            ev.CourseFiled(
                institution_id=inst.id,
                region_id=inst.region_id,
                course_id=course.id,
                name=course.name,
                subject=course.subject,
                subject_category=inst.category,  # type: ignore[arg-type]
                mode=data.mode,
                target_grades=list(data.target_grades),
                price_per_lesson_fen=data.price_per_lesson_fen,
                lesson_count=data.lesson_count,
                lesson_minutes=data.lesson_minutes,
                class_size_band=band,  # type: ignore[arg-type]
                period_start=course.period_start,
                period_end=course.period_end,
                lessons=[ev.FiledLesson(date=x.date, start=x.start, end=x.end) for x in ordered],
                filed_at=at,
            ),
        )
        return FiledCourse(course, rows, verdict.warnings)


# ---------------------------------------------------------------- INST-07 complaints


def hash_tracking_code(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


@dataclass
class Receipt:
    complaint: Complaint
    tracking_code: str


@dataclass(frozen=True)
class ComplaintRate:
    """INST-07: at most ``limit`` public reports per client address per window."""

    limit: int = 10
    window_seconds: int = 3600


def source_hash(address: str | None, pepper: str) -> str | None:
    """A keyed hash of the client address: enough to count, not to identify."""
    if not address:
        return None
    return hmac.new(pepper.encode(), f"complaint-source:{address}".encode(), "sha256").hexdigest()


async def _check_complaint_rate(
    session: AsyncSession, rate: ComplaintRate, source: str | None, at: datetime
) -> None:
    if source is None or rate.limit <= 0:
        return
    since = at - timedelta(seconds=rate.window_seconds)
    recent = list(
        (
            await session.scalars(
                select(Complaint.received_at)
                .where(Complaint.source_hash == source, Complaint.received_at > since)
                .order_by(Complaint.received_at)
                .limit(rate.limit)
            )
        ).all()
    )
    if len(recent) >= rate.limit:
        frees_at = recent[0] + timedelta(seconds=rate.window_seconds)
        retry = max(1, int((frees_at - at).total_seconds()))
        raise Problem(
            429,
            f"举报提交过于频繁：同一来源每 {rate.window_seconds // 60} 分钟最多 {rate.limit} 件，"
            f"请 {retry} 秒后再试。",
            rule="INST-07",
            headers={"Retry-After": str(retry)},
            limit=rate.limit,
            window_seconds=rate.window_seconds,
        )


async def submit_complaint(
    ctx: ServiceContext, data: schemas.ComplaintIn, client_address: str | None = None
) -> Receipt:
    errors: list[FieldError] = []
    if data.institution_id is None and data.institution_name is None:
        errors.append(_field("body.institution_id", "请填写被举报机构编号或名称"))
    if data.institution_id is None and data.region_id is None:
        errors.append(_field("body.region_id", "未填机构编号时须填写区域"))
    if not data.anonymous and data.contact_phone is None:
        errors.append(_field("body.contact_phone", "实名举报须留联系电话"))
    if errors:
        raise Problem(422, "举报信息不完整。", errors=errors)
    async with ctx.db.transaction() as session:
        inst: Institution | None = None
        if data.institution_id is not None:
            inst = await session.get(Institution, data.institution_id)
            if inst is None:
                raise Problem(
                    422,
                    "被举报机构不存在。",
                    errors=[_field("body.institution_id", "机构不存在")],
                )
        region_id = inst.region_id if inst else str(data.region_id)
        profile_id = (
            inst.profile_id if inst else await resolve_profile_id(session, ctx.policies, region_id)
        )
        at = now()
        source = source_hash(client_address, ctx.platform.id_hash_pepper)
        rate: ComplaintRate = ctx.extras.get("complaint_rate") or ComplaintRate()
        await _check_complaint_rate(session, rate, source, at)
        received_on = at.astimezone(SHANGHAI).date()
        profile = profile_for(ctx.policies, profile_id, received_on)
        calendar = await region_calendar(session, ctx, region_id, profile_id)
        code = secrets.token_urlsafe(16)
        complaint = Complaint(
            id=new_id(),
            tracking_code_hash=hash_tracking_code(code),
            source_hash=source,
            institution_id=inst.id if inst else None,
            institution_name=inst.name if inst else str(data.institution_name),
            region_id=region_id,
            department=rules.complaint_department(
                inst.category if inst else None,  # type: ignore[arg-type]
                data.training_category,
            ),
            category=data.category,
            description=data.description,
            anonymous=data.anonymous,
            contact_name=None if data.anonymous else data.contact_name,
            contact_phone=None if data.anonymous else data.contact_phone,
            status="received",
            received_at=at,
            received_on=received_on,
            deadline=rules.complaint_deadline(received_on, profile, calendar),
        )
        session.add(complaint)
        await session.flush()
        session.add(
            ComplaintStep(
                complaint_id=complaint.id,
                action="receive",
                from_status=None,
                to_status="received",
                note=f"分派至{rules.DEPARTMENT_NAMES_ZH[complaint.department]}",
                actor="public",
                at=at,
            )
        )
        return Receipt(complaint, code)


async def complaint_transition(
    ctx: ServiceContext,
    complaint_id: str,
    body: schemas.ComplaintTransitionIn,
    principal: Principal,
) -> Complaint:
    async with ctx.db.transaction() as session:
        query = select(Complaint).where(Complaint.id == complaint_id).with_for_update()
        complaint = (await session.scalars(query)).first()
        if complaint is None or not access.complaint_visible(principal, complaint):
            raise not_found("举报不存在。")
        if not access.can_handle_complaint(principal, complaint):
            raise Problem(403, "只有承办该举报的主管部门可以处理。")
        target = rules.next_complaint_status(complaint.status, body.action)
        if target is None:
            allowed = rules.allowed_complaint_actions(complaint.status)
            raise Problem(
                409,
                f"举报当前状态为 {complaint.status}，不能执行 {body.action}；"
                f"可执行：{', '.join(allowed) or '无'}。",
                rule="INST-07",
                status_now=complaint.status,
                allowed=allowed,
            )
        if body.action in ("resolve", "dismiss") and not body.outcome:
            raise Problem(422, "办结须填写处理结果。", errors=[_field("body.outcome", "必填")])
        if body.action == "resolve" and body.substantiated is None:
            raise Problem(
                422, "办结须认定举报是否属实。", errors=[_field("body.substantiated", "必填")]
            )
        at = now()
        previous = complaint.status
        complaint.status = target
        if body.action == "assign":
            complaint.assignee = body.assignee or principal.subject
        if body.action in ("resolve", "dismiss"):
            complaint.outcome = body.outcome
            complaint.closed_at = at
            complaint.substantiated = (
                bool(body.substantiated) if body.action == "resolve" else False
            )
        session.add(
            ComplaintStep(
                complaint_id=complaint.id,
                action=body.action,
                from_status=previous,
                to_status=target,
                note=body.note or body.outcome,
                actor=principal.subject,
                at=at,
            )
        )
        if body.action == "resolve" and body.substantiated and complaint.institution_id:
            inst = await _get_institution(session, complaint.institution_id, lock=True)
            if inst is not None:
                # INST-07 -> INST-04: a substantiated report enters the credit record.
                await add_credit_record(
                    session,
                    inst,
                    source="complaint",
                    source_ref=complaint.id,
                    kind="complaint_substantiated",
                    reason=f"举报属实（{complaint.category}）：{body.outcome}",
                )
        return complaint


# ---------------------------------------------------------------- INST-08 inspections, penalties


_INSPECTION_CREDIT = {
    "issues_found": "inspection_issues_found",
    "serious_violation": "inspection_serious_violation",
}


async def record_inspection(
    ctx: ServiceContext, institution_id: str, data: schemas.InspectionIn, principal: Principal
) -> Inspection:
    if data.inspected_on > today():
        raise Problem(
            422, "检查日期不能晚于今天。", errors=[_field("body.inspected_on", "未来日期")]
        )
    async with ctx.db.transaction() as session:
        inst = await _get_institution(session, institution_id, lock=True)
        access.ensure_regulator(principal, inst)
        assert inst is not None
        inspection = Inspection(
            id=new_id(),
            institution_id=inst.id,
            inspected_on=data.inspected_on,
            result=data.result,
            findings=data.findings,
            inspector=principal.subject,
            created_at=now(),
        )
        session.add(inspection)
        await session.flush()
        if data.result in _INSPECTION_CREDIT:
            await add_credit_record(
                session,
                inst,
                source="inspection",
                source_ref=inspection.id,
                kind=_INSPECTION_CREDIT[data.result],
                reason=f"检查发现问题：{data.findings}",
            )
        return inspection


@dataclass
class PenaltyResult:
    penalty: Penalty
    revoked: bool
    blacklisted: bool


async def impose_penalty(
    ctx: ServiceContext, institution_id: str, data: schemas.PenaltyIn, principal: Principal
) -> PenaltyResult:
    errors: list[FieldError] = []
    if data.kind == "fine" and data.fine_fen is None:
        errors.append(_field("body.fine_fen", "罚款须填写金额"))
    if data.kind != "fine" and data.fine_fen is not None:
        errors.append(_field("body.fine_fen", "只有罚款填写金额"))
    if data.kind == "licence_revocation" and data.severity != "serious":
        errors.append(_field("body.severity", "吊销办学许可证属情节严重（serious）"))
    if data.decided_on > today():
        errors.append(_field("body.decided_on", "决定日期不能晚于今天"))
    if errors:
        raise Problem(422, "处罚决定信息有误。", errors=errors)
    async with ctx.db.transaction() as session:
        inst = await _get_institution(session, institution_id, lock=True)
        access.ensure_regulator(principal, inst)
        assert inst is not None
        if data.inspection_id is not None:
            found = await session.get(Inspection, data.inspection_id)
            if found is None or found.institution_id != inst.id:
                raise Problem(
                    422, "检查记录不存在。", errors=[_field("body.inspection_id", "不存在")]
                )
        if data.complaint_id is not None:
            found_c = await session.get(Complaint, data.complaint_id)
            if found_c is None or found_c.institution_id != inst.id:
                raise Problem(
                    422, "举报记录不存在。", errors=[_field("body.complaint_id", "不存在")]
                )
        revoke, to_blacklist = rules.penalty_effects(data.kind, data.severity)
        at = now()
        if revoke:
            if rules.next_licence_status(inst.status, "revoke") is None:
                raise _illegal(inst.status, "revoke")
        penalty = Penalty(
            id=new_id(),
            institution_id=inst.id,
            kind=data.kind,
            severity=data.severity,
            fine_fen=data.fine_fen,
            reason=data.reason,
            decided_on=data.decided_on,
            inspection_id=data.inspection_id,
            complaint_id=data.complaint_id,
            decided_by=principal.subject,
            created_at=at,
        )
        session.add(penalty)
        await session.flush()
        await add_credit_record(
            session,
            inst,
            source="penalty",
            source_ref=penalty.id,
            kind=f"penalty_{data.severity}",
            reason=f"行政处罚（{data.kind}）：{data.reason}",
        )
        newly_blacklisted = False
        if revoke:
            await _apply_transition(
                session,
                inst,
                schemas.TransitionIn(action="revoke", reason=data.reason),
                principal,
                at=at,
            )
            newly_blacklisted = inst.blacklisted
        elif to_blacklist:
            newly_blacklisted = await _blacklist(
                session, inst, reason=data.reason, source="penalty", principal=principal, at=at
            )
        return PenaltyResult(penalty, revoke, newly_blacklisted)
