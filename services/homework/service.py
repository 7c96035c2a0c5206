"""homework's use cases: each write is one transaction with its rows and events.

Policy decisions come from ``rules`` (pure); this module gathers the facts
(roster read copy, calendar, region profile), enforces the limits atomically
(guarded UPDATEs on per-class and per-subject day counters), records every
refusal in a transaction of its own (HW-08) and emits integration events
through the outbox.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import structlog
from sqlalchemy import Numeric, Table, and_, case, cast, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.app import ServiceContext
from chassis.auth import Principal
from chassis.calendar import FESTIVAL_NAMES_ZH, Calendar, SchoolTerms
from chassis.db import Database, utcnow
from chassis.errors import FieldError, Problem, conflict, not_found, rule_violation
from chassis.messaging import emit
from chassis.policy import PolicyProfile, UnknownRegionError, grade_band
from chassis.roster import load_calendar
from contracts import homework as ev
from services.homework import rules, schemas
from services.homework.models import (
    Assignment,
    AssignmentRevision,
    BurdenAlert,
    BurdenState,
    ClassDayUsage,
    EveningStudyClass,
    NoWrittenHomeworkDay,
    Refusal,
    SubjectDayUsage,
    SubjectQuota,
    TimeReport,
    roster,
)

log = structlog.get_logger("homework")

STAFF = ("school_admin", "head_teacher", "teacher")
TEACHING = ("head_teacher", "teacher")
OVERSIGHT = ("bureau", "regulator", "auditor")
TERMS_KEY = "homework_terms"

CLASS_USAGE: Table = ClassDayUsage.__table__  # type: ignore[assignment]
SUBJECT_USAGE: Table = SubjectDayUsage.__table__  # type: ignore[assignment]
ASSIGNMENTS: Table = Assignment.__table__  # type: ignore[assignment]


def local_today() -> dt.date:
    """Today in Asia/Shanghai (tests may replace this)."""
    return rules.local_date(utcnow())


def new_id() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------- facts


@dataclass(frozen=True)
class ClassFacts:
    id: str
    school_id: str
    grade: int
    name: str
    head_teacher_id: str | None
    subject_teachers: tuple[tuple[str, str], ...]  # (teacher_id, subject)
    school_name: str | None
    school_system: str | None
    region_id: str | None
    profile_id: str | None

    @property
    def subjects(self) -> set[str]:
        return {subject for _, subject in self.subject_teachers}

    def teaches_class(self, teacher_id: str | None) -> bool:
        if teacher_id is None:
            return False
        return teacher_id == self.head_teacher_id or any(
            t == teacher_id for t, _ in self.subject_teachers
        )

    def teaches(self, teacher_id: str | None, subject: str) -> bool:
        """Teachers publish only for the subjects they teach in the class; the
        head teacher too (they coordinate with quotas, edit and withdraw, but
        do not publish other teachers' subjects)."""
        return teacher_id is not None and (teacher_id, subject) in self.subject_teachers


async def class_facts(session: AsyncSession, class_id: str) -> ClassFacts | None:
    c, s, r = roster.classes, roster.schools, roster.regions
    row = (
        (
            await session.execute(
                select(
                    c,
                    s.c.name.label("school_name"),
                    s.c.school_system,
                    s.c.region_id,
                    r.c.profile_id,
                )
                .join(s, s.c.id == c.c.school_id, isouter=True)
                .join(r, r.c.id == s.c.region_id, isouter=True)
                .where(c.c.id == class_id)
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        return None
    teachers = tuple(
        (str(st.get("teacher_id")), str(st.get("subject")))
        for st in (row["subject_teachers"] or [])
        if isinstance(st, dict)
    )
    return ClassFacts(
        id=row["id"],
        school_id=row["school_id"],
        grade=row["grade"],
        name=row["name"],
        head_teacher_id=row["head_teacher_id"],
        subject_teachers=teachers,
        school_name=row["school_name"],
        school_system=row["school_system"],
        region_id=row["region_id"],
        profile_id=row["profile_id"],
    )


@dataclass(frozen=True)
class SchoolFacts:
    id: str
    name: str
    school_system: str
    region_id: str
    profile_id: str | None


async def school_facts(session: AsyncSession, school_id: str) -> SchoolFacts | None:
    s, r = roster.schools, roster.regions
    row = (
        (
            await session.execute(
                select(s, r.c.profile_id)
                .join(r, r.c.id == s.c.region_id, isouter=True)
                .where(s.c.id == school_id)
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        return None
    return SchoolFacts(
        row["id"], row["name"], row["school_system"], row["region_id"], row["profile_id"]
    )


def profile_for(
    ctx: ServiceContext, region_id: str | None, profile_id: str | None, day: dt.date
) -> PolicyProfile:
    """The region's profile on ``day`` (the region's own profile id, else its id)."""
    if region_id is None:
        raise Problem(409, "名册尚未同步该班级所在学校的信息，请稍后再试。")
    try:
        return ctx.policies.profile(profile_id or region_id, on=day)
    except UnknownRegionError:
        raise Problem(409, f"学校所在区域（{region_id}）没有政策配置。") from None


def class_profile(ctx: ServiceContext, facts: ClassFacts, day: dt.date) -> PolicyProfile:
    if facts.school_system is None:
        raise Problem(409, "名册尚未同步该班级所在学校的信息，请稍后再试。")
    return profile_for(ctx, facts.region_id, facts.profile_id, day)


def _terms(
    ctx: ServiceContext, region_id: str | None, profile_id: str | None
) -> SchoolTerms | None:
    terms: Mapping[str, SchoolTerms] = ctx.extras.get(TERMS_KEY) or {}
    for key in (region_id, profile_id, "national"):
        if key is not None and key in terms:
            return terms[key]
    return None


async def calendar_for(
    session: AsyncSession, ctx: ServiceContext, region_id: str | None, profile_id: str | None
) -> Calendar:
    """Operator-loaded holidays (roster copy) plus the region's terms (X-05)."""
    return await load_calendar(session, roster, _terms(ctx, region_id, profile_id))


async def declared_reason(session: AsyncSession, school_id: str, day: dt.date) -> str | None:
    return await session.scalar(
        select(NoWrittenHomeworkDay.reason).where(
            NoWrittenHomeworkDay.school_id == school_id, NoWrittenHomeworkDay.day == day
        )
    )


def _day_rule(
    facts: ClassFacts,
    profile: PolicyProfile,
    calendar: Calendar,
    day: dt.date,
    declared: str | None,
    evening_study: bool = False,
) -> rules.DayRule:
    assert facts.school_system is not None
    return rules.day_rule(
        day=day,
        grade=facts.grade,
        school_system=facts.school_system,  # type: ignore[arg-type]
        profile=profile,
        calendar=calendar,
        declared_no_written=declared,
        evening_study=evening_study,
    )


async def evening_study_weekdays(session: AsyncSession, class_id: str) -> list[int]:
    weekdays = await session.scalar(
        select(EveningStudyClass.weekdays).where(EveningStudyClass.class_id == class_id)
    )
    return sorted(weekdays or [])


async def evening_study_on(session: AsyncSession, class_id: str, day: dt.date) -> bool:
    """Does the class attend evening self-study (晚自习) on ``day``'s weekday?"""
    return day.isoweekday() in await evening_study_weekdays(session, class_id)


# ---------------------------------------------------------------- authorization


def is_staff(principal: Principal, school_id: str) -> bool:
    return principal.has_role(*STAFF) and principal.has_tenant("school", school_id)


def is_oversight(principal: Principal, region_id: str | None) -> bool:
    return (
        region_id is not None
        and principal.has_role(*OVERSIGHT)
        and principal.has_tenant("region", region_id)
    )


def teacher_of(principal: Principal, facts: ClassFacts) -> bool:
    """GW-03: a teacher acts only on the classes they teach."""
    return (
        principal.has_role(*TEACHING)
        and principal.has_tenant("school", facts.school_id)
        and facts.teaches_class(principal.person_id)
    )


async def family_students(session: AsyncSession, principal: Principal, class_id: str) -> list[str]:
    """The caller's own children (parent) or self (student) in the class."""
    if principal.person_id is None:
        return []
    st = roster.students
    found: set[str] = set()
    if principal.has_role("parent"):
        g = roster.guardianships
        rows = await session.scalars(
            select(st.c.id)
            .join(g, g.c.student_id == st.c.id)
            .where(g.c.guardian_id == principal.person_id, st.c.class_id == class_id)
        )
        found.update(rows)
    if principal.has_role("student"):
        rows = await session.scalars(
            select(st.c.id).where(st.c.id == principal.person_id, st.c.class_id == class_id)
        )
        found.update(rows)
    return sorted(found)


async def visible_class(
    session: AsyncSession, principal: Principal, class_id: str, *, family: bool = True
) -> tuple[ClassFacts, list[str] | None]:
    """The class if the caller may see it: staff of the school, the bureau of
    its region, or (``family``) a guardian or student of the class. Returns the
    caller's children in the class for family callers, else None."""
    facts = await class_facts(session, class_id)
    if facts is None:
        raise not_found("班级不存在。")
    if is_staff(principal, facts.school_id) or is_oversight(principal, facts.region_id):
        return facts, None
    if family:
        children = await family_students(session, principal, class_id)
        if children:
            return facts, children
    raise not_found("班级不存在。")


# ---------------------------------------------------------------- refusals


class Refused(Exception):
    def __init__(self, verdict: rules.Verdict) -> None:
        super().__init__(verdict.detail)
        self.verdict = verdict


@dataclass(frozen=True)
class Attempt:
    action: str
    facts: ClassFacts
    actor_id: str | None
    day: dt.date
    subject: str | None
    minutes: int | None


def problem_of(verdict: rules.Verdict) -> Problem:
    assert verdict.rule is not None
    extensions: dict[str, Any] = {}
    if verdict.limit is not None:
        extensions["limit"] = verdict.limit
    if verdict.used is not None:
        extensions["used"] = verdict.used
    extensions.update(verdict.extras)
    return rule_violation(verdict.rule, verdict.detail, **extensions)


async def record_refusal(db: Database, attempt: Attempt, verdict: rules.Verdict) -> None:
    """HW-08: in a transaction of its own, after the refused write rolled back."""
    try:
        async with db.transaction() as session:
            session.add(
                Refusal(
                    action=attempt.action,
                    rule=verdict.rule or "",
                    region_id=attempt.facts.region_id,
                    school_id=attempt.facts.school_id,
                    class_id=attempt.facts.id,
                    grade=attempt.facts.grade,
                    day=attempt.day,
                    teacher_id=attempt.actor_id,
                    subject=attempt.subject,
                    minutes=attempt.minutes,
                    limit_minutes=verdict.limit,
                    used_minutes=verdict.used,
                    detail=verdict.detail,
                )
            )
    except Exception as exc:  # the refusal still answers; the record is best effort
        log.warning("refusal_not_recorded", rule=verdict.rule, error=repr(exc))


async def refuse(db: Database, attempt: Attempt, verdict: rules.Verdict) -> NoReturn:
    await record_refusal(db, attempt, verdict)
    raise problem_of(verdict)


async def refuse_if(db: Database, attempt: Attempt, verdict: rules.Verdict) -> None:
    if not verdict.ok:
        await refuse(db, attempt, verdict)


# ---------------------------------------------------------------- counters


def _insert(session: AsyncSession) -> Any:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return pg_insert if dialect == "postgresql" else sqlite_insert


async def _ensure_row(session: AsyncSession, table: Table, values: dict[str, Any]) -> None:
    statement = _insert(session)(table).values(**values).on_conflict_do_nothing()
    await session.execute(statement)


def _key_clause(table: Table, keys: Mapping[str, Any]) -> Any:
    return and_(*(table.c[k] == v for k, v in keys.items()))


async def _add(
    session: AsyncSession, table: Table, keys: Mapping[str, Any], delta: int, limit: int | None
) -> bool:
    """``used += delta``; with ``limit``, only while ``used + delta <= limit``
    (one atomic, guarded UPDATE: concurrent writers re-check the condition on
    the committed row, on PostgreSQL as on SQLite)."""
    statement = update(table).where(_key_clause(table, keys)).values(used=table.c.used + delta)
    if limit is not None:
        statement = statement.where(table.c.used + delta <= limit)
    result = await session.execute(statement)
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def _used(session: AsyncSession, table: Table, keys: Mapping[str, Any]) -> int:
    value = await session.scalar(select(table.c.used).where(_key_clause(table, keys)))
    return int(value or 0)


@dataclass(frozen=True)
class Hold:
    """Counted minutes an assignment holds on a class day for a subject."""

    day: dt.date
    subject: str
    minutes: int


async def move_usage(
    session: AsyncSession,
    facts: ClassFacts,
    old: Hold | None,
    new: Hold | None,
    new_rule: rules.DayRule | None,
    quotas: Mapping[str, int],
) -> None:
    """Release ``old`` and take ``new`` on the class and subject counters.

    Rows are touched in one global order (class rows by day, then subject rows
    by day and subject) so concurrent transactions cannot deadlock. Increases
    are guarded (HW-02/HW-04 class limit, HW-03 subject quota); a failed guard
    raises ``Refused`` and the caller's transaction rolls back.
    """
    class_changes: dict[dt.date, list[int]] = defaultdict(lambda: [0, 0])
    subject_changes: dict[tuple[dt.date, str], list[int]] = defaultdict(lambda: [0, 0])
    if old is not None and old.minutes:
        class_changes[old.day][0] += old.minutes
        subject_changes[(old.day, old.subject)][0] += old.minutes
    if new is not None and new.minutes:
        class_changes[new.day][1] += new.minutes
        subject_changes[(new.day, new.subject)][1] += new.minutes

    for day in sorted(class_changes):
        before, after = class_changes[day]
        delta = after - before
        keys = {"class_id": facts.id, "day": day}
        if delta == 0:
            continue
        if delta < 0:
            await _add(session, CLASS_USAGE, keys, delta, None)
            continue
        assert new_rule is not None and new_rule.day == day
        await _ensure_row(session, CLASS_USAGE, {**keys, "school_id": facts.school_id, "used": 0})
        if not await _add(session, CLASS_USAGE, keys, delta, new_rule.limit):
            used = await _used(session, CLASS_USAGE, keys) - before
            raise Refused(rules.limit_exceeded(new_rule, after, used))

    for day, subject in sorted(subject_changes):
        before, after = subject_changes[(day, subject)]
        delta = after - before
        keys = {"class_id": facts.id, "day": day, "subject": subject}
        if delta == 0:
            continue
        if delta < 0:
            await _add(session, SUBJECT_USAGE, keys, delta, None)
            continue
        await _ensure_row(session, SUBJECT_USAGE, {**keys, "used": 0})
        quota = quotas.get(subject, 0) if quotas else None
        if not await _add(session, SUBJECT_USAGE, keys, delta, quota):
            used = await _used(session, SUBJECT_USAGE, keys) - before
            raise Refused(rules.subject_quota_exceeded(subject, after, used, quota or 0, day))


async def class_quotas(session: AsyncSession, class_id: str) -> dict[str, int]:
    rows = await session.execute(
        select(SubjectQuota.subject, SubjectQuota.minutes).where(SubjectQuota.class_id == class_id)
    )
    return {subject: minutes for subject, minutes in rows}


async def usage_of(
    session: AsyncSession, facts: ClassFacts, rule: rules.DayRule, quotas: Mapping[str, int]
) -> schemas.Usage:
    used = await _used(session, CLASS_USAGE, {"class_id": facts.id, "day": rule.day})
    subjects = {
        subject: minutes
        for subject, minutes in await session.execute(
            select(SUBJECT_USAGE.c.subject, SUBJECT_USAGE.c.used).where(
                SUBJECT_USAGE.c.class_id == facts.id,
                SUBJECT_USAGE.c.day == rule.day,
                SUBJECT_USAGE.c.used > 0,
            )
        )
    }
    return schemas.Usage(
        class_id=facts.id,
        date=rule.day,
        day_kind=rule.day_kind,
        rule=rule.rule,
        limit=rule.limit,
        used=used,
        remaining=max(rule.limit - used, 0),
        no_written_homework=rule.ban_label if rule.ban else None,
        subjects=subjects,
        quotas=dict(quotas),
    )


# ---------------------------------------------------------------- assignments


def assignment_out(a: Assignment) -> schemas.AssignmentOut:
    return schemas.AssignmentOut(
        id=a.id,
        school_id=a.school_id,
        class_id=a.class_id,
        grade=a.grade,
        date=a.day,
        subject=a.subject,
        content=a.content,
        kind=a.kind,  # type: ignore[arg-type]
        layer=a.layer,  # type: ignore[arg-type]
        location=a.location,  # type: ignore[arg-type]
        estimated_minutes=a.estimated_minutes,
        counts_toward_limit=a.counted_minutes > 0,
        teacher_id=a.teacher_id,
        target_student_ids=list(a.target_student_ids),
        acknowledged_warnings=list(a.acknowledged_warnings),
        status=a.status,  # type: ignore[arg-type]
        version=a.version,
        created_at=a.created_at,
        updated_at=a.updated_at,
        withdrawn_at=a.withdrawn_at,
    )


def _snapshot(a: Assignment) -> dict[str, Any]:
    return assignment_out(a).model_dump(mode="json")


def _facts_event(a: Assignment) -> dict[str, Any]:
    return {
        "id": a.id,
        "school_id": a.school_id,
        "class_id": a.class_id,
        "grade": a.grade,
        "date": a.day,
        "subject": a.subject,
        "kind": a.kind,
        "layer": a.layer,
        "location": a.location,
        "estimated_minutes": a.estimated_minutes,
    }


async def _check_targets(session: AsyncSession, facts: ClassFacts, targets: list[str]) -> None:
    if not targets:
        return
    st = roster.students
    found = set(
        await session.scalars(
            select(st.c.id).where(
                st.c.id.in_(targets), st.c.class_id == facts.id, st.c.active.is_(True)
            )
        )
    )
    missing = [t for t in targets if t not in found]
    if missing:
        raise Problem(
            422,
            "个性化作业的学生须是本班在读学生。",
            errors=[
                FieldError(field="body.target_student_ids", message=f"本班无此学生：{t}")
                for t in missing
            ],
        )


@dataclass(frozen=True)
class Draft:
    """An assignment as it would be after publishing or editing."""

    day: dt.date
    subject: str
    content: str
    kind: str
    layer: str
    location: str
    estimated_minutes: int
    target_student_ids: list[str]
    flags: dict[str, bool]
    acknowledged: list[str]

    @property
    def counted(self) -> int:
        if rules.counts_toward_daily_limit(self.kind, self.layer, self.location):
            return self.estimated_minutes
        return 0


async def _screen(
    db: Database,
    attempt: Attempt,
    draft: Draft,
    rule: rules.DayRule,
    profile: PolicyProfile,
    used_now: int,
) -> list[str]:
    """HW-05 flags, HW-04 banned days, HW-05 content warnings, in that order.
    Returns the (acknowledged) warnings to store."""
    await refuse_if(db, attempt, rules.check_forbidden_flags(draft.flags))
    await refuse_if(
        db, attempt, rules.check_written_homework_day(draft.kind, draft.location, rule, used_now)
    )
    warnings = rules.screen_content(draft.content, profile)
    await refuse_if(db, attempt, rules.check_warnings_acknowledged(warnings, draft.acknowledged))
    return list(warnings)


async def publish(
    ctx: ServiceContext, principal: Principal, class_id: str, data: schemas.AssignmentIn
) -> schemas.AssignmentReply:
    """HW-01..HW-05: publish one assignment for a class and a date."""
    teacher_id = principal.person_id
    async with ctx.db.read() as session:
        facts = await class_facts(session, class_id)
        if facts is None or not teacher_of(principal, facts):
            raise not_found("班级不存在。")
        if not facts.teaches(teacher_id, data.subject):
            raise Problem(403, f"您不是本班「{data.subject}」的任课教师，不能发布该学科作业。")
        await _check_targets(session, facts, data.target_student_ids)
        declared = await declared_reason(session, facts.school_id, data.date)
        evening = await evening_study_on(session, facts.id, data.date)
        calendar = await calendar_for(session, ctx, facts.region_id, facts.profile_id)
        used_now = await _used(session, CLASS_USAGE, {"class_id": facts.id, "day": data.date})
    profile = class_profile(ctx, facts, data.date)
    rule = _day_rule(facts, profile, calendar, data.date, declared, evening)
    draft = Draft(
        day=data.date,
        subject=data.subject,
        content=data.content,
        kind=data.kind,
        layer=data.layer,
        location=data.location,
        estimated_minutes=data.estimated_minutes,
        target_student_ids=list(data.target_student_ids),
        flags=data.flags.model_dump(),
        acknowledged=list(data.acknowledged_warnings),
    )
    attempt = Attempt("publish", facts, teacher_id, data.date, data.subject, data.estimated_minutes)
    warnings = await _screen(ctx.db, attempt, draft, rule, profile, used_now)
    try:
        async with ctx.db.transaction() as session:
            quotas = await class_quotas(session, facts.id)
            hold = Hold(draft.day, draft.subject, draft.counted) if draft.counted else None
            await move_usage(session, facts, None, hold, rule, quotas)
            now = utcnow()
            a = Assignment(
                id=new_id(),
                school_id=facts.school_id,
                class_id=facts.id,
                grade=facts.grade,
                day=draft.day,
                subject=draft.subject,
                content=draft.content,
                kind=draft.kind,
                layer=draft.layer,
                location=draft.location,
                estimated_minutes=draft.estimated_minutes,
                counted_minutes=draft.counted,
                teacher_id=teacher_id or principal.subject,
                target_student_ids=draft.target_student_ids,
                acknowledged_warnings=warnings,
                warning_count=len(warnings),
                status="published",
                version=1,
                created_at=now,
                updated_at=now,
                withdrawn_at=None,
            )
            session.add(a)
            await session.flush()
            session.add(
                AssignmentRevision(
                    assignment_id=a.id,
                    version=1,
                    action="published",
                    actor_id=principal.person_id or principal.subject,
                    reason=None,
                    snapshot=_snapshot(a),
                    at=now,
                )
            )
            await emit(session, ev.AssignmentPublished(**_facts_event(a)))
            if await _alert_open(session, facts.id):
                # The window may have moved on since the last report (HW-06).
                await evaluate_burden(session, ctx, facts)
            usage = await usage_of(session, facts, rule, quotas)
    except Refused as refused:
        await refuse(ctx.db, attempt, refused.verdict)
    return schemas.AssignmentReply(assignment=assignment_out(a), usage=usage)


def may_manage(principal: Principal, facts: ClassFacts, a: Assignment) -> bool:
    """The publisher, or the class's head teacher."""
    if not (principal.has_role(*TEACHING) and principal.has_tenant("school", facts.school_id)):
        return False
    return principal.person_id is not None and principal.person_id in (
        a.teacher_id,
        facts.head_teacher_id,
    )


async def _managed(
    session: AsyncSession, principal: Principal, assignment_id: str
) -> tuple[Assignment, ClassFacts]:
    a = await session.get(Assignment, assignment_id)
    facts = await class_facts(session, a.class_id) if a is not None else None
    if a is None or facts is None or a.status != "published" or not may_manage(principal, facts, a):
        raise not_found("作业不存在。")
    return a, facts


async def edit(
    ctx: ServiceContext, principal: Principal, assignment_id: str, patch: schemas.AssignmentPatch
) -> schemas.AssignmentReply:
    """HW-01: change a published assignment; the checks run again on the result."""
    changes = patch.model_dump(exclude_unset=True, exclude={"reason", "expected_version"})
    async with ctx.db.read() as session:
        a, facts = await _managed(session, principal, assignment_id)
        if patch.expected_version is not None and patch.expected_version != a.version:
            raise conflict("作业已被修改，请刷新后重试。", current_version=a.version)
        draft = Draft(
            day=changes.get("date", a.day),
            subject=changes.get("subject", a.subject),
            content=changes.get("content", a.content),
            kind=changes.get("kind", a.kind),
            layer=changes.get("layer", a.layer),
            location=changes.get("location", a.location),
            estimated_minutes=changes.get("estimated_minutes", a.estimated_minutes),
            target_student_ids=list(changes.get("target_student_ids", a.target_student_ids)),
            flags=changes.get("flags") or {name: False for name in rules.FORBIDDEN_FLAGS},
            acknowledged=list(changes.get("acknowledged_warnings", a.acknowledged_warnings)),
        )
        if draft.subject != a.subject and not facts.teaches(principal.person_id, draft.subject):
            raise Problem(403, f"您不是本班「{draft.subject}」的任课教师，不能改为该学科。")
        try:
            schemas.check_targets(draft.layer, draft.target_student_ids)
        except ValueError as exc:
            raise Problem(
                422,
                str(exc),
                errors=[FieldError(field="body.target_student_ids", message=str(exc))],
            ) from None
        await _check_targets(session, facts, draft.target_student_ids)
        declared = await declared_reason(session, facts.school_id, draft.day)
        evening = await evening_study_on(session, facts.id, draft.day)
        calendar = await calendar_for(session, ctx, facts.region_id, facts.profile_id)
        used_now = await _used(session, CLASS_USAGE, {"class_id": facts.id, "day": draft.day})
        version, old_day = a.version, a.day
        old_hold = Hold(a.day, a.subject, a.counted_minutes) if a.counted_minutes else None
    profile = class_profile(ctx, facts, draft.day)
    rule = _day_rule(facts, profile, calendar, draft.day, declared, evening)
    attempt = Attempt(
        "edit", facts, principal.person_id, draft.day, draft.subject, draft.estimated_minutes
    )
    warnings = await _screen(ctx.db, attempt, draft, rule, profile, used_now)
    try:
        async with ctx.db.transaction() as session:
            now = utcnow()
            result = await session.execute(
                update(ASSIGNMENTS)
                .where(
                    ASSIGNMENTS.c.id == assignment_id,
                    ASSIGNMENTS.c.version == version,
                    ASSIGNMENTS.c.status == "published",
                )
                .values(
                    day=draft.day,
                    subject=draft.subject,
                    content=draft.content,
                    kind=draft.kind,
                    layer=draft.layer,
                    location=draft.location,
                    estimated_minutes=draft.estimated_minutes,
                    counted_minutes=draft.counted,
                    target_student_ids=draft.target_student_ids,
                    acknowledged_warnings=warnings,
                    warning_count=len(warnings),
                    version=version + 1,
                    updated_at=now,
                )
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise conflict("作业已被修改或撤回，请刷新后重试。")
            if draft.day != old_day:
                await session.execute(
                    update(TimeReport)
                    .where(TimeReport.assignment_id == assignment_id)
                    .values(day=draft.day)
                )
            quotas = await class_quotas(session, facts.id)
            new_hold = Hold(draft.day, draft.subject, draft.counted) if draft.counted else None
            await move_usage(session, facts, old_hold, new_hold, rule, quotas)
            a = await session.get(Assignment, assignment_id, populate_existing=True)
            assert a is not None
            session.add(
                AssignmentRevision(
                    assignment_id=a.id,
                    version=a.version,
                    action="edited",
                    actor_id=principal.person_id or principal.subject,
                    reason=patch.reason,
                    snapshot=_snapshot(a),
                    at=now,
                )
            )
            await emit(session, ev.AssignmentRevised(**_facts_event(a), version=a.version))
            if old_hold is not None or new_hold is not None:
                await evaluate_burden(session, ctx, facts)
            usage = await usage_of(session, facts, rule, quotas)
    except Refused as refused:
        await refuse(ctx.db, attempt, refused.verdict)
    return schemas.AssignmentReply(assignment=assignment_out(a), usage=usage)


async def withdraw(
    ctx: ServiceContext, principal: Principal, assignment_id: str, reason: str
) -> schemas.AssignmentReply:
    """HW-01: withdraw a published assignment (its history stays)."""
    async with ctx.db.read() as session:
        a, facts = await _managed(session, principal, assignment_id)
        declared = await declared_reason(session, facts.school_id, a.day)
        evening = await evening_study_on(session, facts.id, a.day)
        calendar = await calendar_for(session, ctx, facts.region_id, facts.profile_id)
        hold = Hold(a.day, a.subject, a.counted_minutes) if a.counted_minutes else None
        day = a.day
    profile = class_profile(ctx, facts, day)
    rule = _day_rule(facts, profile, calendar, day, declared, evening)
    async with ctx.db.transaction() as session:
        now = utcnow()
        result = await session.execute(
            update(ASSIGNMENTS)
            .where(ASSIGNMENTS.c.id == assignment_id, ASSIGNMENTS.c.status == "published")
            .values(status="withdrawn", withdrawn_at=now, updated_at=now, version=a.version + 1)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            raise not_found("作业不存在。")
        await move_usage(session, facts, hold, None, None, {})
        a = await session.get(Assignment, assignment_id, populate_existing=True)
        assert a is not None
        session.add(
            AssignmentRevision(
                assignment_id=a.id,
                version=a.version,
                action="withdrawn",
                actor_id=principal.person_id or principal.subject,
                reason=reason,
                snapshot=_snapshot(a),
                at=now,
            )
        )
        await emit(
            session,
            ev.AssignmentWithdrawn(
                id=a.id, school_id=a.school_id, class_id=a.class_id, date=a.day, subject=a.subject
            ),
        )
        if hold is not None:
            await evaluate_burden(session, ctx, facts)
        quotas = await class_quotas(session, facts.id)
        usage = await usage_of(session, facts, rule, quotas)
    return schemas.AssignmentReply(assignment=assignment_out(a), usage=usage)


async def class_usage(
    ctx: ServiceContext, principal: Principal, class_id: str, day: dt.date
) -> schemas.Usage:
    async with ctx.db.read() as session:
        facts, _ = await visible_class(session, principal, class_id)
        declared = await declared_reason(session, facts.school_id, day)
        evening = await evening_study_on(session, facts.id, day)
        calendar = await calendar_for(session, ctx, facts.region_id, facts.profile_id)
        rule = _day_rule(facts, class_profile(ctx, facts, day), calendar, day, declared, evening)
        quotas = await class_quotas(session, facts.id)
        return await usage_of(session, facts, rule, quotas)


async def class_assignments(
    ctx: ServiceContext,
    principal: Principal,
    class_id: str,
    date_from: dt.date,
    date_to: dt.date,
    include_withdrawn: bool,
) -> list[schemas.AssignmentOut]:
    """HW-01: the class's list for staff, the bureau, and the class's families."""
    async with ctx.db.read() as session:
        _, children = await visible_class(session, principal, class_id)
        query = (
            select(Assignment)
            .where(
                Assignment.class_id == class_id,
                Assignment.day >= date_from,
                Assignment.day <= date_to,
            )
            .order_by(Assignment.day, Assignment.subject, Assignment.created_at)
        )
        if not include_withdrawn or children is not None:
            query = query.where(Assignment.status == "published")
        items = [assignment_out(a) for a in await session.scalars(query)]
    if children is None:
        return items
    # Families see personalized homework only for their own children, and no
    # other child's id.
    mine = set(children)
    visible = []
    for item in items:
        if item.layer == "personalized":
            targets = [t for t in item.target_student_ids if t in mine]
            if not targets:
                continue
            item = item.model_copy(update={"target_student_ids": targets})
        visible.append(item)
    return visible


async def assignment_history(
    ctx: ServiceContext, principal: Principal, assignment_id: str
) -> list[schemas.RevisionOut]:
    async with ctx.db.read() as session:
        a = await session.get(Assignment, assignment_id)
        if a is None:
            raise not_found("作业不存在。")
        await visible_class(session, principal, a.class_id, family=False)
        rows = await session.scalars(
            select(AssignmentRevision)
            .where(AssignmentRevision.assignment_id == assignment_id)
            .order_by(AssignmentRevision.version)
        )
        return [
            schemas.RevisionOut(
                version=r.version,
                action=r.action,
                actor_id=r.actor_id,
                reason=r.reason,
                at=r.at,
                snapshot=r.snapshot,
            )
            for r in rows
        ]


async def my_classes(ctx: ServiceContext, principal: Principal) -> list[schemas.ClassRef]:
    """The classes of a guardian's children (or a student's own class)."""
    if principal.person_id is None or not principal.has_role("parent", "student"):
        return []
    st, c, g = roster.students, roster.classes, roster.guardianships
    conditions = []
    if principal.has_role("parent"):
        conditions.append(
            st.c.id.in_(select(g.c.student_id).where(g.c.guardian_id == principal.person_id))
        )
    if principal.has_role("student"):
        conditions.append(st.c.id == principal.person_id)
    async with ctx.db.read() as session:
        rows = await session.execute(
            select(st.c.id, c.c.id, c.c.school_id, c.c.name, c.c.grade)
            .join(c, c.c.id == st.c.class_id)
            .where(or_(*conditions))
            .order_by(c.c.id)
        )
        by_class: dict[str, schemas.ClassRef] = {}
        for student_id, class_id, school_id, name, grade in rows:
            ref = by_class.setdefault(
                class_id,
                schemas.ClassRef(
                    class_id=class_id,
                    school_id=school_id,
                    class_name=name,
                    grade=grade,
                    student_ids=[],
                ),
            )
            ref.student_ids.append(student_id)
    return list(by_class.values())


# ---------------------------------------------------------------- quotas (HW-03)


async def get_quotas(ctx: ServiceContext, principal: Principal, class_id: str) -> schemas.QuotasOut:
    async with ctx.db.read() as session:
        facts, _ = await visible_class(session, principal, class_id)
        quotas = await class_quotas(session, class_id)
    profile = class_profile(ctx, facts, local_today())
    assert facts.school_system is not None
    limit = profile.homework.daily_limit_minutes.for_band(
        grade_band(facts.grade, facts.school_system)  # type: ignore[arg-type]
    )
    return schemas.QuotasOut(
        class_id=class_id, limit=limit, total=sum(quotas.values()), quotas=quotas
    )


async def set_quotas(
    ctx: ServiceContext, principal: Principal, class_id: str, data: schemas.QuotasIn
) -> schemas.QuotasOut:
    """HW-03: the head teacher of the class sets per-subject daily quotas."""
    today = local_today()
    async with ctx.db.read() as session:
        facts = await class_facts(session, class_id)
    if (
        facts is None
        or not principal.has_role("head_teacher")
        or not principal.has_tenant("school", facts.school_id)
        or principal.person_id is None
        or principal.person_id != facts.head_teacher_id
    ):
        raise not_found("班级不存在。")
    quotas = {q.subject: q.minutes for q in data.quotas}
    if facts.subject_teachers:
        unknown = [s for s in quotas if s not in facts.subjects]
        if unknown:
            raise Problem(
                422,
                "配额的学科须是本班开设的学科。",
                errors=[
                    FieldError(field="body.quotas", message=f"本班没有学科：{s}") for s in unknown
                ],
            )
    profile = class_profile(ctx, facts, today)
    assert facts.school_system is not None
    verdict = rules.check_quota_plan(quotas, facts.grade, facts.school_system, profile)  # type: ignore[arg-type]
    if not verdict.ok:
        attempt = Attempt("quotas", facts, principal.person_id, today, None, verdict.used)
        await refuse(ctx.db, attempt, verdict)
    async with ctx.db.transaction() as session:
        await session.execute(delete(SubjectQuota).where(SubjectQuota.class_id == class_id))
        for subject, minutes in quotas.items():
            session.add(
                SubjectQuota(
                    class_id=class_id,
                    subject=subject,
                    minutes=minutes,
                    set_by=principal.person_id,
                    updated_at=utcnow(),
                )
            )
    limit = profile.homework.daily_limit_minutes.for_band(
        grade_band(facts.grade, facts.school_system)  # type: ignore[arg-type]
    )
    return schemas.QuotasOut(
        class_id=class_id, limit=limit, total=sum(quotas.values()), quotas=quotas
    )


# ---------------------------------------------------------------- evening self-study (HW-02)


def _evening_out(
    ctx: ServiceContext, facts: ClassFacts, weekdays: list[int]
) -> schemas.EveningStudyOut:
    profile = class_profile(ctx, facts, local_today())
    assert facts.school_system is not None
    band = grade_band(facts.grade, facts.school_system)  # type: ignore[arg-type]
    return schemas.EveningStudyOut(
        class_id=facts.id,
        weekdays=weekdays,
        written_homework_stays_at_school=bool(weekdays)
        and rules.evening_study_keeps_written_at_school(band, "school_day", True, profile),
    )


async def get_evening_study(
    ctx: ServiceContext, principal: Principal, class_id: str
) -> schemas.EveningStudyOut:
    async with ctx.db.read() as session:
        facts, _ = await visible_class(session, principal, class_id)
        weekdays = await evening_study_weekdays(session, class_id)
    return _evening_out(ctx, facts, weekdays)


async def set_evening_study(
    ctx: ServiceContext, principal: Principal, class_id: str, weekdays: list[int]
) -> schemas.EveningStudyOut:
    """HW-02 (004 §二.2): the school admin records the weekdays a junior class
    attends evening self-study; an empty list removes it."""
    async with ctx.db.read() as session:
        facts = await class_facts(session, class_id)
    if facts is None or not _school_admin_of(principal, facts.school_id):
        raise not_found("班级不存在。")
    class_profile(ctx, facts, local_today())  # the roster copy is complete
    assert facts.school_system is not None
    if weekdays and grade_band(facts.grade, facts.school_system) != "junior":  # type: ignore[arg-type]
        raise Problem(
            422,
            "晚自习只面向初中学生。",
            errors=[FieldError(field="body.weekdays", message=f"{facts.grade} 年级不是初中")],
        )
    async with ctx.db.transaction() as session:
        await session.execute(
            delete(EveningStudyClass).where(EveningStudyClass.class_id == class_id)
        )
        if weekdays:
            session.add(
                EveningStudyClass(
                    class_id=class_id,
                    school_id=facts.school_id,
                    weekdays=sorted(set(weekdays)),
                    set_by=principal.person_id or principal.subject,
                    updated_at=utcnow(),
                )
            )
    return _evening_out(ctx, facts, sorted(set(weekdays)))


# ---------------------------------------------------------------- declared days (HW-04)


def _school_admin_of(principal: Principal, school_id: str) -> bool:
    return principal.has_role("school_admin") and principal.has_tenant("school", school_id)


async def declare_no_written_day(
    ctx: ServiceContext, principal: Principal, school_id: str, day: dt.date, reason: str
) -> schemas.NoWrittenDayOut:
    """HW-04: a school admin declares a day without written homework."""
    if not _school_admin_of(principal, school_id):
        raise not_found("学校不存在。")
    async with ctx.db.read() as session:
        school = await school_facts(session, school_id)
    if school is None:
        raise not_found("学校不存在。")
    profile = profile_for(ctx, school.region_id, school.profile_id, day)
    if not profile.homework.schools_may_declare_no_written_homework_days:
        raise rule_violation("HW-04", "本区域的政策不允许学校自设无书面作业日。")
    async with ctx.db.transaction() as session:
        row = await session.get(NoWrittenHomeworkDay, (school_id, day))
        if row is None:
            session.add(
                NoWrittenHomeworkDay(
                    school_id=school_id,
                    day=day,
                    reason=reason,
                    declared_by=principal.person_id or principal.subject,
                    created_at=utcnow(),
                )
            )
        else:
            row.reason = reason
        existing = await session.scalar(
            select(func.count())
            .select_from(Assignment)
            .where(
                Assignment.school_id == school_id,
                Assignment.day == day,
                Assignment.status == "published",
                Assignment.kind == "written",
                Assignment.location == "at_home",
            )
        )
    return schemas.NoWrittenDayOut(
        school_id=school_id, date=day, reason=reason, existing_written_assignments=existing or 0
    )


async def remove_no_written_day(
    ctx: ServiceContext, principal: Principal, school_id: str, day: dt.date
) -> None:
    if not _school_admin_of(principal, school_id):
        raise not_found("学校不存在。")
    async with ctx.db.transaction() as session:
        row = await session.get(NoWrittenHomeworkDay, (school_id, day))
        if row is None:
            raise not_found("该日不是学校设定的无书面作业日。")
        await session.delete(row)


async def list_no_written_days(
    ctx: ServiceContext, principal: Principal | None, school_id: str
) -> list[schemas.NoWrittenDayOut]:
    async with ctx.db.read() as session:
        if await school_facts(session, school_id) is None:
            raise not_found("学校不存在。")
        rows = await session.scalars(
            select(NoWrittenHomeworkDay)
            .where(NoWrittenHomeworkDay.school_id == school_id)
            .order_by(NoWrittenHomeworkDay.day)
        )
        return [
            schemas.NoWrittenDayOut(school_id=r.school_id, date=r.day, reason=r.reason)
            for r in rows
        ]


# ---------------------------------------------------------------- actual time (HW-06)


async def _may_report(session: AsyncSession, principal: Principal, student_id: str) -> str | None:
    """The reporter's role if the caller is the student or one of their guardians."""
    if principal.person_id is None:
        return None
    if principal.has_role("student") and principal.person_id == student_id:
        return "student"
    if principal.has_role("parent"):
        g = roster.guardianships
        linked = await session.scalar(
            select(g.c.student_id).where(
                g.c.guardian_id == principal.person_id, g.c.student_id == student_id
            )
        )
        if linked is not None:
            return "parent"
    return None


async def report_time(
    ctx: ServiceContext, principal: Principal, assignment_id: str, student_id: str, minutes: int
) -> schemas.ReportOut:
    """HW-06: one report per student and assignment, editable the same local day."""
    today = local_today()
    async with ctx.db.read() as session:
        a = await session.get(Assignment, assignment_id)
        role = await _may_report(session, principal, student_id)
        st = roster.students
        student = (
            (await session.execute(select(st).where(st.c.id == student_id))).mappings().first()
        )
        if (
            a is None
            or a.status != "published"
            or role is None
            or student is None
            or student["class_id"] != a.class_id
            or (a.layer == "personalized" and student_id not in a.target_student_ids)
        ):
            raise not_found("作业不存在。")
        facts = await class_facts(session, a.class_id)
        if facts is None:
            raise not_found("作业不存在。")
        counted, day = a.counted_minutes, a.day
    if day > today:
        raise Problem(
            422,
            "作业日期未到，不能反馈实际用时。",
            errors=[FieldError(field="path.assignment_id", message=f"作业日期为 {day}")],
        )
    async with ctx.db.transaction() as session:
        now = utcnow()
        inserted = await session.execute(
            _insert(session)(TimeReport.__table__)
            .values(
                id=new_id(),
                assignment_id=assignment_id,
                class_id=facts.id,
                school_id=facts.school_id,
                day=day,
                student_id=student_id,
                minutes=minutes,
                reporter_id=principal.person_id or principal.subject,
                reporter_role=role,
                reported_on=today,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing()
        )
        report = await session.scalar(
            select(TimeReport)
            .where(TimeReport.assignment_id == assignment_id, TimeReport.student_id == student_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        assert report is not None
        if not inserted.rowcount:  # type: ignore[attr-defined]
            if not rules.report_editable(report.reported_on, today):
                raise conflict(
                    f"实际用时已于 {report.reported_on} 反馈，只能在反馈当天修改。",
                    reported_on=report.reported_on.isoformat(),
                )
            report.minutes = minutes
            report.reporter_id = principal.person_id or principal.subject
            report.reporter_role = role
            report.updated_at = now
        out = schemas.ReportOut(
            assignment_id=assignment_id,
            student_id=student_id,
            minutes=report.minutes,
            reported_on=report.reported_on,
            created_at=report.created_at,
            updated_at=report.updated_at,
        )
        if counted:
            await evaluate_burden(session, ctx, facts)
    return out


async def _alert_open(session: AsyncSession, class_id: str) -> bool:
    return (
        await session.scalar(
            select(BurdenState.open_alert_id).where(BurdenState.class_id == class_id)
        )
    ) is not None


async def evaluate_burden(
    session: AsyncSession,
    ctx: ServiceContext,
    facts: ClassFacts,
    as_of: dt.date | None = None,
) -> str | None:
    """HW-06: recompute the class's median actual daily load and open or close
    its alert; the state row is locked so an alert opens (and closes) once.

    The window is the last N school days (profile) up to ``as_of`` (default
    today, local date); a day without homework counts 0, an assignment nobody
    reported on counts its estimate. Returns the transition ("open", "close")
    or None.
    """
    if facts.school_system is None or facts.region_id is None:
        return None
    today = as_of or local_today()
    await _ensure_row(
        session,
        BurdenState.__table__,
        {"class_id": facts.id},  # type: ignore[arg-type]
    )
    state = await session.scalar(
        select(BurdenState)
        .where(BurdenState.class_id == facts.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert state is not None
    anchor = today
    calendar = await calendar_for(session, ctx, facts.region_id, facts.profile_id)
    profile = class_profile(ctx, facts, anchor)
    window = rules.school_days_window(
        calendar, anchor, profile.homework.burden_alert_window_school_days
    )
    limit = profile.homework.daily_limit_minutes.for_band(
        grade_band(facts.grade, facts.school_system)  # type: ignore[arg-type]
    )
    loads: dict[dt.date, float] = {}
    if window:
        rows = await session.execute(
            select(Assignment.id, Assignment.day, Assignment.counted_minutes, TimeReport.minutes)
            .outerjoin(TimeReport, TimeReport.assignment_id == Assignment.id)
            .where(
                Assignment.class_id == facts.id,
                Assignment.status == "published",
                Assignment.counted_minutes > 0,
                Assignment.day >= window[0],
                Assignment.day <= window[-1],
            )
        )
        per_assignment: dict[str, tuple[dt.date, int, list[int]]] = {}
        for aid, day, estimated, reported in rows:
            entry = per_assignment.setdefault(aid, (day, estimated, []))
            if reported is not None:
                entry[2].append(reported)
        loads = rules.daily_loads(per_assignment.values())
    assessment = rules.assess_burden(loads, window, limit)
    transition = rules.burden_transition(state.open_alert_id is not None, assessment)
    now = utcnow()
    state.evaluated_at = now
    state.evaluated_for = anchor
    if transition is None or not window:
        return None
    payload = {
        "school_id": facts.school_id,
        "region_id": facts.region_id,
        "class_id": facts.id,
        "grade": facts.grade,
        "median_minutes": assessment.median_minutes,
        "limit_minutes": limit,
        "window_start": window[0],
        "window_end": window[-1],
        "window_school_days": len(window),
    }
    if transition == "open":
        alert = BurdenAlert(
            id=new_id(),
            class_id=facts.id,
            school_id=facts.school_id,
            region_id=facts.region_id,
            grade=facts.grade,
            status="open",
            limit_minutes=limit,
            opened_at=now,
            open_median_minutes=assessment.median_minutes,
            open_window_start=window[0],
            open_window_end=window[-1],
        )
        session.add(alert)
        state.open_alert_id = alert.id
        await emit(session, ev.BurdenAlertOpened(alert_id=alert.id, **payload))
        log.info("burden_alert_opened", class_id=facts.id, median=assessment.median_minutes)
        return transition
    assert state.open_alert_id is not None
    alert_row = await session.get(BurdenAlert, state.open_alert_id)
    state.open_alert_id = None
    if alert_row is not None:
        alert_row.status = "closed"
        alert_row.closed_at = now
        alert_row.close_median_minutes = assessment.median_minutes
        alert_row.close_window_start = window[0]
        alert_row.close_window_end = window[-1]
        await emit(session, ev.BurdenAlertClosed(alert_id=alert_row.id, **payload))
        log.info("burden_alert_closed", class_id=facts.id, median=assessment.median_minutes)
    return transition


@dataclass(frozen=True)
class RecheckResult:
    as_of: dt.date
    checked: int
    opened: int
    closed: int


async def _recheck_candidates(ctx: ServiceContext, as_of: dt.date) -> list[str]:
    """Classes whose burden may have changed on ``as_of``: those with an open
    alert, and those with counted homework in their region's window ending
    ``as_of`` (a class without any has a median of 0 and cannot open one);
    minus those already evaluated for ``as_of`` (by a report or a replica)."""
    s, r = roster.schools, roster.regions
    async with ctx.db.read() as session:
        regions = (
            await session.execute(
                select(s.c.region_id, r.c.profile_id)
                .join(r, r.c.id == s.c.region_id, isouter=True)
                .where(s.c.region_id.is_not(None))
                .distinct()
            )
        ).all()
        starts: dict[str, dt.date] = {}
        for region_id, profile_id in regions:
            try:
                profile = ctx.policies.profile(profile_id or region_id, on=as_of)
            except UnknownRegionError:
                continue
            calendar = await calendar_for(session, ctx, region_id, profile_id)
            window = rules.school_days_window(
                calendar, as_of, profile.homework.burden_alert_window_school_days
            )
            if window:
                starts[region_id] = window[0]
        candidates: set[str] = set(
            await session.scalars(
                select(BurdenState.class_id).where(BurdenState.open_alert_id.is_not(None))
            )
        )
        if starts:
            latest = (
                select(Assignment.class_id, s.c.region_id, func.max(Assignment.day))
                .join(s, s.c.id == Assignment.school_id)
                .where(
                    Assignment.status == "published",
                    Assignment.counted_minutes > 0,
                    Assignment.day >= min(starts.values()),
                    Assignment.day <= as_of,
                )
                .group_by(Assignment.class_id, s.c.region_id)
            )
            for class_id, region_id, last_day in await session.execute(latest):
                start = starts.get(region_id)
                if start is not None and last_day >= start:
                    candidates.add(class_id)
        done = set(
            await session.scalars(
                select(BurdenState.class_id).where(
                    BurdenState.evaluated_for >= as_of, BurdenState.class_id.in_(candidates)
                )
            )
        )
    return sorted(candidates - done)


async def recheck_burden(ctx: ServiceContext, as_of: dt.date | None = None) -> RecheckResult:
    """HW-06 daily re-check: the 7-school-day window slides with time, so an
    alert closes (or opens) without any new report.

    Idempotent and catch-up safe: each class is evaluated in its own
    transaction under the lock of its ``burden_states`` row, and an alert
    opens or closes only on a change of state, so replicas running at once,
    a restart running it twice, or a late run emit each transition once.
    """
    day = as_of or local_today()
    opened = closed = checked = 0
    for class_id in await _recheck_candidates(ctx, day):
        async with ctx.db.transaction() as session:
            facts = await class_facts(session, class_id)
            if facts is None:
                continue
            transition = await evaluate_burden(session, ctx, facts, day)
        checked += 1
        opened += transition == "open"
        closed += transition == "close"
    return RecheckResult(day, checked, opened, closed)


async def compare_actual(
    ctx: ServiceContext,
    principal: Principal,
    class_id: str,
    date_from: dt.date,
    date_to: dt.date,
) -> schemas.CompareOut:
    """HW-06: actual against estimated minutes per class, subject and teacher."""
    async with ctx.db.read() as session:
        await visible_class(session, principal, class_id, family=False)
        rows = (
            await session.execute(
                select(
                    Assignment.subject,
                    Assignment.teacher_id,
                    func.count(func.distinct(Assignment.id)),
                    func.count(TimeReport.id),
                    func.sum(Assignment.estimated_minutes),
                    func.sum(TimeReport.minutes),
                )
                .join(TimeReport, TimeReport.assignment_id == Assignment.id)
                .where(
                    Assignment.class_id == class_id,
                    Assignment.status == "published",
                    Assignment.day >= date_from,
                    Assignment.day <= date_to,
                )
                .group_by(Assignment.subject, Assignment.teacher_id)
                .order_by(Assignment.subject, Assignment.teacher_id)
            )
        ).all()

    def row(
        items: Iterable[tuple[Any, ...]], subject: str | None, teacher: str | None
    ) -> schemas.CompareRow:
        n_a = n_r = est = act = 0
        for _, _, assignments, reports, estimated, actual in items:
            n_a += int(assignments)
            n_r += int(reports)
            est += int(estimated or 0)
            act += int(actual or 0)
        return schemas.CompareRow(
            subject=subject,
            teacher_id=teacher,
            assignments=n_a,
            reports=n_r,
            estimated_minutes_avg=round(est / n_r, 1) if n_r else 0.0,
            actual_minutes_avg=round(act / n_r, 1) if n_r else 0.0,
            ratio=round(act / est, 3) if est else None,
        )

    subjects = sorted({r[0] for r in rows})
    teachers = sorted({r[1] for r in rows})
    return schemas.CompareOut(
        class_id=class_id,
        date_from=date_from,
        date_to=date_to,
        overall=row(rows, None, None),
        by_subject=[row([r for r in rows if r[0] == s], s, None) for s in subjects],
        by_teacher=[row([r for r in rows if r[1] == t], None, t) for t in teachers],
    )


# ---------------------------------------------------------------- publicity (HW-01, HW-07)


async def public_school_day(
    ctx: ServiceContext, school_id: str, day: dt.date
) -> schemas.PublicSchoolDay:
    """HW-01: a school's assignments for a day, public, without student names."""
    async with ctx.db.read() as session:
        school = await school_facts(session, school_id)
        if school is None:
            raise not_found("学校不存在。")
        c, t = roster.classes, roster.teachers
        classes = {
            row["id"]: row
            for row in (await session.execute(select(c).where(c.c.school_id == school_id)))
            .mappings()
            .all()
        }
        assignments = list(
            await session.scalars(
                select(Assignment)
                .where(
                    Assignment.school_id == school_id,
                    Assignment.day == day,
                    Assignment.status == "published",
                )
                .order_by(Assignment.grade, Assignment.class_id, Assignment.subject)
            )
        )
        names = dict(
            (
                await session.execute(
                    select(t.c.id, t.c.name).where(t.c.id.in_({a.teacher_id for a in assignments}))
                )
            ).all()
        )
        used = dict(
            (
                await session.execute(
                    select(CLASS_USAGE.c.class_id, CLASS_USAGE.c.used).where(
                        CLASS_USAGE.c.school_id == school_id, CLASS_USAGE.c.day == day
                    )
                )
            ).all()
        )
        declared = await declared_reason(session, school_id, day)
        evening = {
            class_id
            for class_id, weekdays in await session.execute(
                select(EveningStudyClass.class_id, EveningStudyClass.weekdays).where(
                    EveningStudyClass.school_id == school_id
                )
            )
            if day.isoweekday() in (weekdays or [])
        }
        calendar = await calendar_for(session, ctx, school.region_id, school.profile_id)
    profile = profile_for(ctx, school.region_id, school.profile_id, day)
    by_class: dict[str, schemas.PublicClassDay] = {}
    ban: str | None = None
    for a in assignments:
        klass = classes.get(a.class_id)
        entry = by_class.get(a.class_id)
        if entry is None:
            rule = rules.day_rule(
                day=day,
                grade=a.grade,
                school_system=school.school_system,  # type: ignore[arg-type]
                profile=profile,
                calendar=calendar,
                declared_no_written=declared,
                evening_study=a.class_id in evening,
            )
            if rule.ban is not None and rule.ban != rules.EVENING_STUDY:
                ban = rule.ban_label  # school-wide: a festival or a declared day
            entry = by_class[a.class_id] = schemas.PublicClassDay(
                class_id=a.class_id,
                class_name=klass["name"] if klass else "",
                grade=a.grade,
                limit=rule.limit,
                used=int(used.get(a.class_id, 0)),
                assignments=[],
            )
        entry.assignments.append(
            schemas.PublicAssignment(
                id=a.id,
                subject=a.subject,
                content=a.content,
                kind=a.kind,  # type: ignore[arg-type]
                layer=a.layer,  # type: ignore[arg-type]
                location=a.location,  # type: ignore[arg-type]
                estimated_minutes=a.estimated_minutes,
                teacher_name=names.get(a.teacher_id),
                personalized_students=len(a.target_student_ids),
            )
        )
    if ban is None:
        festival = calendar.no_written_homework_festival(
            day, profile.homework.no_written_homework_festivals
        )
        if festival is not None:
            ban = FESTIVAL_NAMES_ZH[festival]
        elif declared is not None and profile.homework.schools_may_declare_no_written_homework_days:
            ban = declared
    return schemas.PublicSchoolDay(
        school_id=school_id,
        school_name=school.name,
        date=day,
        no_written_homework=ban,
        classes=list(by_class.values()),
    )


async def weekly_summary(
    ctx: ServiceContext, school_id: str, any_day: dt.date
) -> schemas.WeeklySummary:
    """HW-07: per grade and subject, count and minutes of the week, and the trend."""
    monday, sunday = rules.week_bounds(any_day)
    last_monday = monday - dt.timedelta(days=7)
    async with ctx.db.read() as session:
        school = await school_facts(session, school_id)
        if school is None:
            raise not_found("学校不存在。")
        this_week = case((Assignment.day >= monday, 1), else_=0).label("this_week")
        rows = (
            await session.execute(
                select(
                    Assignment.grade,
                    Assignment.subject,
                    this_week,
                    func.count(),
                    func.sum(Assignment.estimated_minutes),
                )
                .where(
                    Assignment.school_id == school_id,
                    Assignment.status == "published",
                    Assignment.day >= last_monday,
                    Assignment.day <= sunday,
                )
                .group_by(Assignment.grade, Assignment.subject, this_week)
            )
        ).all()
        c = roster.classes
        classes = dict(
            (
                await session.execute(
                    select(c.c.grade, func.count())
                    .where(c.c.school_id == school_id)
                    .group_by(c.c.grade)
                )
            ).all()
        )
        calendar = await calendar_for(session, ctx, school.region_id, school.profile_id)
    school_days = sum(
        1 for i in range(7) if rules.is_homework_school_day(calendar, monday + dt.timedelta(days=i))
    )
    figures: dict[tuple[int, str], dict[str, int]] = defaultdict(
        lambda: {"count": 0, "minutes": 0, "last": 0}
    )
    for grade, subject, is_this_week, count, minutes in rows:
        entry = figures[(grade, subject)]
        if is_this_week:
            entry["count"] += int(count)
            entry["minutes"] += int(minutes or 0)
        else:
            entry["last"] += int(minutes or 0)
    out = []
    for (grade, subject), entry in sorted(figures.items()):
        n_classes = int(classes.get(grade, 0)) or 1
        out.append(
            schemas.WeeklyRow(
                grade=grade,
                subject=subject,
                assignments=entry["count"],
                total_minutes=entry["minutes"],
                classes=int(classes.get(grade, 0)),
                avg_daily_minutes=round(entry["minutes"] / n_classes / max(school_days, 1), 1),
                **rules.trend(entry["minutes"], entry["last"]),
            )
        )
    return schemas.WeeklySummary(
        school_id=school_id,
        school_name=school.name,
        week_start=monday,
        week_end=sunday,
        school_days=school_days,
        rows=out,
    )


# ---------------------------------------------------------------- oversight (HW-08)


@dataclass(frozen=True)
class ScopedSchool:
    id: str
    name: str
    region_id: str
    profile_id: str | None


async def oversight_scope(
    session: AsyncSession,
    principal: Principal,
    region_id: str | None = None,
    school_id: str | None = None,
) -> dict[str, ScopedSchool]:
    """Schools the caller oversees: the bureau's regions, or a school admin's schools."""
    regions = principal.tenant_ids("region") if principal.has_role(*OVERSIGHT) else set()
    schools = principal.tenant_ids("school") if principal.has_role("school_admin") else set()
    if not regions and not schools:
        raise Problem(403, "只有教育局或学校管理员可以查看作业监管数据。")
    s, r = roster.schools, roster.regions
    query = (
        select(s.c.id, s.c.name, s.c.region_id, r.c.profile_id)
        .join(r, r.c.id == s.c.region_id, isouter=True)
        .where(or_(s.c.region_id.in_(regions), s.c.id.in_(schools)))
        .order_by(s.c.id)
    )
    if region_id is not None:
        query = query.where(s.c.region_id == region_id)
    if school_id is not None:
        query = query.where(s.c.id == school_id)
    found = {
        row.id: ScopedSchool(row.id, row.name, row.region_id, row.profile_id)
        for row in await session.execute(query)
    }
    if school_id is not None and not found:
        raise not_found("学校不存在。")
    if region_id is not None and not found and region_id not in regions:
        raise not_found("区域不存在。")
    return found


def _histogram(per_class_day: Any) -> Any:
    """``(school, grade, minutes, class-days, sum)`` buckets of class-day loads
    (HW-08): one row per distinct value instead of one per class-day; the
    statistics are taken in ``rules.histogram_stats``."""
    d = per_class_day.subquery()
    value = func.round(cast(d.c.m, Numeric(12, 3)), 1)
    return select(d.c.school_id, d.c.grade, value, func.count(), func.sum(d.c.m)).group_by(
        d.c.school_id, d.c.grade, value
    )


def _f(value: Any) -> float | None:
    return None if value is None else round(float(value), 1)


async def oversight_report(
    ctx: ServiceContext,
    principal: Principal,
    date_from: dt.date,
    date_to: dt.date,
    region_id: str | None = None,
    school_id: str | None = None,
) -> schemas.OversightReport:
    """HW-08: per school, compliance, refusals by rule, daily minutes by grade
    (estimated and reported: mean and 90th percentile), burden alerts."""
    async with ctx.db.read() as session:
        scope = await oversight_scope(session, principal, region_id, school_id)
        ids = list(scope)
        published = dict(
            (
                await session.execute(
                    select(Assignment.school_id, func.count())
                    .where(
                        Assignment.school_id.in_(ids),
                        Assignment.day >= date_from,
                        Assignment.day <= date_to,
                    )
                    .group_by(Assignment.school_id)
                )
            ).all()
        )
        refusals: dict[str, dict[str, int]] = defaultdict(dict)
        for sid, rule, count in await session.execute(
            select(Refusal.school_id, Refusal.rule, func.count())
            .where(Refusal.school_id.in_(ids), Refusal.day >= date_from, Refusal.day <= date_to)
            .group_by(Refusal.school_id, Refusal.rule)
        ):
            refusals[sid][rule] = int(count)
        c = roster.classes
        # Estimated: the class-day counters (covering index, no table reads).
        estimated = await session.execute(
            _histogram(
                select(CLASS_USAGE.c.school_id, c.c.grade, CLASS_USAGE.c.used.label("m"))
                .join(c, c.c.id == CLASS_USAGE.c.class_id)
                .where(
                    CLASS_USAGE.c.school_id.in_(ids),
                    CLASS_USAGE.c.day >= date_from,
                    CLASS_USAGE.c.day <= date_to,
                    CLASS_USAGE.c.used > 0,
                )
            )
        )
        # Reported: on class-days with at least one report, each reported
        # assignment counts its mean report instead of its estimate; the others
        # keep their estimates, whose sum is the class-day counter. So the load
        # is ``used + sum(mean report - estimate)`` over the reported ones.
        # Driven from the reports (index on their school and assignment date).
        reported_assignments = (
            select(
                TimeReport.school_id,
                Assignment.grade,
                Assignment.class_id,
                TimeReport.day,
                (func.avg(TimeReport.minutes) - Assignment.counted_minutes).label("delta"),
            )
            .select_from(TimeReport)
            .join(Assignment, Assignment.id == TimeReport.assignment_id)
            .where(
                TimeReport.school_id.in_(ids),
                TimeReport.day >= date_from,
                TimeReport.day <= date_to,
                Assignment.status == "published",
                Assignment.counted_minutes > 0,
            )
            .group_by(
                TimeReport.assignment_id,
                TimeReport.school_id,
                Assignment.grade,
                Assignment.class_id,
                TimeReport.day,
                Assignment.counted_minutes,
            )
            .subquery()
        )
        r = reported_assignments
        reported_days = (
            select(r.c.school_id, r.c.grade, r.c.class_id, r.c.day, func.sum(r.c.delta).label("d"))
            .group_by(r.c.school_id, r.c.grade, r.c.class_id, r.c.day)
            .subquery()
        )
        reported = await session.execute(
            _histogram(
                select(
                    reported_days.c.school_id,
                    reported_days.c.grade,
                    (CLASS_USAGE.c.used + reported_days.c.d).label("m"),
                ).join(
                    CLASS_USAGE,
                    and_(
                        CLASS_USAGE.c.class_id == reported_days.c.class_id,
                        CLASS_USAGE.c.day == reported_days.c.day,
                    ),
                )
            )
        )
        buckets: dict[tuple[str, str, int], list[tuple[float, int, float]]] = defaultdict(list)
        for label, result in (("estimated", estimated), ("reported", reported)):
            for sid, grade, value, n, total in result:
                buckets[(label, sid, int(grade))].append((float(value), int(n), float(total)))
        grades: dict[str, dict[int, dict[str, schemas.MinutesStats]]] = defaultdict(dict)
        empty = schemas.MinutesStats(class_days=0, avg=None, p90=None)
        for (label, sid, grade), values in buckets.items():
            stats = rules.histogram_stats(values, 90)
            entry = grades[sid].setdefault(grade, {"estimated": empty, "reported": empty})
            entry[label] = schemas.MinutesStats(
                class_days=stats.count, avg=_f(stats.mean), p90=_f(stats.percentile)
            )
        alerts: dict[str, dict[str, int]] = defaultdict(dict)
        for sid, status, count in await session.execute(
            select(BurdenAlert.school_id, BurdenAlert.status, func.count())
            .where(BurdenAlert.school_id.in_(ids))
            .group_by(BurdenAlert.school_id, BurdenAlert.status)
        ):
            alerts[sid][status] = int(count)
    schools = []
    for sid, school in scope.items():
        ok = int(published.get(sid, 0))
        refused = sum(refusals[sid].values())
        schools.append(
            schemas.SchoolOversight(
                school_id=sid,
                school_name=school.name,
                region_id=school.region_id,
                published=ok,
                refused=refused,
                compliance_rate=round(ok / (ok + refused), 4) if ok + refused else None,
                refusals_by_rule=dict(sorted(refusals[sid].items())),
                grades=[
                    schemas.GradeStats(grade=g, **stats) for g, stats in sorted(grades[sid].items())
                ],
                alerts_open=alerts[sid].get("open", 0),
                alerts_closed=alerts[sid].get("closed", 0),
            )
        )
    return schemas.OversightReport(date_from=date_from, date_to=date_to, schools=schools)


async def list_alerts(
    ctx: ServiceContext,
    principal: Principal,
    status: str | None,
    region_id: str | None,
    school_id: str | None,
) -> list[schemas.AlertOut]:
    async with ctx.db.read() as session:
        scope = await oversight_scope(session, principal, region_id, school_id)
        query = (
            select(BurdenAlert)
            .where(BurdenAlert.school_id.in_(list(scope)))
            .order_by(BurdenAlert.opened_at.desc())
            .limit(1000)
        )
        if status is not None:
            query = query.where(BurdenAlert.status == status)
        return [
            schemas.AlertOut.model_validate(a, from_attributes=True)
            for a in await session.scalars(query)
        ]


async def estimate_gaps(
    ctx: ServiceContext,
    principal: Principal,
    date_from: dt.date,
    date_to: dt.date,
    region_id: str | None,
    school_id: str | None,
    flagged_only: bool,
) -> list[schemas.EstimateGapOut]:
    """HW-06/HW-08: teachers whose estimates run far below the reported times."""
    async with ctx.db.read() as session:
        scope = await oversight_scope(session, principal, region_id, school_id)
        rows = (
            await session.execute(
                select(
                    Assignment.teacher_id,
                    Assignment.school_id,
                    func.count(TimeReport.id),
                    func.sum(Assignment.estimated_minutes),
                    func.sum(TimeReport.minutes),
                )
                .join(TimeReport, TimeReport.assignment_id == Assignment.id)
                .where(
                    Assignment.school_id.in_(list(scope)),
                    Assignment.status == "published",
                    Assignment.day >= date_from,
                    Assignment.day <= date_to,
                )
                .group_by(Assignment.teacher_id, Assignment.school_id)
            )
        ).all()
        t = roster.teachers
        names = dict(
            (
                await session.execute(
                    select(t.c.id, t.c.name).where(t.c.id.in_({r[0] for r in rows}))
                )
            ).all()
        )
    out = []
    for teacher_id, sid, reports, estimated, actual in rows:
        school = scope[sid]
        profile = profile_for(ctx, school.region_id, school.profile_id, date_to)
        flagged = rules.estimate_gap(int(actual or 0), int(estimated or 0), int(reports), profile)
        if flagged_only and not flagged:
            continue
        out.append(
            schemas.EstimateGapOut(
                teacher_id=teacher_id,
                teacher_name=names.get(teacher_id),
                school_id=sid,
                reports=int(reports),
                estimated_minutes_total=int(estimated or 0),
                actual_minutes_total=int(actual or 0),
                ratio=round(int(actual or 0) / int(estimated), 3) if estimated else 0.0,
                threshold=float(profile.homework.estimate_gap_ratio),
                flagged=flagged,
            )
        )
    out.sort(key=lambda g: (-g.ratio, g.teacher_id))
    return out


async def acknowledged_warnings(
    ctx: ServiceContext,
    principal: Principal,
    date_from: dt.date,
    date_to: dt.date,
    region_id: str | None,
    school_id: str | None,
) -> list[schemas.WarningOut]:
    """HW-05: assignments published over acknowledged screening warnings."""
    async with ctx.db.read() as session:
        scope = await oversight_scope(session, principal, region_id, school_id)
        rows = await session.scalars(
            select(Assignment)
            .where(
                Assignment.school_id.in_(list(scope)),
                Assignment.day >= date_from,
                Assignment.day <= date_to,
                Assignment.warning_count > 0,
            )
            .order_by(Assignment.day, Assignment.id)
            .limit(5000)
        )
        return [
            schemas.WarningOut(
                assignment_id=a.id,
                school_id=a.school_id,
                class_id=a.class_id,
                date=a.day,
                subject=a.subject,
                teacher_id=a.teacher_id,
                content=a.content,
                acknowledged_warnings=list(a.acknowledged_warnings),
                status=a.status,
            )
            for a in rows
        ]
