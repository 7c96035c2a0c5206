"""AS-04 a student leaving the school frees their seats (roster events on the
real NATS bus); AS-05 refunds on withdrawal leave a record; AS-01/05/06
weekend make-up working days (调休上班日) are service days; AS-03 a reinstated
institution's courses stay flagged until the school re-approves them."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import func, select, update

from contracts import identity as idev
from contracts import institutions as inst
from contracts.base import STREAMS, Envelope
from services.afterschool.models import CatalogInstitution, Course, Enrollment, Refund
from tests.afterschool.helpers import (
    add_course,
    admin_token,
    course_body,
    enroll,
    make_plan,
    open_window,
    parent_token,
    seed_school,
)
from tests.afterschool.test_catalog import facts
from tests.afterschool.test_catalog import publish as publish_institution
from tests.support import auth, eventually

pytestmark = pytest.mark.asyncio
MONTH = "2027-01"  # a month of the term after today's date: nothing served yet


async def publish_identity(svc, event) -> None:
    bus = svc.ctx.bus
    await bus.wait_connected(10)
    await bus.ensure_stream(STREAMS["identity"])
    envelope = Envelope.wrap(event, source="identity")
    await bus.js.publish(
        envelope.type, envelope.model_dump_json().encode(), headers={"Nats-Msg-Id": envelope.id}
    )


async def menu(svc, mint, *, students: int, capacity: int, **plan_overrides):
    school = await seed_school(svc.ctx.db, students=students)
    admin = admin_token(mint, school)
    plan = await make_plan(svc.client, admin, school, **plan_overrides)
    course = await add_course(
        svc.client,
        admin,
        plan["id"],
        course_body(school, weekdays=[1, 3], capacity=capacity, fee_fen=16000),
    )
    other = await add_course(
        svc.client,
        admin,
        plan["id"],
        course_body(school, name="社团", kind="club", weekdays=[2, 4, 5], capacity=capacity),
    )
    await open_window(svc.client, admin, plan["id"])
    return school, admin, plan, course, other


async def bill_and_pay(svc, admin, plan, student_id, ref: str) -> dict:
    lines = (
        await svc.client.post(
            f"/plans/{plan['id']}/fees/settle", json={"month": MONTH}, headers=auth(admin)
        )
    ).json()
    line = next(x for x in lines if x["student_id"] == student_id)
    r = await svc.client.post(
        f"/fee-statements/{line['id']}/payments",
        json={"amount_fen": line["amount_fen"], "non_tax_account_ref": ref},
        headers={**auth(admin), "Idempotency-Key": str(uuid.uuid4())},
    )
    assert r.status_code == 201, r.text
    return line


def course_days(plan: dict, month: str, weekdays: set[int]) -> list[str]:
    make_up = plan["make_up_weekdays"]
    return [
        d
        for d in plan["service_days"]
        if d[:7] == month and make_up.get(d, dt.date.fromisoformat(d).isoweekday()) in weekdays
    ]


async def test_as05_refund_on_withdrawal_is_recorded_for_school_and_guardian(svc, mint):
    school, admin, plan, course, _ = await menu(svc, mint, students=2, capacity=5)
    parent = parent_token(mint, school, 0)
    r = await enroll(svc.client, parent, school.students[0], course["id"])
    assert r.json()["status"] == "held"
    line = await bill_and_pay(svc, admin, plan, school.students[0], "FS-2027-01-0007")
    planned = len(course_days(plan, MONTH, {1, 3}))
    assert line["planned_sessions"] == planned and line["amount_fen"] == 16000

    r = await svc.client.post(f"/enrollments/{r.json()['id']}/withdraw", headers=auth(parent))
    assert r.status_code == 200
    # Withdrawn before January: every paid day is refunded, per day, on record.
    refunds = await svc.client.get(f"/students/{school.students[0]}/refunds", headers=auth(parent))
    assert refunds.status_code == 200
    [refund] = refunds.json()
    assert refund["amount_fen"] == 16000 and refund["days"] == planned
    assert refund["non_tax_account_ref"] == "FS-2027-01-0007"
    assert refund["reason"] == "withdrawn" and refund["month"] == MONTH
    ledger = (await svc.client.get(f"/schools/{school.id}/refunds", headers=auth(admin))).json()
    assert [x["id"] for x in ledger] == [refund["id"]]
    # The statement shows the money went back: nothing more to refund, nothing due.
    statements = (
        await svc.client.get(f"/students/{school.students[0]}/fee-statements", headers=auth(parent))
    ).json()
    assert (statements[0]["amount_fen"], statements[0]["refunded_fen"]) == (0, 16000)
    assert statements[0]["refund_fen"] == 0
    # Another family sees nothing of it.
    other = await svc.client.get(
        f"/students/{school.students[0]}/refunds", headers=auth(parent_token(mint, school, 1))
    )
    assert other.status_code == 404


async def test_as04_student_leaving_school_frees_seats_once_through_roster_event(svc, mint):
    school, admin, plan, course, other = await menu(svc, mint, students=3, capacity=1)
    leaver, waiting = 0, 1
    held = await enroll(
        svc.client, parent_token(mint, school, leaver), school.students[leaver], course["id"]
    )
    assert held.json()["status"] == "held"
    r = await enroll(
        svc.client, parent_token(mint, school, waiting), school.students[waiting], course["id"]
    )
    assert r.json()["status"] == "waitlisted"
    r = await enroll(
        svc.client, parent_token(mint, school, leaver), school.students[leaver], other["id"]
    )
    assert r.json()["status"] == "held"  # no one waits for this one
    await bill_and_pay(svc, admin, plan, school.students[leaver], "FS-2027-01-0100")

    left = idev.StudentUpserted(
        id=school.students[leaver],
        school_id=school.id,
        class_id=school.class_id,
        grade=3,
        name="张小0",
        active=False,
    )
    await publish_identity(svc, left)

    async def freed():
        async with svc.ctx.db.read() as session:
            live = (
                await session.execute(
                    select(func.count()).where(
                        Enrollment.student_id == school.students[leaver],
                        Enrollment.status.in_(("held", "waitlisted")),
                    )
                )
            ).scalar_one()
            return live == 0

    await eventually(freed)

    async def state():
        async with svc.ctx.db.read() as session:
            c = await session.get(Course, course["id"])
            o = await session.get(Course, other["id"])
            waiter = (
                await session.execute(
                    select(Enrollment.status).where(
                        Enrollment.course_id == course["id"],
                        Enrollment.student_id == school.students[waiting],
                    )
                )
            ).scalar_one()
            refunds = (
                await session.execute(
                    select(Refund).where(Refund.student_id == school.students[leaver])
                )
            ).scalars()
            return c.seats_taken, o.seats_taken, waiter, [(r.reason, r.amount_fen) for r in refunds]

    # The seat went to the waitlist's head; the other course got its seat back.
    assert await state() == (1, 0, "held", [("left_school", 16000)])
    # A redelivery (same facts, new envelope) changes nothing: idempotent.
    await publish_identity(svc, left)
    marker = idev.StudentUpserted(
        id=school.students[2], school_id=school.id, class_id=school.class_id, grade=3, name="x"
    )
    await publish_identity(svc, marker)

    async def marker_seen():
        async with svc.ctx.db.read() as session:
            from services.afterschool.models import roster

            name = (
                await session.execute(
                    select(roster.students.c.name).where(roster.students.c.id == school.students[2])
                )
            ).scalar_one()
            return name == "x"

    await eventually(marker_seen)  # events of one producer are applied in order
    assert await state() == (1, 0, "held", [("left_school", 16000)])
    # The roster copy says the child left; the parent can no longer enroll them.
    r = await enroll(
        svc.client, parent_token(mint, school, leaver), school.students[leaver], course["id"]
    )
    assert r.status_code == 404


async def test_as01_as06_as05_weekend_make_up_days_are_service_days(svc, mint):
    school, admin, plan, course, _ = await menu(
        svc, mint, students=1, capacity=5, make_up_weekdays={"2026-10-10": 1}
    )
    # 2026-09-20 (Sunday) and 2026-10-10 (Saturday) are 国庆 make-up working days.
    assert "2026-09-20" in plan["service_days"] and "2026-10-10" in plan["service_days"]
    # Named by the school: Oct 10 runs Monday's timetable; Sep 20 by default the
    # weekday of the nearest holiday (中秋 on Friday Sep 25).
    assert plan["make_up_weekdays"] == {"2026-09-20": 5, "2026-10-10": 1}
    parent = parent_token(mint, school, 0)
    r = await enroll(svc.client, parent, school.students[0], course["id"])
    assert r.json()["status"] == "held"
    async with svc.ctx.db.transaction() as session:
        await session.execute(
            update(Enrollment)
            .where(Enrollment.course_id == course["id"])
            .values(held_from=dt.datetime(2026, 8, 31, 16, tzinfo=dt.UTC))
        )
    teacher = mint("teacher", tenants=[f"school:{school.id}"], person_id=school.teacher_id)
    marks = {"marks": [{"student_id": school.students[0], "status": "present"}]}
    # Roll call on the Saturday make-up day for a Monday/Wednesday course: a session.
    r = await svc.client.put(
        f"/courses/{course['id']}/sessions/2026-10-10/roll-call", json=marks, headers=auth(teacher)
    )
    assert r.status_code == 200, r.text
    # The Sunday make-up day runs Friday's timetable: not this course's day.
    r = await svc.client.put(
        f"/courses/{course['id']}/sessions/2026-09-20/roll-call", json=marks, headers=auth(teacher)
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-06"
    # Fees count the make-up day as one of October's sessions.
    lines = (
        await svc.client.post(
            f"/plans/{plan['id']}/fees/settle", json={"month": "2026-10"}, headers=auth(admin)
        )
    ).json()
    weekday_sessions = [
        d
        for d in plan["service_days"]
        if d[:7] == "2026-10" and dt.date.fromisoformat(d).isoweekday() in (1, 3)
    ]
    assert lines[0]["planned_sessions"] == len(weekday_sessions) + 1
    # A date that is no make-up day cannot be given a timetable.
    r = await svc.client.post(
        f"/schools/{school.id}/plans",
        json={
            "term": "2026-2027学年第二学期",
            "sessions": [{"kind": "regular", "start": "15:30", "end": "17:30"}],
            "fee_standard_fen": 20000,
            "make_up_weekdays": {"2026-10-12": 1},
        },
        headers=auth(admin),
    )
    assert r.status_code == 422


async def test_as03_reinstated_institution_courses_stay_flagged_until_school_reapproves(svc, mint):
    school = await seed_school(svc.ctx.db, students=2)
    token = admin_token(mint, school)
    institution_id = str(uuid.uuid4())
    await publish_institution(
        svc, facts(inst.LicenceGranted, institution_id, status="licensed", can_enroll=True)
    )
    plan = await make_plan(svc.client, token, school)
    for i in range(3):
        await add_course(
            svc.client,
            token,
            plan["id"],
            course_body(school, name=f"作业辅导{i}", kind="homework_guidance"),
        )
    body = course_body(
        school,
        name="足球",
        provider_type="institution",
        provider_name="金华青少年体育俱乐部",
        institution_id=institution_id,
        teacher_id=None,
        start="16:30",
        end="17:30",
    )

    async def course_added():
        r = await svc.client.post(f"/plans/{plan['id']}/courses", json=body, headers=auth(token))
        return r.json() if r.status_code == 201 else None

    body["capacity"] = 1
    course = await eventually(course_added)
    await open_window(svc.client, token, plan["id"])
    holder = await enroll(
        svc.client, parent_token(mint, school, 0), school.students[0], course["id"]
    )
    assert holder.json()["status"] == "held"
    waiter = await enroll(
        svc.client, parent_token(mint, school, 1), school.students[1], course["id"]
    )
    assert waiter.json()["status"] == "waitlisted"
    t0 = dt.datetime.now(dt.UTC)
    await publish_institution(
        svc,
        facts(
            inst.LicenceSuspended,
            institution_id,
            status="suspended",
            can_enroll=False,
            occurred_at=t0,
        ),
    )

    async def flagged():
        async with svc.ctx.db.read() as session:
            return (await session.get(Course, course["id"])).status == "flagged"

    await eventually(flagged)
    # The holder leaves while the course is flagged: nobody is moved in.
    r = await svc.client.post(
        f"/enrollments/{holder.json()['id']}/withdraw", headers=auth(parent_token(mint, school, 0))
    )
    assert r.status_code == 200
    reapprove = f"/courses/{course['id']}/reapprove"
    # While suspended, the school cannot bring the course back.
    r = await svc.client.post(reapprove, headers=auth(token))
    assert r.status_code == 409 and r.json()["rule"] == "AS-03"
    await publish_institution(
        svc,
        facts(
            inst.LicenceReinstated,
            institution_id,
            status="licensed",
            can_enroll=True,
            occurred_at=t0 + dt.timedelta(seconds=1),
        ),
    )

    async def back_in_catalog():
        async with svc.ctx.db.read() as session:
            entry = await session.get(CatalogInstitution, institution_id)
            return entry.can_enroll and entry.status == "licensed"

    await eventually(back_in_catalog)  # the catalog entry returns at once ...
    # ... but the flagged course stays flagged until the school re-approves it.
    got = (await svc.client.get(f"/courses/{course['id']}", headers=auth(token))).json()
    assert got["status"] == "flagged"
    other_school = await seed_school(svc.ctx.db, students=0)
    r = await svc.client.post(reapprove, headers=auth(admin_token(mint, other_school)))
    assert r.status_code == 404
    r = await svc.client.post(reapprove, headers=auth(token))
    assert r.status_code == 200 and r.json()["status"] == "active"
    assert r.json()["flag_reason"] is None
    # The seat freed while flagged goes to the waitlist's head now.
    assert (r.json()["seats_taken"], r.json()["seats_left"]) == (1, 0)
    mine = await svc.client.get(
        f"/students/{school.students[1]}/enrollments", headers=auth(parent_token(mint, school, 1))
    )
    assert mine.json()[0]["status"] == "held"
    r = await svc.client.post(reapprove, headers=auth(token))
    assert r.status_code == 409  # nothing left to re-approve


async def test_as04_student_moving_to_another_school_frees_seat_rename_does_not(svc, mint):
    school, _admin, _plan, course, _other = await menu(svc, mint, students=2, capacity=2)
    for i in range(2):
        r = await enroll(
            svc.client, parent_token(mint, school, i), school.students[i], course["id"]
        )
        assert r.json()["status"] == "held"

    def upserted(i: int, **changes):
        return idev.StudentUpserted(
            id=school.students[i],
            school_id=changes.get("school_id", school.id),
            class_id=school.class_id,
            grade=3,
            name=changes.get("name", f"张小{i}"),
        )

    # Student 0 is renamed (same school, active): nothing changes for the seat.
    await publish_identity(svc, upserted(0, name="张晓零"))
    # Student 1 transfers to another school: the seat here is given up.
    await publish_identity(svc, upserted(1, school_id=str(uuid.uuid4())))

    async def seats():
        async with svc.ctx.db.read() as session:
            c = await session.get(Course, course["id"], populate_existing=True)
            statuses = dict(
                (
                    await session.execute(
                        select(Enrollment.student_id, Enrollment.status).where(
                            Enrollment.course_id == course["id"]
                        )
                    )
                ).all()
            )
            return (c.seats_taken, statuses) if c.seats_taken == 1 else None

    taken, statuses = await eventually(seats)
    assert taken == 1
    assert statuses == {school.students[0]: "held", school.students[1]: "withdrawn"}
