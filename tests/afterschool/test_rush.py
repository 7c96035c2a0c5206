"""AS-04 the rush: 10,000 enrollment attempts from 5,000 students for 100 seats,
at concurrency 64 and 256, through the HTTP API with Idempotency-Key.

Exactly 100 held, none oversold, none leaked (seats taken = enrollments held),
no student twice, and the waitlist gap-free and promoted in its exact order.
Runs on SQLite and, with TEST_DATABASE=postgresql, on PostgreSQL.

The figures above are the issue's; they take minutes on a shared 2-CPU
machine, so the default suite runs the same scenario at a fifth of the size
(2,000 attempts from 1,000 students, still 100 seats and both concurrencies)
and ``AS_RUSH_FULL=1`` runs the full size.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import pytest
from sqlalchemy import func, select

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
from tests.support import auth

pytestmark = pytest.mark.asyncio

FULL = os.environ.get("AS_RUSH_FULL") == "1"
STUDENTS = 5_000 if FULL else 1_000
ATTEMPTS = 2 * STUDENTS
SEATS = 100


async def ledger(svc, course_id):
    async with svc.ctx.db.read() as session:
        course = await session.get(Course, course_id)
        rows = (
            await session.execute(
                select(Enrollment.student_id, Enrollment.status, Enrollment.waitlist_position)
                .where(Enrollment.course_id == course_id)
                .order_by(Enrollment.waitlist_position)
            )
        ).all()
        held = (
            await session.execute(
                select(func.count()).where(
                    Enrollment.course_id == course_id, Enrollment.status == "held"
                )
            )
        ).scalar_one()
    return course, rows, held


@pytest.mark.parametrize("concurrency", [64, 256])
async def test_as04_rush_two_taps_per_student_for_100_seats(start_service, mint, concurrency):
    svc = await start_service("afterschool")
    school = await seed_school(svc.ctx.db, students=STUDENTS)
    admin = admin_token(mint, school)
    plan = await make_plan(svc.client, admin, school)
    course = await add_course(svc.client, admin, plan["id"], course_body(school, capacity=SEATS))
    await open_window(svc.client, admin, plan["id"])
    tokens = [parent_token(mint, school, i) for i in range(STUDENTS)]
    gate = asyncio.Semaphore(concurrency)

    async def attempt(i: int):
        student = i % STUDENTS
        # Every student taps twice: half retry with the same key, half with a new one.
        key = f"tap-{student}" if (i >= STUDENTS and student % 2 == 0) else f"tap-{i}"
        if i < STUDENTS:
            key = f"tap-{student}"
        async with gate:
            r = await enroll(
                svc.client, tokens[student], school.students[student], course["id"], key=key
            )
        return student, r

    results = await asyncio.gather(*(attempt(i) for i in range(ATTEMPTS)))
    codes = Counter(r.status_code for _, r in results)
    assert set(codes) <= {201, 409}, codes  # never a 500, never a 422 here
    statuses = Counter(r.json()["status"] for _, r in results if r.status_code == 201)
    # Replays repeat the first answer; seat-taking happened once per student.
    firsts = {}
    for student, r in results:
        if r.status_code == 201 and r.headers.get("Idempotent-Replayed") != "true":
            assert student not in firsts, "a student got two fresh enrollments"
            firsts[student] = r.json()
    assert len(firsts) == STUDENTS
    assert Counter(v["status"] for v in firsts.values()) == {
        "held": SEATS,
        "waitlisted": STUDENTS - SEATS,
    }
    assert statuses["held"] >= SEATS

    c, rows, held = await ledger(svc, course["id"])
    assert held == SEATS == c.seats_taken  # 0 oversold, 0 leaked
    # Decided in batches, none undone: a retried key whose first tap was in
    # the batch before is read as answered (under the child's lock), not
    # claimed twice; a broken batch path would fall back here silently.
    enroller = svc.ctx.extras["enroller"]
    assert enroller.batches > 0 and enroller.batch_failures == 0
    students = [r.student_id for r in rows]
    assert len(students) == len(set(students)) == STUDENTS  # no duplicate student
    positions = [r.waitlist_position for r in rows if r.status == "waitlisted"]
    assert positions == list(range(1, STUDENTS - SEATS + 1))  # FIFO, gap-free

    # Waitlist order exact: freed seats go to positions 1, 2, 3 in that order.
    by_position = {r.waitlist_position: r.student_id for r in rows if r.status == "waitlisted"}
    holders = [s for s, v in firsts.items() if v["status"] == "held"][:3]
    for n, student in enumerate(holders, start=1):
        mine = (
            await svc.client.get(
                f"/students/{school.students[student]}/enrollments", headers=auth(tokens[student])
            )
        ).json()
        r = await svc.client.post(
            f"/enrollments/{mine[0]['id']}/withdraw", headers=auth(tokens[student])
        )
        assert r.status_code == 200
        c, rows, held = await ledger(svc, course["id"])
        assert held == SEATS == c.seats_taken
        now_held = {r.student_id for r in rows if r.status == "held"}
        assert by_position[n] in now_held
        assert by_position[n + 1] not in now_held
