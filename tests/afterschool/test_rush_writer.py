"""AS-04 the rush's write batches run on a connection their worker keeps
(PostgreSQL; `chassis.db.KeptConnection`) and write the outbox rows in the
batch's one statement: a connection killed behind their back costs no seat,
no answer and no event, and the events keep the order of the decisions.
SQLite and PostgreSQL (on SQLite the batches use the ordinary transaction)."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import func, select, text

from chassis.messaging import outbox_table
from services.afterschool import rush
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
from tests.support import eventually

pytestmark = pytest.mark.asyncio


async def _open_course(svc, mint, students: int, capacity: int):
    school = await seed_school(svc.ctx.db, students=students)
    admin = admin_token(mint, school)
    plan = await make_plan(svc.client, admin, school)
    course = await add_course(svc.client, admin, plan["id"], course_body(school, capacity=capacity))
    await open_window(svc.client, admin, plan["id"])
    tokens = [parent_token(mint, school, i) for i in range(students)]
    return school, course, tokens


async def _backend_pids(writers) -> set[int]:
    pids = set()
    for writer in writers:
        if writer._conn is not None:
            raw = await writer._conn.get_raw_connection()
            pids.add(raw.driver_connection.get_server_pid())
    return pids


async def test_as04_a_killed_batch_connection_loses_no_seat_and_is_replaced(svc, mint):
    school, course, tokens = await _open_course(svc, mint, students=8, capacity=3)
    first = await enroll(svc.client, tokens[0], school.students[0], course["id"])
    assert first.status_code == 201 and first.json()["status"] == "held"
    writers = svc.ctx.extras["enroller"].writers  # made with the first enrollment
    killed: set[int] = set()
    if not svc.ctx.db.is_sqlite:
        killed = await _backend_pids(writers)
        assert killed  # kept after the batch
        async with svc.ctx.db.transaction() as session:
            for pid in killed:
                await session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    answers = await asyncio.gather(
        *(enroll(svc.client, tokens[i], school.students[i], course["id"]) for i in range(1, 8))
    )
    assert [r.status_code for r in answers] == [201] * 7
    statuses = sorted(r.json()["status"] for r in [first, *answers])
    assert statuses == ["held"] * 3 + ["waitlisted"] * 5
    positions = sorted(
        r.json()["waitlist_position"] for r in answers if r.json()["status"] == "waitlisted"
    )
    assert positions == [1, 2, 3, 4, 5]
    async with svc.ctx.db.read() as session:
        seats = (
            await session.execute(select(Course.seats_taken).where(Course.id == course["id"]))
        ).scalar_one()
        held = (
            await session.execute(
                select(func.count())
                .select_from(Enrollment)
                .where(Enrollment.course_id == course["id"], Enrollment.status == "held")
            )
        ).scalar_one()
        events = (
            await session.execute(
                select(func.count())
                .select_from(outbox_table)
                .where(outbox_table.c.payload.contains(course["id"]))
            )
        ).scalar_one()
    assert seats == held == 3
    assert events == 8  # one enrollment event per decision, none lost or doubled
    if killed:
        # A later batch took a new connection and kept it.
        r = await enroll(svc.client, tokens[0], school.students[0], course["id"])
        assert r.status_code == 409  # already enrolled: decided, on a live connection
        now = await _backend_pids(writers)
        assert now and not now & killed


async def test_as04_batch_events_follow_the_decisions_order_and_are_published(svc, mint):
    school, course, tokens = await _open_course(svc, mint, students=12, capacity=4)
    answers = await asyncio.gather(
        *(enroll(svc.client, tokens[i], school.students[i], course["id"]) for i in range(12))
    )
    assert [r.status_code for r in answers] == [201] * 12
    async with svc.ctx.db.read() as session:
        rows = (
            await session.execute(
                select(outbox_table.c.payload)
                .where(outbox_table.c.payload.contains(course["id"]))
                .order_by(outbox_table.c.position)
            )
        ).all()
    decided = [json.loads(row.payload)["data"] for row in rows]
    assert len(decided) == 12
    # Publishing order is the decisions' order: the seats first, then the
    # waitlist in its own order.
    assert [d["status"] for d in decided] == ["held"] * 4 + ["waitlisted"] * 8
    assert [d["waitlist_position"] for d in decided[4:]] == list(range(1, 9))
    by_id = {r.json()["id"]: r.json() for r in answers}
    assert {d["id"] for d in decided} == set(by_id)
    assert all(by_id[d["id"]]["status"] == d["status"] for d in decided)

    async def all_published() -> bool:
        async with svc.ctx.db.read() as session:
            pending = (
                await session.execute(
                    select(func.count())
                    .select_from(outbox_table)
                    .where(
                        outbox_table.c.payload.contains(course["id"]),
                        outbox_table.c.published_at.is_(None),
                    )
                )
            ).scalar_one()
        return pending == 0

    await eventually(all_published, timeout=10)


async def test_as04_batch_connections_plan_by_index_and_keep_it_from_the_pool(svc, mint):
    """The rush's kept connections plan by index whatever the statistics say
    (rush.INDEX_PLANS); the pool's connections are left as they are."""
    school, course, tokens = await _open_course(svc, mint, students=2, capacity=3)
    r = await enroll(svc.client, tokens[0], school.students[0], course["id"])
    assert r.status_code == 201
    enroller = svc.ctx.extras["enroller"]
    if svc.ctx.db.is_sqlite:
        # One writer per database: the batches take the ordinary transaction.
        assert all(w._conn is None for w in enroller.writers)
        return
    kept = [w for w in enroller.writers if w._conn is not None]
    assert kept
    for writer in kept:
        assert (await writer._conn.execute(text("SHOW enable_seqscan"))).scalar_one() == "off"
    async with svc.ctx.db.transaction() as session:
        assert (await session.execute(text("SHOW enable_seqscan"))).scalar_one() == "on"
    await enroller.close()  # as at shutdown: the kept connections are not pooled again
    assert all(w._conn is None for w in enroller.writers)
    for _ in range(svc.ctx.db.engine.pool.size() + 2):
        async with svc.ctx.db.transaction() as session:
            assert (await session.execute(text("SHOW enable_seqscan"))).scalar_one() == "on"


