"""AS-04 sold out: parents who do not want the waitlist, asking for a course
this process knows is full, are told "full" from one shared read — nothing
written — while a retried key still gets its own stored answer, a stranger
still gets 404, and a lost database connection only sends the askers through
the write batch (services/afterschool/rush.py). SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import delete, func, select, text

from chassis.messaging import idempotency_table, outbox_table
from services.afterschool import rush
from services.afterschool.models import ACTIVE_STATUSES, roster
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
from tests.support import eventually

pytestmark = pytest.mark.asyncio


async def full_course(svc, mint, students: int):
    """A one-seat course, taken by child 0, and known full in this process."""
    school = await seed_school(svc.ctx.db, students=students)
    admin = admin_token(mint, school)
    plan = await make_plan(svc.client, admin, school)
    course = await add_course(svc.client, admin, plan["id"], course_body(school, capacity=1))
    await open_window(svc.client, admin, plan["id"])
    tokens = [parent_token(mint, school, i) for i in range(students)]
    first_key = str(uuid.uuid4())
    r = await enroll(
        svc.client, tokens[0], school.students[0], course["id"], key=first_key, waitlist=False
    )
    assert r.status_code == 201 and r.json()["status"] == "held"
    r = await enroll(svc.client, tokens[1], school.students[1], course["id"], waitlist=False)
    assert r.status_code == 409 and r.json()["full"] is True
    assert rush.sold_out_now(course["id"])
    return school, course, tokens, first_key


async def count(svc, table, *where) -> int:
    async with svc.ctx.db.read() as session:
        return (
            await session.execute(select(func.count()).select_from(table).where(*where))
        ).scalar_one()


async def test_as04_sold_out_askers_are_told_full_and_nothing_is_written(svc, mint):
    school, course, tokens, _ = await full_course(svc, mint, students=40)
    keys_before = await count(svc, idempotency_table)
    events_before = await count(svc, outbox_table)
    keys = [str(uuid.uuid4()) for _ in range(38)]
    answers = await asyncio.gather(
        *(
            enroll(
                svc.client,
                tokens[i],
                school.students[i],
                course["id"],
                key=keys[i - 2],
                waitlist=False,
            )
            for i in range(2, 40)
        )
    )
    assert {r.status_code for r in answers} == {409}
    reader = svc.ctx.extras["enroller"].pg_reader
    if reader is not None:  # PostgreSQL: answered by the reader's one statement
        assert reader._conn is not None
    assert all(r.json()["full"] is True and r.json()["rule"] == "AS-04" for r in answers)
    # The same problem+json as any refusal: instance, request id, zh-CN detail.
    for r in answers:
        body = r.json()
        assert r.headers["content-type"] == "application/problem+json"
        assert body["instance"] == "/enrollments" and body["detail"] == "该课程已报满。"
        assert body["request_id"] == r.headers["x-request-id"]
    # Written nowhere: no remembered key, no event.
    assert await count(svc, idempotency_table) == keys_before
    assert await count(svc, outbox_table) == events_before


async def test_as04_sold_out_retry_of_a_seat_taken_replays_its_answer(svc, mint):
    school, course, tokens, first_key = await full_course(svc, mint, students=2)
    # The first parent's app retries its (successful) tap after the course
    # filled: the same key is answered as before, not "full".
    again = await enroll(
        svc.client, tokens[0], school.students[0], course["id"], key=first_key, waitlist=False
    )
    assert again.status_code == 201
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["status"] == "held"


async def test_as04_sold_out_stranger_is_not_told_full(svc, mint):
    school, course, tokens, _ = await full_course(svc, mint, students=3)
    # Parent 1 asks for child 2 (not theirs): 404, as for a missing course.
    r = await enroll(svc.client, tokens[1], school.students[2], course["id"], waitlist=False)
    assert r.status_code == 404
    # No consent: 422 from the decision, not "full".
    r = await enroll(
        svc.client, tokens[2], school.students[2], course["id"], consent=False, waitlist=False
    )
    assert r.status_code == 422
    # A parent token naming no person, for a child nobody is guardian of:
    # still nobody's own child (404), not "full".
    async with svc.ctx.db.transaction() as session:
        await session.execute(
            delete(roster.guardianships).where(
                roster.guardianships.c.student_id == school.students[2]
            )
        )
    r = await enroll(svc.client, mint("parent"), school.students[2], course["id"], waitlist=False)
    assert r.status_code == 404


async def test_as04_sold_out_answers_survive_a_lost_connection(svc, mint):
    school, course, tokens, _ = await full_course(svc, mint, students=6)
    enroller = svc.ctx.extras["enroller"]
    reader = enroller.pg_reader
    if reader is not None:
        # PostgreSQL: the reader keeps one connection; end it under its feet.
        assert reader._conn is not None
        raw = await reader._conn.get_raw_connection()
        pid = raw.driver_connection.get_server_pid()
        async with svc.ctx.db.transaction() as session:
            await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    answers = [
        await enroll(svc.client, tokens[i], school.students[i], course["id"], waitlist=False)
        for i in range(2, 6)
    ]
    assert [r.status_code for r in answers] == [409] * 4
    assert all(r.json()["full"] is True for r in answers)
    if reader is not None:
        # ... and a new connection was taken for the later reads.
        assert reader._conn is not None
        raw = await reader._conn.get_raw_connection()
        assert raw.driver_connection.get_server_pid() != pid


async def test_as04_sold_out_askers_with_live_enrollments_get_the_decisions_answer(svc, mint):
    """Already enrolled in the course, or holding a course in the same slot:
    the decision's own refusal comes before "full", as in check_attempt."""
    # PostgreSQL's statement spells the live statuses out: the model's.
    live = "status IN (" + ", ".join(f"'{s}'" for s in ACTIVE_STATUSES) + ")"
    assert live in rush.SoldOutReader.SQL
    school = await seed_school(svc.ctx.db, students=4)
    admin = admin_token(mint, school)
    plan = await make_plan(svc.client, admin, school)
    course = await add_course(svc.client, admin, plan["id"], course_body(school, capacity=1))
    same_slot = await add_course(
        svc.client, admin, plan["id"], course_body(school, name="围棋", capacity=5)
    )
    await open_window(svc.client, admin, plan["id"])
    tokens = [parent_token(mint, school, i) for i in range(4)]
    r = await enroll(svc.client, tokens[0], school.students[0], course["id"], waitlist=False)
    assert r.status_code == 201
    r = await enroll(svc.client, tokens[1], school.students[1], same_slot["id"])
    assert r.status_code == 201
    r = await enroll(svc.client, tokens[2], school.students[2], course["id"], waitlist=False)
    assert r.status_code == 409 and r.json()["full"] is True
    assert rush.sold_out_now(course["id"])
    mine = await enroll(svc.client, tokens[0], school.students[0], course["id"], waitlist=False)
    assert mine.status_code == 409 and mine.json()["enrollment_status"] == "held"
    clash = await enroll(svc.client, tokens[1], school.students[1], course["id"], waitlist=False)
    assert clash.status_code == 409 and clash.json()["clashes_with"] == same_slot["id"]


