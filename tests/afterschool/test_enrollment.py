"""AS-04: voluntary enrollment, FIFO waitlist, withdrawal, lottery, rush."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import func, select, update

from services.afterschool import rules
from services.afterschool.models import Course, Enrollment, Plan
from tests.afterschool.helpers import (
    add_course,
    admin_token,
    course_body,
    enroll,
    make_plan,
    open_window,
    parent_token,
    seed_school,
    uid,
)
from tests.support import auth

pytestmark = pytest.mark.asyncio


async def menu(svc, mint, *, students=3, capacity=30, mode="first_come", courses=1, **window):
    school = await seed_school(svc.ctx.db, students=students)
    token = admin_token(mint, school)
    plan = await make_plan(svc.client, token, school)
    made = []
    for i in range(courses):
        made.append(
            await add_course(
                svc.client,
                token,
                plan["id"],
                course_body(
                    school,
                    name=f"课程{i}",
                    capacity=capacity,
                    start="15:30" if i % 2 == 0 else "16:30",
                    end="16:30" if i % 2 == 0 else "17:30",
                ),
            )
        )
    await open_window(svc.client, token, plan["id"], mode=mode, **window)
    return school, plan, made


async def counts(svc, course_id):
    async with svc.ctx.db.read() as session:
        course = await session.get(Course, course_id)
        held = (
            await session.execute(
                select(func.count()).where(
                    Enrollment.course_id == course_id, Enrollment.status == "held"
                )
            )
        ).scalar_one()
        return course.seats_taken, held


async def test_as04_parent_enrolls_own_child_with_consent_only(svc, mint):
    school, _plan, (course,) = await menu(svc, mint)
    r = await enroll(svc.client, parent_token(mint, school, 0), school.students[1], course["id"])
    assert r.status_code == 404  # someone else's child looks missing
    r = await enroll(
        svc.client, parent_token(mint, school, 0), school.students[0], course["id"], consent=False
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-04"
    teacher = mint("teacher", tenants=[f"school:{school.id}"], person_id=school.teacher_id)
    r = await enroll(svc.client, teacher, school.students[0], course["id"])
    assert r.status_code == 404
    r = await enroll(svc.client, parent_token(mint, school, 0), school.students[0], course["id"])
    assert r.status_code == 201 and r.json()["status"] == "held"
    assert await counts(svc, course["id"]) == (1, 1)
    # Who sees the child's enrollments: the guardian, the head teacher (the
    # fixture's teacher heads the class), the admin; not another parent, not a
    # teacher of another class, not another school's admin.
    url = f"/students/{school.students[0]}/enrollments"
    other_teacher = mint("teacher", tenants=[f"school:{school.id}"], person_id=uid())
    other = await seed_school(svc.ctx.db, students=0)
    for token, code in [
        (parent_token(mint, school, 0), 200),
        (teacher, 200),
        (admin_token(mint, school), 200),
        (parent_token(mint, school, 1), 404),
        (other_teacher, 404),
        (admin_token(mint, other), 404),
    ]:
        assert (await svc.client.get(url, headers=auth(token))).status_code == code
    r = await svc.client.get(f"/courses/{course['id']}/enrollments", headers=auth(other_teacher))
    assert r.status_code == 404


async def test_as04_idempotency_key_retried_tap_takes_one_seat(svc, mint):
    school, _plan, (course,) = await menu(svc, mint)
    token = parent_token(mint, school, 0)
    key = uid()
    first = await enroll(svc.client, token, school.students[0], course["id"], key=key)
    again = await enroll(svc.client, token, school.students[0], course["id"], key=key)
    assert first.status_code == again.status_code == 201
    assert first.content == again.content
    assert again.headers.get("Idempotent-Replayed") == "true"
    other_key = await enroll(svc.client, token, school.students[0], course["id"])
    assert other_key.status_code == 409 and other_key.json()["rule"] == "AS-04"
    r = await svc.client.post(
        "/enrollments",
        json={"student_id": school.students[0], "course_id": course["id"], "consent": True},
        headers=auth(token),
    )
    assert r.status_code == 400  # Idempotency-Key is required
    assert await counts(svc, course["id"]) == (1, 1)


async def test_as04_window_closed_or_not_open_refuses(svc, mint):
    now = dt.datetime.now(dt.UTC)
    school, _plan, (course,) = await menu(
        svc,
        mint,
        opens_at=(now + dt.timedelta(hours=1)).isoformat(),
        closes_at=(now + dt.timedelta(hours=2)).isoformat(),
    )
    r = await enroll(svc.client, parent_token(mint, school, 0), school.students[0], course["id"])
    assert r.status_code == 409 and r.json()["rule"] == "AS-04" and r.json()["window"] == "before"


async def test_as04_no_two_courses_in_the_same_slot(svc, mint):
    school, plan, courses = await menu(svc, mint, courses=1)
    token = admin_token(mint, school)
    clash = await add_course(
        svc.client,
        token,
        plan["id"],
        course_body(school, name="美术", kind="arts", start="16:00", end="17:00", weekdays=[3]),
    )
    parent = parent_token(mint, school, 0)
    assert (
        await enroll(svc.client, parent, school.students[0], courses[0]["id"])
    ).status_code == 201
    r = await enroll(svc.client, parent, school.students[0], clash["id"])
    assert r.status_code == 409 and r.json()["rule"] == "AS-04"
    assert r.json()["clashes_with"] == courses[0]["id"]


async def test_as04_full_course_fifo_waitlist_and_promotion_on_withdrawal(svc, mint):
    school, _plan, (course,) = await menu(svc, mint, students=5, capacity=2)
    results = []
    for i in range(5):
        r = await enroll(
            svc.client, parent_token(mint, school, i), school.students[i], course["id"]
        )
        assert r.status_code == 201
        results.append(r.json())
    assert [r["status"] for r in results] == [
        "held",
        "held",
        "waitlisted",
        "waitlisted",
        "waitlisted",
    ]
    assert [r["waitlist_position"] for r in results[2:]] == [1, 2, 3]
    # The school's staff see the list in order, names masked; others see nothing.
    staff = mint("teacher", tenants=[f"school:{school.id}"], person_id=school.teacher_id)
    listed = await svc.client.get(f"/courses/{course['id']}/enrollments", headers=auth(staff))
    assert listed.status_code == 200, listed.text
    assert [e["status"] for e in listed.json()] == ["held"] * 2 + ["waitlisted"] * 3
    assert [e["student_name"] for e in listed.json()][:1] == ["张*0"]
    r = await svc.client.get(
        f"/courses/{course['id']}/enrollments", headers=auth(parent_token(mint, school, 0))
    )
    assert r.status_code == 404
    # A loser who does not want the waitlist is told "full" and nothing is written.
    extra = await seed_school(svc.ctx.db, students=0)
    del extra
    # The third on the waitlist withdraws: order of the others is kept.
    r = await svc.client.post(
        f"/enrollments/{results[3]['id']}/withdraw", headers=auth(parent_token(mint, school, 3))
    )
    assert r.status_code == 200 and r.json()["status"] == "withdrawn"
    assert await counts(svc, course["id"]) == (2, 2)
    # A holder withdraws: the head of the waitlist is promoted, seats stay 2 = held.
    r = await svc.client.post(
        f"/enrollments/{results[0]['id']}/withdraw", headers=auth(parent_token(mint, school, 0))
    )
    assert r.status_code == 200
    async with svc.ctx.db.read() as session:
        promoted = await session.get(Enrollment, results[2]["id"])
        assert promoted.status == "held"
    assert await counts(svc, course["id"]) == (2, 2)
    # Another parent cannot withdraw someone else's child.
    r = await svc.client.post(
        f"/enrollments/{results[1]['id']}/withdraw", headers=auth(parent_token(mint, school, 4))
    )
    assert r.status_code == 404
    # Two holders leave; the last waiter is promoted, then a seat is freed.
    for i in (1, 2):
        r = await svc.client.post(
            f"/enrollments/{results[i]['id']}/withdraw", headers=auth(parent_token(mint, school, i))
        )
        assert r.status_code == 200
    assert await counts(svc, course["id"]) == (1, 1)
    r = await enroll(
        svc.client, parent_token(mint, school, 0), school.students[0], course["id"], waitlist=False
    )
    assert r.status_code == 201 and r.json()["status"] == "held"
    r = await enroll(
        svc.client, parent_token(mint, school, 3), school.students[3], course["id"], waitlist=False
    )
    assert r.status_code == 409 and r.json()["full"] is True and r.json()["rule"] == "AS-04"
    assert await counts(svc, course["id"]) == (2, 2)


async def test_as04_rush_200_parents_at_once_for_30_seats(svc, mint):
    school, _plan, (course,) = await menu(svc, mint, students=200, capacity=30)
    tokens = [parent_token(mint, school, i) for i in range(200)]

    async def one(i):
        return await enroll(svc.client, tokens[i], school.students[i], course["id"])

    responses = await asyncio.gather(*(one(i) for i in range(200)))
    assert all(r.status_code == 201 for r in responses), {r.status_code for r in responses}
    statuses = [r.json()["status"] for r in responses]
    assert statuses.count("held") == 30
    assert statuses.count("waitlisted") == 170
    assert await counts(svc, course["id"]) == (30, 30)
    positions = sorted(
        r.json()["waitlist_position"] for r in responses if r.json()["waitlist_position"]
    )
    assert positions == list(range(1, 171))
    async with svc.ctx.db.read() as session:
        live = (
            (
                await session.execute(
                    select(Enrollment.student_id).where(Enrollment.course_id == course["id"])
                )
            )
            .scalars()
            .all()
        )
    assert len(live) == len(set(live)) == 200


async def test_as04_lottery_is_seeded_reproducible_and_ignores_who_pressed_first(svc, mint):
    seed = "jinhua-2026-autumn-draw"
    school, plan, (course,) = await menu(
        svc, mint, students=12, capacity=5, mode="lottery", seed=seed
    )
    assert plan["id"]
    for i in range(12):
        r = await enroll(
            svc.client, parent_token(mint, school, i), school.students[i], course["id"]
        )
        assert r.status_code == 201 and r.json()["status"] == "applied"
    token = admin_token(mint, school)
    r = await svc.client.post(f"/plans/{plan['id']}/lottery", headers=auth(token))
    assert r.status_code == 409 and r.json()["rule"] == "AS-04"  # window still open
    async with svc.ctx.db.transaction() as session:
        await session.execute(
            update(Plan)
            .where(Plan.id == plan["id"])
            .values(window_closes_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    r = await svc.client.post(f"/plans/{plan['id']}/lottery", headers=auth(token))
    assert r.status_code == 200, r.text
    assert r.json()["seed"] == seed and r.json()["seed_hash"] == rules.seed_hash(seed)
    record = (await svc.client.get(f"/courses/{course['id']}/lottery", headers=auth(token))).json()
    expected = rules.lottery_order(seed, course["id"], school.students)
    assert record["order"] == expected
    assert sorted(record["applicants"]) == sorted(school.students)
    async with svc.ctx.db.read() as session:
        rows = {
            e.student_id: e
            for e in (
                await session.execute(
                    select(Enrollment).where(Enrollment.course_id == course["id"])
                )
            ).scalars()
        }
    assert {s for s, e in rows.items() if e.status == "held"} == set(expected[:5])
    assert [rows[s].waitlist_position for s in expected[5:]] == list(range(1, 8))
    assert await counts(svc, course["id"]) == (5, 5)
    # A second draw is refused.
    r = await svc.client.post(f"/plans/{plan['id']}/lottery", headers=auth(token))
    assert r.status_code == 409
