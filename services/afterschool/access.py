"""Object-level authorization (GW-03): someone else's object looks missing."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import Principal
from chassis.errors import not_found
from services.afterschool.models import Course, Enrollment, roster

STAFF = ("school_admin", "head_teacher", "teacher")
OVERSIGHT = ("bureau", "regulator", "auditor")


def is_staff(principal: Principal, school_id: str) -> bool:
    return principal.has_role(*STAFF) and principal.has_tenant("school", school_id)


def is_school_admin(principal: Principal, school_id: str) -> bool:
    return principal.has_role("school_admin") and principal.has_tenant("school", school_id)


def is_overseer(principal: Principal, region_id: str) -> bool:
    return principal.has_role(*OVERSIGHT) and principal.has_tenant("region", region_id)


async def is_guardian(session: AsyncSession, principal: Principal, student_id: str) -> bool:
    if not principal.has_role("parent") or not principal.person_id:
        return False
    row = await session.execute(
        select(roster.guardianships.c.student_id).where(
            roster.guardianships.c.guardian_id == principal.person_id,
            roster.guardianships.c.student_id == student_id,
        )
    )
    return row.first() is not None


async def children_at(session: AsyncSession, principal: Principal, school_id: str) -> set[str]:
    """The caller's children (as a guardian) at ``school_id``."""
    if not principal.has_role("parent") or not principal.person_id:
        return set()
    g, s = roster.guardianships, roster.students
    rows = await session.execute(
        select(s.c.id)
        .join(g, g.c.student_id == s.c.id)
        .where(g.c.guardian_id == principal.person_id, s.c.school_id == school_id)
    )
    return set(rows.scalars())


async def can_view_school(
    session: AsyncSession, principal: Principal, school_id: str, region_id: str
) -> bool:
    if is_staff(principal, school_id) or is_overseer(principal, region_id):
        return True
    return bool(await children_at(session, principal, school_id))


def ensure(condition: bool, what: str = "资源") -> None:
    if not condition:
        raise not_found(f"{what}不存在。")


async def teaches_student(
    session: AsyncSession, principal: Principal, student: dict[str, object]
) -> bool:
    """A school admin sees the school's children; a teacher only those of the
    classes they head or teach, and those in the after-school courses they run."""
    school_id = str(student["school_id"])
    if is_school_admin(principal, school_id):
        return True
    if not (is_staff(principal, school_id) and principal.person_id):
        return False
    klass = (
        (
            await session.execute(
                select(roster.classes).where(roster.classes.c.id == student["class_id"])
            )
        )
        .mappings()
        .first()
    )
    if klass is not None:
        if klass["head_teacher_id"] == principal.person_id:
            return True
        if any(t.get("teacher_id") == principal.person_id for t in klass["subject_teachers"] or []):
            return True
    row = await session.execute(
        select(Enrollment.id)
        .join(Course, Course.id == Enrollment.course_id)
        .where(Enrollment.student_id == student["id"], Course.teacher_id == principal.person_id)
        .limit(1)
    )
    return row.first() is not None