async def test_as04_sold_out_answer_follows_a_seat_freed_elsewhere(svc, mint):
    """A seat freed behind this process's back (another replica, written
    straight to the database here) is seen by the next read: the asker gets
    the seat, not "full"."""
    school, course, tokens, _ = await full_course(svc, mint, students=3)
    async with svc.ctx.db.transaction() as session:
        await session.execute(
            text("UPDATE courses SET capacity = capacity + 1 WHERE id = :id"), {"id": course["id"]}
        )
    assert rush.sold_out_now(course["id"])  # this process still thinks it full
    r = await enroll(svc.client, tokens[2], school.students[2], course["id"], waitlist=False)
    assert r.status_code == 201 and r.json()["status"] == "held"
    assert rush.sold_out_now(course["id"])  # full again: that was the last seat


async def test_as04_sold_out_reader_that_cannot_start_keeps_no_connection(svc, mint, monkeypatch):
    """A reader whose statement cannot even be prepared answers through the
    write batch and leaves the pool as it found it (no connection kept half
    set up), then starts again once it can."""
    school, course, tokens, _ = await full_course(svc, mint, students=6)
    reader = svc.ctx.extras["enroller"].pg_reader
    if reader is not None:
        await reader.close()
        monkeypatch.setattr(rush.SoldOutReader, "SQL", "SELEC not sql")
    pool = svc.ctx.db.engine.pool
    writers = svc.ctx.extras["enroller"].writers

    async def pool_idle() -> bool:
        # Background work (relay, consumers, jobs) checks connections out
        # now and then, briefly; a connection kept by a failed start never
        # comes back. The write batches keep theirs (rush.Enroller.writers).
        return pool.checkedout() == sum(w._conn is not None for w in writers)

    if reader is not None:
        await eventually(pool_idle, timeout=5)
    for i in range(2, 5):
        r = await enroll(svc.client, tokens[i], school.students[i], course["id"], waitlist=False)
        assert r.status_code == 409 and r.json()["full"] is True
    if reader is not None:
        assert reader._conn is None
        await eventually(pool_idle, timeout=5)
        monkeypatch.undo()
        r = await enroll(svc.client, tokens[5], school.students[5], course["id"], waitlist=False)
        assert r.status_code == 409 and r.json()["full"] is True
        assert reader._conn is not None