async def test_as04_batches_of_many_courses_get_kept_connections_up_to_a_bound(svc, mint):
    """A school opening its whole menu: batches of unrelated courses are in
    flight side by side, each on a kept (index-planned) connection up to
    rush.MAX_WRITERS, then on the pool's; every seat is still counted once."""
    school = await seed_school(svc.ctx.db, students=60)
    admin = admin_token(mint, school)
    plan = await make_plan(svc.client, admin, school)
    courses = []
    for i in range(6):
        body = course_body(school, capacity=5, name=f"兴趣课{i}")
        courses.append(await add_course(svc.client, admin, plan["id"], body))
    await open_window(svc.client, admin, plan["id"])
    tokens = [parent_token(mint, school, i) for i in range(60)]
    answers = await asyncio.gather(
        *(
            enroll(svc.client, tokens[i], school.students[i], courses[i % 6]["id"])
            for i in range(60)
        )
    )
    assert [r.status_code for r in answers] == [201] * 60
    enroller = svc.ctx.extras["enroller"]
    assert enroller.batch_failures == 0
    assert rush.PIPELINE_DEPTH <= len(enroller.writers) <= rush.MAX_WRITERS
    async with svc.ctx.db.read() as session:
        for course in courses:
            seats = (await session.get(Course, course["id"])).seats_taken
            held = (
                await session.execute(
                    select(func.count()).where(
                        Enrollment.course_id == course["id"], Enrollment.status == "held"
                    )
                )
            ).scalar_one()
            assert seats == held == 5

    # Taken while all are busy: new kept connections up to the bound, then none.
    taken = [enroller._idle_writer() for _ in range(rush.MAX_WRITERS + 1)]
    assert [w is None for w in taken] == [False] * rush.MAX_WRITERS + [True]
    assert len(enroller.writers) == rush.MAX_WRITERS
    assert all(w.settings == rush.INDEX_PLANS for w in taken if w is not None)
    enroller.idle_writers.extend(w for w in taken if w is not None)
