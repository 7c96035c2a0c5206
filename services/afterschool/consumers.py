"""Events afterschool listens to besides the roster: institutions' licence and
black-list transitions keep the bureau's catalog (校外机构目录库) current (AS-03)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import utcnow
from chassis.messaging import Subscription, emit
from chassis.roster import roster_subscription
from contracts import afterschool as ev
from contracts import identity as idev
from contracts import institutions as inst
from contracts.base import Envelope
from services.afterschool import service
from services.afterschool.models import (
    ACTIVE_STATUSES,
    CatalogInstitution,
    Course,
    Enrollment,
    roster,
)

FACT_EVENTS = (
    inst.LicenceReviewStarted,
    inst.LicenceGranted,
    inst.LicenceRejected,
    inst.LicenceSuspended,
    inst.LicenceReinstated,
    inst.LicenceRevoked,
    inst.LicenceTransformed,
    inst.LicenceTerminated,
    inst.Blacklisted,
    inst.Delisted,
)


async def apply_institution_facts(session: AsyncSession, facts: inst.InstitutionFacts) -> None:
    """Upsert the catalog entry (ignoring facts older than what we hold, so an
    out-of-order redelivery cannot resurrect a revoked institution); when the
    institution may no longer enroll, flag its courses and tell their parents."""
    entry = await session.get(CatalogInstitution, facts.institution_id, with_for_update=True)
    if entry is not None and entry.occurred_at > facts.occurred_at:
        return
    if entry is None:
        entry = CatalogInstitution(institution_id=facts.institution_id)
        session.add(entry)
    entry.name = facts.name
    entry.region_id = facts.region_id
    entry.category = facts.category
    entry.status = facts.status
    entry.blacklisted = facts.blacklisted
    entry.can_enroll = facts.can_enroll
    entry.licence_valid_until = facts.licence_valid_until
    entry.reason = facts.reason
    entry.occurred_at = facts.occurred_at
    entry.synced_at = utcnow()
    if facts.can_enroll and not facts.blacklisted:
        return
    reason = f"提供机构{facts.name}已{_status_zh(facts)}，移出校外机构目录库：{facts.reason}"
    await flag_institution_courses(session, facts.institution_id, reason)


async def flag_institution_courses(session: AsyncSession, institution_id: str, reason: str) -> int:
    """AS-03: the institution's active courses are flagged (no new seats, no
    "full" remembered) and their parents told; returns how many."""
    courses = (
        await session.execute(
            select(Course).where(Course.institution_id == institution_id, Course.status == "active")
        )
    ).scalars()
    flagged = 0
    for course in list(courses):
        course.status = "flagged"
        course.flag_reason = reason
        service.seat_freed(course.id)  # no "full" remembered for a suspended course
        students = (
            await session.execute(
                select(Enrollment.student_id).where(
                    Enrollment.course_id == course.id, Enrollment.status.in_(ACTIVE_STATUSES)
                )
            )
        ).scalars()
        await emit(
            session,
            ev.CourseFlagged(
                id=course.id,
                school_id=course.school_id,
                institution_id=institution_id,
                reason=reason,
                affected_student_ids=sorted(students),
            ),
        )
        flagged += 1
    return flagged


async def flag_lapsed_licences(session: AsyncSession, today: dt.date) -> int:
    """AS-03: institutions whose licence passed its validity date leave the
    catalog although no event said so; their active courses are flagged.
    Idempotent (only active courses are flagged); returns how many."""
    lapsed = (
        await session.execute(
            select(CatalogInstitution)
            .where(CatalogInstitution.licence_valid_until < today)
            .where(
                CatalogInstitution.institution_id.in_(
                    select(Course.institution_id).where(Course.status == "active")
                )
            )
        )
    ).scalars()
    flagged = 0
    for entry in list(lapsed):
        assert entry.licence_valid_until is not None
        reason = (
            f"提供机构{entry.name}的办学许可证已于 {entry.licence_valid_until.isoformat()} "
            "到期，移出校外机构目录库"
        )
        flagged += await flag_institution_courses(session, entry.institution_id, reason)
    return flagged


def _status_zh(facts: inst.InstitutionFacts) -> str:
    if facts.blacklisted:
        return "列入黑名单"
    return {
        "suspended": "暂停办学",
        "revoked": "被吊销办学许可",
        "terminated": "终止办学",
        "rejected": "未获许可",
    }.get(facts.status, "暂停招生")


def institutions_subscription() -> Subscription:
    async def handle(session: AsyncSession, envelope: Envelope) -> None:
        facts = envelope.parse()
        assert isinstance(facts, inst.InstitutionFacts)
        await apply_institution_facts(session, facts)

    return Subscription(
        name="institutions-catalog",
        producer="institutions",
        handlers={event.TYPE: handle for event in FACT_EVENTS},
    )


def afterschool_roster_subscription() -> Subscription:
    """The chassis's roster copy, plus AS-04: when a student leaves the school
    (inactive, or moved to another school) their seats are freed in the same
    transaction as the roster row (seat to the waitlist, per-day refund)."""
    subscription = roster_subscription(roster)
    upsert_student = subscription.handlers[idev.StudentUpserted.TYPE]

    async def student(session: AsyncSession, envelope: Envelope) -> None:
        await upsert_student(session, envelope)
        e = idev.StudentUpserted.model_validate(envelope.data)
        await service.student_left(session, e.id, e.school_id, e.active)

    subscription.handlers[idev.StudentUpserted.TYPE] = student
    return subscription
