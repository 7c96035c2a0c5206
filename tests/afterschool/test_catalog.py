"""AS-03: the catalog of institutions is kept current from institutions' events
(published on the real NATS bus), and the external share is capped."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from sqlalchemy import select

from contracts import institutions as inst
from contracts.base import STREAMS, Envelope
from services.afterschool.models import Course, Enrollment
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
from tests.support import auth, eventually

pytestmark = pytest.mark.asyncio


def facts(cls, institution_id: str, *, status: str, can_enroll: bool, **extra):
    return cls(
        institution_id=institution_id,
        name="金华青少年体育俱乐部",
        region_id="jinhua",
        category=extra.pop("category", "sports"),
        department="sports",
        credit_code="91330700MA2XXXXX0X",
        licence_number="体培330700001",
        status=status,
        profit_status="non_profit",
        blacklisted=extra.pop("blacklisted", False),
        reregistration_pending=False,
        can_enroll=can_enroll,
        can_charge=can_enroll,
        reason=extra.pop("reason", "审核通过"),
        actor="regulator.jinhua",
        occurred_at=extra.pop("occurred_at", dt.datetime.now(dt.UTC)),
        **extra,
    )


async def publish(svc, event) -> Envelope:
    bus = svc.ctx.bus
    await bus.wait_connected(10)
    await bus.ensure_stream(STREAMS["institutions"])
    envelope = Envelope.wrap(event, source="institutions")
    await bus.js.publish(
        envelope.type, envelope.model_dump_json().encode(), headers={"Nats-Msg-Id": envelope.id}
    )
    return envelope


async def test_as03_revoked_licence_event_removes_institution_and_flags_courses(svc, mint):
    school = await seed_school(svc.ctx.db, students=2)
    token = admin_token(mint, school)
    institution_id = str(uuid.uuid4())
    await publish(
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

    async def course_added():
        r = await svc.client.post(
            f"/plans/{plan['id']}/courses",
            json=course_body(
                school,
                name="足球",
                provider_type="institution",
                provider_name="金华青少年体育俱乐部",
                institution_id=institution_id,
                teacher_id=None,
                start="16:30",
                end="17:30",
                capacity=1,
            ),
            headers=auth(token),
        )
        return r.json() if r.status_code == 201 else None

    course = await eventually(course_added)
    await open_window(svc.client, token, plan["id"])
    r = await enroll(svc.client, parent_token(mint, school, 0), school.students[0], course["id"])
    assert r.status_code == 201 and r.json()["status"] == "held"
    holder = r.json()["id"]
    r = await enroll(svc.client, parent_token(mint, school, 1), school.students[1], course["id"])
    assert r.status_code == 201 and r.json()["status"] == "waitlisted"

    envelope = await publish(
        svc,
        facts(
            inst.LicenceRevoked,
            institution_id,
            status="revoked",
            can_enroll=False,
            previous_status="licensed",
            reason="违规开展学科类培训",
        ),
    )

    async def flagged():
        async with svc.ctx.db.read() as session:
            c = await session.get(Course, course["id"])
            return c.status == "flagged" and c

    c = await eventually(flagged)
    assert "违规开展学科类培训" in c.flag_reason
    # Parents are told: a course.flagged event names the affected child.
    from chassis.messaging import outbox_table

    async with svc.ctx.db.read() as session:
        rows = (
            (
                await session.execute(
                    select(outbox_table.c.payload).where(
                        outbox_table.c.type == "afterschool.course.flagged.v1"
                    )
                )
            )
            .scalars()
            .all()
        )
    assert len(rows) == 1
    data = json.loads(rows[0])["data"]
    assert data["id"] == course["id"]
    assert sorted(data["affected_student_ids"]) == sorted(school.students[:2])
    # The holder leaves: nobody is moved into a flagged course; the seat is freed.
    r = await svc.client.post(
        f"/enrollments/{holder}/withdraw", headers=auth(parent_token(mint, school, 0))
    )
    assert r.status_code == 200
    async with svc.ctx.db.read() as session:
        assert (await session.get(Course, course["id"])).seats_taken == 0
        waiting = (
            await session.execute(
                select(Enrollment.status).where(Enrollment.student_id == school.students[1])
            )
        ).scalar_one()
        assert waiting == "waitlisted"

    # No new enrollment in a flagged course, and the institution is out of the catalog.
    r = await enroll(svc.client, parent_token(mint, school, 0), school.students[0], course["id"])
    assert r.status_code == 409 and r.json()["rule"] == "AS-03"
    r = await svc.client.post(
        f"/plans/{plan['id']}/courses",
        json=course_body(
            school,
            name="篮球",
            provider_type="institution",
            provider_name="x",
            institution_id=institution_id,
            teacher_id=None,
        ),
        headers=auth(token),
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-03"

    # Redelivery of the same event changes nothing (inbox), and an older
    # "granted" arriving late does not resurrect the institution.
    await svc.ctx.bus.js.publish(
        envelope.type,
        envelope.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(uuid.uuid4())},
    )
    stale = facts(
        inst.LicenceGranted,
        institution_id,
        status="licensed",
        can_enroll=True,
        occurred_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=1),
    )
    stale_envelope = await publish(svc, stale)
    from chassis.messaging import inbox_table
    from services.afterschool.models import CatalogInstitution

    async def consumed():
        async with svc.ctx.db.read() as session:
            ids = set((await session.execute(select(inbox_table.c.event_id))).scalars())
            return stale_envelope.id in ids and envelope.id in ids

    await eventually(consumed)
    async with svc.ctx.db.read() as session:
        entry = await session.get(CatalogInstitution, institution_id)
        assert entry.status == "revoked" and entry.can_enroll is False
        flagged_events = (
            await session.execute(
                select(outbox_table.c.event_id).where(
                    outbox_table.c.type == "afterschool.course.flagged.v1"
                )
            )
        ).all()
        assert len(flagged_events) == 1


async def test_as03_subject_institutions_and_unknown_ones_are_refused(svc, mint):
    school = await seed_school(svc.ctx.db)
    token = admin_token(mint, school)
    subject_id = str(uuid.uuid4())
    await publish(
        svc,
        facts(
            inst.LicenceGranted, subject_id, status="licensed", can_enroll=True, category="subject"
        ),
    )
    plan = await make_plan(svc.client, token, school)
    for i in range(5):
        await add_course(svc.client, token, plan["id"], course_body(school, name=f"课{i}"))

    async def refused_as_subject():
        r = await svc.client.post(
            f"/plans/{plan['id']}/courses",
            json=course_body(
                school,
                provider_type="institution",
                provider_name="x",
                institution_id=subject_id,
                teacher_id=None,
            ),
            headers=auth(token),
        )
        return r.status_code == 422 and "学科类" in r.json()["detail"] and r.json()

    body = await eventually(refused_as_subject)
    assert body["rule"] == "AS-03"
    r = await svc.client.post(
        f"/plans/{plan['id']}/courses",
        json=course_body(
            school,
            provider_type="institution",
            provider_name="x",
            institution_id=str(uuid.uuid4()),
            teacher_id=None,
        ),
        headers=auth(token),
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-03"


async def test_as03_external_share_capped_at_profile_share(svc, mint):
    school = await seed_school(svc.ctx.db)
    token = admin_token(mint, school)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    for institution_id in ids:
        await publish(
            svc, facts(inst.LicenceGranted, institution_id, status="licensed", can_enroll=True)
        )
    plan = await make_plan(svc.client, token, school)
    for i in range(7):
        await add_course(svc.client, token, plan["id"], course_body(school, name=f"校内{i}"))

    def external(i):
        return course_body(
            school,
            name=f"机构{i}",
            provider_type="institution",
            provider_name="x",
            institution_id=ids[i],
            teacher_id=None,
        )

    async def first_external():
        r = await svc.client.post(
            f"/plans/{plan['id']}/courses", json=external(0), headers=auth(token)
        )
        return r.status_code == 201

    await eventually(first_external)  # 1/8
    await add_course(svc.client, token, plan["id"], external(1))  # 2/9
    await add_course(svc.client, token, plan["id"], external(2))  # 3/10 = 30 %: allowed
    r = await svc.client.post(f"/plans/{plan['id']}/courses", json=external(3), headers=auth(token))
    assert r.status_code == 422  # 4/11 > 30 %
    assert r.json()["rule"] == "AS-03" and r.json()["external"] == 4 and r.json()["total"] == 11


async def test_as03_course_flagged_while_sold_out_is_not_answered_full_from_memory(
    svc, mint, monkeypatch
):
    """A sold-out course's no-waitlist askers are answered from memory (the
    course's status kept with the "full" mark, services/afterschool/rush.py);
    a revocation flagging the course drops the mark, so the next parent is
    told the course is suspended (AS-03), not that it is full — with the
    mark trusted far longer than the test takes, so only the drop explains it."""
    from services.afterschool import rush, service

    monkeypatch.setattr(service, "SOLD_OUT_TTL", 600.0)
    school = await seed_school(svc.ctx.db, students=3)
    token = admin_token(mint, school)
    institution_id = str(uuid.uuid4())
    await publish(
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

    async def course_added():
        r = await svc.client.post(
            f"/plans/{plan['id']}/courses",
            json=course_body(
                school,
                name="足球",
                provider_type="institution",
                provider_name="金华青少年体育俱乐部",
                institution_id=institution_id,
                teacher_id=None,
                start="16:30",
                end="17:30",
                capacity=1,
            ),
            headers=auth(token),
        )
        return r.json() if r.status_code == 201 else None

    course = await eventually(course_added)
    await open_window(svc.client, token, plan["id"])
    tokens = [parent_token(mint, school, i) for i in range(3)]
    r = await enroll(svc.client, tokens[0], school.students[0], course["id"])
    assert r.status_code == 201 and r.json()["status"] == "held"
    r = await enroll(svc.client, tokens[1], school.students[1], course["id"], waitlist=False)
    assert r.status_code == 409 and r.json()["full"] is True
    assert rush.sold_out_now(course["id"])
    r = await enroll(svc.client, tokens[2], school.students[2], course["id"], waitlist=False)
    assert r.status_code == 409 and r.json()["full"] is True  # answered from the mark

    await publish(
        svc,
        facts(
            inst.LicenceRevoked,
            institution_id,
            status="revoked",
            can_enroll=False,
            previous_status="licensed",
            reason="违规开展学科类培训",
        ),
    )

    async def flagged():
        async with svc.ctx.db.read() as session:
            c = await session.get(Course, course["id"])
            return c.status == "flagged"

    await eventually(flagged)
    assert not rush.sold_out_now(course["id"])
    r = await enroll(svc.client, tokens[2], school.students[2], course["id"], waitlist=False)
    assert r.status_code == 409 and r.json()["rule"] == "AS-03"
    assert not r.json().get("full")


async def test_as03_a_lapsed_licence_leaves_the_catalog_without_an_event(svc, mint):
    """Expiry is a date, not a transition: no event says it. The daily job
    flags the courses of an institution whose licence passed its last valid
    day, once, and such an institution cannot be chosen as a provider."""
    from chassis.messaging import outbox_table
    from services.afterschool import service
    from services.afterschool.app import run_licence_expiry
    from services.afterschool.consumers import flag_lapsed_licences

    school = await seed_school(svc.ctx.db, students=1)
    token = admin_token(mint, school)
    today = service.local_today()
    institution_id = str(uuid.uuid4())
    await publish(
        svc,
        facts(
            inst.LicenceGranted,
            institution_id,
            status="licensed",
            can_enroll=True,
            licence_valid_until=today,  # valid through today
        ),
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
        capacity=5,
    )

    async def course_added():
        r = await svc.client.post(f"/plans/{plan['id']}/courses", json=body, headers=auth(token))
        return r.json() if r.status_code == 201 else None

    course = await eventually(course_added)
    # Today the job changes nothing: the licence is still valid.
    assert await run_licence_expiry(svc.ctx) == {"flagged": 0}
    # Tomorrow it has lapsed: the course is flagged and its parents told, once.
    tomorrow = today + dt.timedelta(days=1)
    async with svc.ctx.db.transaction() as session:
        assert await flag_lapsed_licences(session, tomorrow) == 1
    async with svc.ctx.db.transaction() as session:
        assert await flag_lapsed_licences(session, tomorrow) == 0  # idempotent
    async with svc.ctx.db.read() as session:
        c = await session.get(Course, course["id"])
        assert c.status == "flagged" and "到期" in c.flag_reason
        flagged_events = (
            await session.execute(
                select(outbox_table.c.payload).where(
                    outbox_table.c.type == "afterschool.course.flagged.v1"
                )
            )
        ).all()
    assert len(flagged_events) == 1
    # A licence that has lapsed cannot provide a new course (AS-03).
    await publish(
        svc,
        facts(
            inst.LicenceGranted,
            institution_id,
            status="licensed",
            can_enroll=True,
            licence_valid_until=today - dt.timedelta(days=1),
        ),
    )

    async def lapsed_refusal():
        r = await svc.client.post(
            f"/plans/{plan['id']}/courses",
            json={**body, "name": "篮球"},
            headers=auth(token),
        )
        return r.json() if r.status_code == 422 else None

    problem = await eventually(lapsed_refusal)
    assert problem["rule"] == "AS-03"
    assert problem["licence_valid_until"] == (today - dt.timedelta(days=1)).isoformat()
