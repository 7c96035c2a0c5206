"""AS-04 the group-commit path of enrollment (services/afterschool/rush.py):
one Idempotency-Key never gets two different answers, a batch that fails
leaves no partial seat (one transaction), and a failed batch's attempts are
still decided correctly one at a time. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections import Counter

import pytest
from sqlalchemy import event, func, select

from chassis.auth import Principal
from chassis.idempotency import IdempotentRequest
from chassis.messaging import idempotency_table, outbox_table
from services.afterschool import api, rush, schemas
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


async def hot_course(svc, mint, *, students: int, capacity: int):
    school = await seed_school(svc.ctx.db, students=students)
    admin = admin_token(mint, school)
    plan = await make_plan(svc.client, admin, school)
    course = await add_course(svc.client, admin, plan["id"], course_body(school, capacity=capacity))
    await open_window(svc.client, admin, plan["id"])
    return school, course


async def ledger(svc, course_id):
    async with svc.ctx.db.read() as session:
        seats = (await session.get(Course, course_id, populate_existing=True)).seats_taken
        held = (
            await session.execute(
                select(func.count()).where(
                    Enrollment.course_id == course_id, Enrollment.status == "held"
                )
            )
        ).scalar_one()
        rows = (
            await session.execute(select(func.count()).where(Enrollment.course_id == course_id))
        ).scalar_one()
        keys = (
            await session.execute(select(func.count()).select_from(idempotency_table))
        ).scalar_one()
        events = (
            await session.execute(
                select(func.count()).where(
                    outbox_table.c.type == "afterschool.enrollment.changed.v1"
                )
            )
        ).scalar_one()
    return seats, held, rows, keys, events


def fail_once(svc, marker: str):
    """A crash at the batch's last write: the first statement containing
    ``marker`` raises (as a dropped connection would)."""
    state = {"raised": 0}
    engine = svc.ctx.db.engine.sync_engine

    def before(conn, cursor, statement, parameters, context, executemany):
        if marker in statement and not state["raised"]:
            state["raised"] += 1
            raise RuntimeError("injected crash before commit")

    event.listen(engine, "before_cursor_execute", before)
    return state, lambda: event.remove(engine, "before_cursor_execute", before)


async def test_as04_one_key_one_answer_under_concurrent_repeats(svc, mint):
    school, course = await hot_course(svc, mint, students=40, capacity=5)
    tokens = [parent_token(mint, school, i) for i in range(40)]

    async def tap(i: int, key: str):
        return i, await enroll(
            svc.client, tokens[i], school.students[i], course["id"], key=key, waitlist=False
        )

    # Every student sends the same request 5 times at once with one key.
    results = await asyncio.gather(*(tap(i % 40, f"same-{i % 40}") for i in range(200)))
    by_student: dict[int, set[bytes]] = {}
    for i, r in results:
        assert r.status_code in (201, 409), r.text
        if r.status_code == 409 and r.json().get("slug") == "idempotency/in-flight":
            continue  # "still running, retry": not an answer
        by_student.setdefault(i, set()).add(r.content)
    assert all(len(bodies) == 1 for bodies in by_student.values())  # one answer per key
    held = [i for i, r in results if r.status_code == 201]
    assert len(set(held)) == 5  # 5 seats, each to one student, whatever the repeats
    # Sold out now: a retry of a held request is replayed, never told "full".
    for i in set(held):
        again = (await tap(i, f"same-{i}"))[1]
        assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true"
        assert again.json()["status"] == "held"
    # A loser's retry repeats the same "full" answer; the same key for another
    # request is refused.
    loser = next(i for i in range(40) if i not in held)
    again = (await tap(loser, f"same-{loser}"))[1]
    assert again.status_code == 409 and again.json()["full"] is True
    other = await enroll(
        svc.client, tokens[loser], school.students[loser], course["id"], key=f"same-{loser}"
    )
    assert other.status_code == 422  # same key, different request (waitlist wanted)
    seats, held_rows, _, _, _ = await ledger(svc, course["id"])
    assert seats == held_rows == 5


async def test_as04_failed_batch_writes_nothing_then_attempts_are_decided_one_by_one(svc, mint):
    school, course = await hot_course(svc, mint, students=30, capacity=10)
    before = await ledger(svc, course["id"])

    # (1) The batch transaction dies at its last statement: nothing of it stays.
    claims = []
    attempts = []
    for i in range(30):
        principal = Principal(
            subject=f"p{i}",
            kind="user",
            roles=frozenset({"parent"}),
            person_id=school.guardians[i],
        )
        claim = IdempotentRequest(f"p{i}", f"k{i}", "f" * 64, dt.datetime.now(dt.UTC))
        claims.append(claim)
        data = schemas.EnrollIn(student_id=school.students[i], course_id=course["id"], consent=True)
        attempts.append(rush.Attempt(principal, data, True, claim))
    state, remove = fail_once(svc, "INSERT INTO idempotency_keys")
    try:
        with pytest.raises(RuntimeError):
            await rush.decide(svc.ctx.db, attempts)
    finally:
        remove()
    assert state["raised"] == 1
    assert await ledger(svc, course["id"]) == before  # no seat, row, event or key

    # (2) Through the API: a batch that fails falls back to one attempt at a
    # time; every attempt is answered and the ledger is exact.
    tokens = [parent_token(mint, school, i) for i in range(30)]
    enroller = api._enroller(svc.ctx)
    failures = enroller.batch_failures
    state, remove = fail_once(svc, "INSERT INTO enrollments")
    try:
        results = await asyncio.gather(
            *(enroll(svc.client, tokens[i], school.students[i], course["id"]) for i in range(30))
        )
    finally:
        remove()
    assert state["raised"] == 1
    assert enroller.batch_failures == failures + 1  # counted (and logged)
    assert Counter(r.status_code for r in results) == {201: 30}
    assert Counter(r.json()["status"] for r in results) == {"held": 10, "waitlisted": 20}
    seats, held, rows, _, events = await ledger(svc, course["id"])
    assert (seats, held, rows) == (10, 10, 30)
    assert events == 30
    positions = sorted(
        r.json()["waitlist_position"] for r in results if r.json()["status"] == "waitlisted"
    )
    assert positions == list(range(1, 21))


async def test_as04_seat_freed_is_not_hidden_by_the_sold_out_memory(svc, mint):
    school, course = await hot_course(svc, mint, students=3, capacity=1)
    tokens = [parent_token(mint, school, i) for i in range(3)]
    r = await enroll(svc.client, tokens[0], school.students[0], course["id"], waitlist=False)
    assert r.json()["status"] == "held"
    r = await enroll(svc.client, tokens[1], school.students[1], course["id"], waitlist=False)
    assert r.status_code == 409 and r.json()["full"] is True
    assert rush.sold_out_now(course["id"])
    # Known full, but a stranger is not told so: someone else's child is 404.
    r = await enroll(svc.client, tokens[1], school.students[2], course["id"], waitlist=False)
    assert r.status_code == 404
    held = await enroll(
        svc.client, tokens[0], school.students[0], course["id"], key=str(uuid.uuid4())
    )
    assert held.status_code == 409  # already enrolled
    enrollment_id = held.json()["enrollment_id"]
    r = await svc.client.post(f"/enrollments/{enrollment_id}/withdraw", headers=auth(tokens[0]))
    assert r.status_code == 200
    assert not rush.sold_out_now(course["id"])
    r = await enroll(svc.client, tokens[2], school.students[2], course["id"], waitlist=False)
    assert r.status_code == 201 and r.json()["status"] == "held"


async def test_as04_one_batch_many_courses_no_clash_no_duplicate(svc, mint):
    school = await seed_school(svc.ctx.db, students=20)
    admin = admin_token(mint, school)
    plan = await make_plan(svc.client, admin, school)
    same_slot = [
        await add_course(
            svc.client, admin, plan["id"], course_body(school, name=f"篮球{i}", capacity=3)
        )
        for i in range(2)
    ]
    later = await add_course(
        svc.client,
        admin,
        plan["id"],
        course_body(school, name="书法", kind="arts", capacity=3, start="16:30", end="17:30"),
    )
    await open_window(svc.client, admin, plan["id"])
    tokens = [parent_token(mint, school, i) for i in range(20)]
    # Each child taps both same-slot courses and the later one at once.
    results = await asyncio.gather(
        *(
            enroll(svc.client, tokens[i], school.students[i], c["id"])
            for i in range(20)
            for c in (*same_slot, later)
        )
    )
    by_student = [results[3 * i : 3 * i + 3] for i in range(20)]
    for first, second, third in by_student:
        assert third.status_code == 201  # another slot: no clash
        same = sorted([first.status_code, second.status_code])
        assert same == [201, 409]  # one of the two clashing courses, never both
        refused = first if first.status_code == 409 else second
        assert refused.json()["rule"] == "AS-04" and "篮球" in refused.json()["detail"]
    on_same_slot = 0
    for c in same_slot:
        seats, held, rows, _, _ = await ledger(svc, c["id"])
        assert seats == held <= 3  # 0 oversold, 0 leaked
        on_same_slot += rows
    assert on_same_slot == 20  # each child on exactly one of the two
    seats, held, rows, _, _ = await ledger(svc, later["id"])
    assert (seats, held, rows) == (3, 3, 20)  # everyone on it: 3 held, 17 waiting


async def test_as04_key_left_in_flight_by_a_dead_request_is_taken_over_after_its_lease(svc, mint):
    school, course = await hot_course(svc, mint, students=2, capacity=5)
    token = parent_token(mint, school, 0)
    body = {"student_id": school.students[0], "course_id": course["id"], "consent": True}
    headers = {**auth(token), "Idempotency-Key": "dead-1"}
    # What a request that died after claiming its key leaves behind, in flight.
    first = await svc.client.post("/enrollments", json=body, headers=headers)
    assert first.status_code == 201
    async with svc.ctx.db.transaction() as session:
        await session.execute(
            idempotency_table.update()
            .where(idempotency_table.c.key == "dead-1")
            .values(
                status="in_flight", created_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
            )
        )
        await session.execute(Enrollment.__table__.delete())
        await session.execute(Course.__table__.update().values(seats_taken=0))
    fresh = await svc.client.post("/enrollments", json=body, headers=headers)
    assert fresh.status_code == 201 and fresh.json()["status"] == "held"
    # A key still inside its lease is "in flight": retry later, nothing written.
    headers2 = {**auth(parent_token(mint, school, 1)), "Idempotency-Key": "live-1"}
    body2 = {**body, "student_id": school.students[1]}
    r = await svc.client.post("/enrollments", json=body2, headers=headers2)
    assert r.status_code == 201
    async with svc.ctx.db.transaction() as session:
        await session.execute(
            idempotency_table.update()
            .where(idempotency_table.c.key == "live-1")
            .values(status="in_flight", created_at=dt.datetime.now(dt.UTC))
        )
    r = await svc.client.post("/enrollments", json=body2, headers=headers2)
    assert r.status_code == 409 and r.headers["Retry-After"] == "1"
    seats, held, rows, _, _ = await ledger(svc, course["id"])
    assert (seats, held, rows) == (2, 2, 2)


async def test_as04_batch_lost_to_a_key_answered_meanwhile_is_decided_again_as_a_batch(
    svc, mint, monkeypatch
):
    """A key of the batch answered by someone else between the batch's read
    and its write (another replica; a tap retried across two batches) undoes
    the batch — decided again as a batch, that attempt gets the stored answer
    replayed and the others their seats, none of them on the single path."""
    school, course = await hot_course(svc, mint, students=12, capacity=5)
    enroller = api._enroller(svc.ctx)
    failures, batches = enroller.batch_failures, enroller.batches
    now = dt.datetime.now(dt.UTC)
    attempts = []
    for i in range(12):
        principal = Principal(
            subject=f"r{i}", kind="user", roles=frozenset({"parent"}), person_id=school.guardians[i]
        )
        claim = IdempotentRequest(f"r{i}", f"rk{i}", "e" * 64, now)
        data = schemas.EnrollIn(student_id=school.students[i], course_id=course["id"], consent=True)
        attempts.append(rush.Attempt(principal, data, True, claim))

    async def answered_elsewhere() -> None:
        async with svc.ctx.db.transaction() as session:
            await session.execute(
                idempotency_table.insert().values(
                    client="r0",
                    key="rk0",
                    fingerprint="e" * 64,
                    status="done",
                    response_status=201,
                    response_body=b'{"answered_by": "another replica"}',
                    content_type="application/json",
                    created_at=now,
                    completed_at=now,
                )
            )

    if svc.ctx.db.is_sqlite:
        # One writer per SQLite database: no one can answer a key while the
        # batch writes, so the write's finding is raised where it would be.
        real_decide = rush.decide

        async def decide_once_lost(*args, **kwargs):
            monkeypatch.setattr(rush, "decide", real_decide)
            await answered_elsewhere()
            raise rush.BatchLost

        monkeypatch.setattr(rush, "decide", decide_once_lost)
    else:
        real_write = rush._write_pg

        async def write_after_another_answer(*args, **kwargs):
            monkeypatch.setattr(rush, "_write_pg", real_write)
            await answered_elsewhere()  # committed before the batch's write
            return await real_write(*args, **kwargs)

        monkeypatch.setattr(rush, "_write_pg", write_after_another_answer)
    single = []
    real_one = rush.Enroller._one

    async def counted_one(self, attempt):
        single.append(attempt)
        await real_one(self, attempt)

    monkeypatch.setattr(rush.Enroller, "_one", counted_one)

    answers = await asyncio.gather(*(enroller.submit(a) for a in attempts))
    assert enroller.batch_failures == failures + 1
    assert enroller.batches > batches and single == []
    assert answers[0].body == b'{"answered_by": "another replica"}'
    assert answers[0].headers["Idempotent-Replayed"] == "true"
    statuses = Counter(json.loads(a.body)["status"] for a in answers[1:])
    assert statuses == {"held": 5, "waitlisted": 6}
    seats, held, rows, _, _ = await ledger(svc, course["id"])
    assert (seats, held, rows) == (5, 5, 11)
