"""AS-05 fees, AS-06 attendance and leaving, AS-07 evaluation, AS-08 oversight."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest
from sqlalchemy import select, update

from chassis.messaging import outbox_table
from services.afterschool.models import Enrollment
from tests.afterschool.helpers import (
    TERM,
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
NOV = ["2026-11-02", "2026-11-04", "2026-11-09"]  # Mon, Wed, Mon


async def running_course(svc, mint, *, students=3, fee=18000):
    school = await seed_school(svc.ctx.db, students=students)
    token = admin_token(mint, school)
    plan = await make_plan(svc.client, token, school)
    course = await add_course(
        svc.client, token, plan["id"], course_body(school, weekdays=[1, 3], fee_fen=fee)
    )
    await add_course(  # "1+1" in jinhua: an interest period on the other days too
        svc.client,
        token,
        plan["id"],
        course_body(school, name="社团", kind="club", weekdays=[2, 4, 5]),
    )
    await open_window(svc.client, token, plan["id"])
    for i in range(students):
        r = await enroll(
            svc.client, parent_token(mint, school, i), school.students[i], course["id"]
        )
        assert r.json()["status"] == "held"
    # The seats were taken at the start of term.
    async with svc.ctx.db.transaction() as session:
        await session.execute(
            update(Enrollment)
            .where(Enrollment.course_id == course["id"])
            .values(held_from=dt.datetime(2026, 8, 31, 16, tzinfo=dt.UTC))
        )
    teacher = mint("teacher", tenants=[f"school:{school.id}"], person_id=school.teacher_id)
    return school, plan, course, teacher


async def events(svc, type_):
    async with svc.ctx.db.read() as session:
        rows = (
            await session.execute(
                select(outbox_table.c.payload)
                .where(outbox_table.c.type == type_)
                .order_by(outbox_table.c.position)
            )
        ).scalars()
        return [json.loads(p)["data"] for p in rows]


async def test_as06_roll_call_by_course_teacher_only_and_guardians_notified(svc, mint):
    school, _plan, course, teacher = await running_course(svc, mint)
    marks = {
        "marks": [
            {"student_id": school.students[0], "status": "present"},
            {"student_id": school.students[1], "status": "absent"},
            {"student_id": school.students[2], "status": "excused"},
        ]
    }
    url = f"/courses/{course['id']}/sessions/2026-11-02/roll-call"
    other_teacher = mint("teacher", tenants=[f"school:{school.id}"], person_id=uid())
    assert (await svc.client.put(url, json=marks, headers=auth(other_teacher))).status_code == 404
    admin = admin_token(mint, school)
    assert (await svc.client.put(url, json=marks, headers=auth(admin))).status_code == 404
    r = await svc.client.put(url, json=marks, headers=auth(teacher))
    assert r.status_code == 200, r.text
    recorded = await events(svc, "afterschool.attendance.recorded.v1")
    assert {(e["student_id"], e["status"]) for e in recorded} == {
        (school.students[0], "present"),
        (school.students[1], "absent"),
        (school.students[2], "excused"),
    }
    # Not a session day (Tuesday) and an unenrolled student are refused.
    r = await svc.client.put(
        f"/courses/{course['id']}/sessions/2026-11-03/roll-call", json=marks, headers=auth(teacher)
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-06"
    r = await svc.client.put(
        url, json={"marks": [{"student_id": uid(), "status": "present"}]}, headers=auth(teacher)
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-06"
    sheet = await svc.client.get(f"/courses/{course['id']}/roll-call-sheet", headers=auth(teacher))
    assert len(sheet.json()["students"]) == 3


async def test_as06_leaving_by_guardian_alone_with_consent_or_flexible(svc, mint):
    school, _plan, _course, teacher = await running_course(svc, mint)
    url = f"/schools/{school.id}/exits"
    base = {"date": "2026-11-02", "left_at": "2026-11-02T10:05:00+00:00"}
    stranger = {
        **base,
        "student_id": school.students[0],
        "mode": "guardian_pickup",
        "guardian_id": uid(),
    }
    r = await svc.client.post(url, json=stranger, headers=auth(teacher))
    assert r.status_code == 422 and r.json()["rule"] == "AS-06"
    ok = {**stranger, "guardian_id": school.guardians[0]}
    assert (await svc.client.post(url, json=ok, headers=auth(teacher))).status_code == 201
    alone = {**base, "student_id": school.students[1], "mode": "alone_with_consent"}
    r = await svc.client.post(url, json=alone, headers=auth(teacher))
    assert r.status_code == 422 and r.json()["rule"] == "AS-06"
    # Another parent cannot consent for this child; the child's guardian can.
    consent = f"/students/{school.students[1]}/leave-alone-consent"
    other = parent_token(mint, school, 0)
    assert (await svc.client.put(consent, headers=auth(other))).status_code == 404
    assert (
        await svc.client.put(consent, headers=auth(parent_token(mint, school, 1)))
    ).status_code == 200
    assert (await svc.client.post(url, json=alone, headers=auth(teacher))).status_code == 201
    flexible = {
        **base,
        "student_id": school.students[2],
        "mode": "flexible_early",
        "reason": "路远",
    }
    assert (await svc.client.post(url, json=flexible, headers=auth(teacher))).status_code == 201
    left = await events(svc, "afterschool.student.left.v1")
    assert [e["mode"] for e in left] == ["guardian_pickup", "alone_with_consent", "flexible_early"]
    assert left[0]["guardian_id"] == school.guardians[0]
    other_school = await seed_school(svc.ctx.db, students=0)
    outsider = mint("teacher", tenants=[f"school:{other_school.id}"], person_id=uid())
    assert (await svc.client.post(url, json=flexible, headers=auth(outsider))).status_code == 404


async def test_as05_fees_advance_then_settled_on_days_served_with_waiver_and_refund(svc, mint):
    school, plan, course, teacher = await running_course(svc, mint, students=2, fee=18000)
    for day in NOV:
        r = await svc.client.put(
            f"/courses/{course['id']}/sessions/{day}/roll-call",
            json={
                "marks": [
                    {"student_id": school.students[0], "status": "present"},
                    {"student_id": school.students[1], "status": "present"},
                ]
            },
            headers=auth(teacher),
        )
        assert r.status_code == 200
    admin = admin_token(mint, school)
    r = await svc.client.put(
        f"/schools/{school.id}/waivers",
        json={"student_id": school.students[1], "share_percent": 50},
        headers=auth(admin),
    )
    assert r.status_code == 200
    settle = f"/plans/{plan['id']}/fees/settle"
    advance = (await svc.client.post(settle, json={"month": "2026-11"}, headers=auth(admin))).json()
    by_student = {s["student_id"]: s for s in advance}
    first = by_student[school.students[0]]
    # Mondays and Wednesdays of November 2026: 9 sessions, all planned.
    assert (first["planned_sessions"], first["amount_fen"]) == (9, 18000)
    assert by_student[school.students[1]]["amount_fen"] == 9000  # 50 % waiver
    pay = f"/fee-statements/{first['id']}/payments"
    body = {"amount_fen": 18000, "non_tax_account_ref": "FS-2026-11-0001"}
    r = await svc.client.post(pay, json=body, headers={**auth(admin), "Idempotency-Key": "p1"})
    assert r.status_code == 201 and r.json()["statement"]["paid_fen"] == 18000
    replay = await svc.client.post(pay, json=body, headers={**auth(admin), "Idempotency-Key": "p1"})
    assert replay.content == r.content
    over = await svc.client.post(
        pay,
        json={"amount_fen": 1, "non_tax_account_ref": "FS-2026-11-0002"},
        headers={**auth(admin), "Idempotency-Key": "p2"},
    )
    assert over.status_code == 422 and over.json()["rule"] == "AS-05"
    no_ref = await svc.client.post(
        pay, json={"amount_fen": 1}, headers={**auth(admin), "Idempotency-Key": "p3"}
    )
    assert no_ref.status_code == 422
    paid = await events(svc, "afterschool.fee.paid.v1")
    assert [p["non_tax_account_ref"] for p in paid] == ["FS-2026-11-0001"]
    # Final settlement on days actually served (3 of 9): the rest is refunded.
    final = (
        await svc.client.post(settle, json={"month": "2026-11", "final": True}, headers=auth(admin))
    ).json()
    by_student = {s["student_id"]: s for s in final}
    first = by_student[school.students[0]]
    assert (first["served_sessions"], first["amount_fen"], first["refund_fen"]) == (3, 6000, 12000)
    second = by_student[school.students[1]]
    assert (second["gross_fen"], second["waiver_fen"], second["amount_fen"]) == (6000, 3000, 3000)
    # Each family sees only its own child's statements.
    mine = await svc.client.get(
        f"/students/{school.students[1]}/fee-statements",
        headers=auth(parent_token(mint, school, 1)),
    )
    assert mine.status_code == 200 and mine.json()[0]["waiver_fen"] == 3000
    theirs = await svc.client.get(
        f"/students/{school.students[1]}/fee-statements",
        headers=auth(parent_token(mint, school, 0)),
    )
    assert theirs.status_code == 404


async def test_as05_withdrawal_mid_month_bills_only_held_days(svc, mint):
    school, plan, _course, _teacher = await running_course(svc, mint, students=1, fee=18000)
    parent = parent_token(mint, school, 0)
    enrollments = (
        await svc.client.get(f"/students/{school.students[0]}/enrollments", headers=auth(parent))
    ).json()
    r = await svc.client.post(f"/enrollments/{enrollments[0]['id']}/withdraw", headers=auth(parent))
    assert r.status_code == 200
    async with svc.ctx.db.transaction() as session:
        await session.execute(
            update(Enrollment)
            .where(Enrollment.id == enrollments[0]["id"])
            .values(withdrawn_at=dt.datetime(2026, 11, 10, 12, tzinfo=dt.UTC))
        )
    admin = admin_token(mint, school)
    lines = (
        await svc.client.post(
            f"/plans/{plan['id']}/fees/settle", json={"month": "2026-11"}, headers=auth(admin)
        )
    ).json()
    # Held on Nov 2, 4, 9 (withdrawn on the 10th): 3 of 9 sessions of the month.
    assert (lines[0]["served_sessions"], lines[0]["amount_fen"]) == (3, 6000)


async def test_as07_ratings_only_for_attended_courses_once_a_month(svc, mint):
    school, plan, course, teacher = await running_course(svc, mint, students=2)
    r = await svc.client.put(
        f"/courses/{course['id']}/sessions/2026-11-02/roll-call",
        json={
            "marks": [
                {"student_id": school.students[0], "status": "present"},
                {"student_id": school.students[1], "status": "absent"},
            ]
        },
        headers=auth(teacher),
    )
    assert r.status_code == 200
    url = f"/courses/{course['id']}/ratings"
    body = {"student_id": school.students[0], "month": "2026-11", "score": 5, "comment": "孩子喜欢"}
    parent = auth(parent_token(mint, school, 0))
    assert (await svc.client.post(url, json=body, headers=parent)).status_code == 201
    again = await svc.client.post(url, json=body, headers=parent)
    assert again.status_code == 409 and again.json()["rule"] == "AS-07"
    bad = await svc.client.post(url, json={**body, "score": 6, "month": "2026-12"}, headers=parent)
    assert bad.status_code == 422 and bad.json()["rule"] == "AS-07"
    absent = {**body, "student_id": school.students[1]}
    r = await svc.client.post(url, json=absent, headers=auth(parent_token(mint, school, 1)))
    assert r.status_code == 422 and r.json()["rule"] == "AS-07"
    r = await svc.client.post(url, json=absent, headers=parent)  # not their child
    assert r.status_code == 404
    survey = f"/plans/{plan['id']}/surveys"
    answer = {"student_id": school.students[0], "score": 4}
    assert (await svc.client.post(survey, json=answer, headers=parent)).status_code == 201
    r = await svc.client.post(survey, json=answer, headers=parent)
    assert r.status_code == 409 and r.json()["rule"] == "AS-07"


async def test_as08_region_oversight_figures_below_target_and_csv(svc, mint):
    served_school, plan, _course, _teacher = await running_course(svc, mint, students=3)
    admin = admin_token(mint, served_school)
    await svc.client.put(
        f"/schools/{served_school.id}/waivers",
        json={"student_id": served_school.students[0], "share_percent": 100},
        headers=auth(admin),
    )
    await svc.client.post(
        f"/plans/{plan['id']}/surveys",
        json={"student_id": served_school.students[0], "score": 5},
        headers=auth(parent_token(mint, served_school, 0)),
    )
    low = await seed_school(svc.ctx.db, students=10)
    low_admin = admin_token(mint, low)
    low_plan = await make_plan(svc.client, low_admin, low)
    low_course = await add_course(svc.client, low_admin, low_plan["id"], course_body(low))
    await open_window(svc.client, low_admin, low_plan["id"])
    for i in range(8):  # 8 of 10 = 80 % < 90 %
        await enroll(svc.client, parent_token(mint, low, i), low.students[i], low_course["id"])
    no_plan = await seed_school(svc.ctx.db, students=4)

    bureau = mint("bureau", tenants=["region:jinhua"])
    r = await svc.client.get(
        "/oversight/regions/jinhua", params={"term": TERM}, headers=auth(bureau)
    )
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["schools"] == 3 and report["schools_with_plan"] == 2
    assert report["coverage"] == "0.6667"
    assert (report["students"], report["served"]) == (17, 11)
    below = {s["school_id"] for s in report["below_target"]}
    assert below == {low.id, no_plan.id}
    rows = {s["school_id"]: s for s in report["by_school"]}
    top = rows[served_school.id]
    assert top["served_share"] == "1.0000" and top["meets_target"] is True
    assert (top["difficulty"], top["difficulty_served"]) == (1, 1)
    assert top["satisfaction"] == "5.00" and top["external_share"] == "0.0000"
    assert "name" not in json.dumps(report["by_school"]).replace("school_name", "")
    r = await svc.client.get(
        "/oversight/regions/jinhua", params={"term": TERM, "format": "csv"}, headers=auth(bureau)
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.text.startswith("\ufeff")  # Excel needs the BOM for Chinese
    table = list(csv.DictReader(io.StringIO(r.text.removeprefix("\ufeff"))))
    assert {row["school_id"] for row in table} == {served_school.id, low.id, no_plan.id}
    # Another region's bureau, a school admin for the whole region: 404.
    other = mint("bureau", tenants=["region:weihai-huancui"])
    r = await svc.client.get(
        "/oversight/regions/jinhua", params={"term": TERM}, headers=auth(other)
    )
    assert r.status_code == 404
    r = await svc.client.get(
        "/oversight/regions/jinhua", params={"term": TERM}, headers=auth(admin)
    )
    assert r.status_code == 404
    r = await svc.client.get(
        "/oversight/regions/jinhua",
        params={"term": TERM, "school_id": served_school.id},
        headers=auth(admin),
    )
    assert r.status_code == 200 and r.json()["schools"] == 1
