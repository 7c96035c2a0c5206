"""X-03 for afterschool: bad input is a 4xx problem with field errors, never a
500, and never changes stored data."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from services.afterschool.models import Course, Enrollment, Plan
from tests.afterschool.helpers import (
    PRIMARY_SESSIONS,
    TERM,
    add_course,
    admin_token,
    course_body,
    make_plan,
    open_window,
    parent_token,
    seed_school,
    uid,
)
from tests.support import auth

pytestmark = pytest.mark.asyncio


async def totals(svc):
    counts = []
    async with svc.ctx.db.read() as session:
        for table in (Plan, Course, Enrollment):
            counts.append(
                (await session.execute(select(func.count()).select_from(table))).scalar_one()
            )
    return tuple(counts)


async def test_x03_bad_afterschool_input_is_refused_without_a_500_or_a_write(start_service, mint):
    svc = await start_service("afterschool")
    school = await seed_school(svc.ctx.db)
    token = auth(admin_token(mint, school))
    plan = await make_plan(svc.client, admin_token(mint, school), school)
    course = await add_course(
        svc.client, admin_token(mint, school), plan["id"], course_body(school)
    )
    await open_window(svc.client, admin_token(mint, school), plan["id"])
    before = await totals(svc)
    plan_url = f"/schools/{school.id}/plans"
    cases = [
        (
            "POST",
            plan_url,
            {
                "term": TERM,
                "sessions": [{"start": "15:30+08:00", "end": "17:30"}],
                "fee_standard_fen": 1,
            },
        ),
        (
            "POST",
            plan_url,
            {"term": "不存在的学期", "sessions": PRIMARY_SESSIONS, "fee_standard_fen": 1},
        ),
        ("POST", plan_url, {"term": TERM, "sessions": [], "fee_standard_fen": 1}),
        ("POST", plan_url, {"term": TERM, "sessions": PRIMARY_SESSIONS, "fee_standard_fen": -1}),
        (
            "POST",
            plan_url,
            {"term": TERM, "sessions": PRIMARY_SESSIONS, "fee_standard_fen": 1, "x": 1},
        ),
        ("POST", f"/plans/{plan['id']}/courses", course_body(school, weekdays=[9])),
        ("POST", f"/plans/{plan['id']}/courses", course_body(school, capacity="many")),
        ("POST", f"/plans/{plan['id']}/courses", course_body(school, start="16:30", end="15:30")),
        (
            "POST",
            f"/plans/{plan['id']}/courses",
            course_body(school, provider_type="parent_committee"),
        ),
        ("POST", f"/plans/{plan['id']}/courses", course_body(school, teacher_id=uid())),
        (
            "PUT",
            f"/plans/{plan['id']}/window",
            {
                "opens_at": "2026-09-01T08:00:00",
                "closes_at": "2026-09-02T08:00:00+08:00",
                "mode": "first_come",
            },
        ),
        (
            "PUT",
            f"/plans/{plan['id']}/window",
            {
                "opens_at": "2026-09-01T08:00:00+08:00",
                "closes_at": "2026-09-02T08:00:00+08:00",
                "mode": "rush",
            },
        ),
        ("POST", f"/plans/{plan['id']}/fees/settle", {"month": "2026-13"}),
        ("PUT", f"/courses/{course['id']}/sessions/not-a-date/roll-call", {"marks": []}),
    ]
    for method, url, body in cases:
        r = await svc.client.request(method, url, json=body, headers=token)
        assert 400 <= r.status_code < 500, (url, body, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["detail"]
    r = await svc.client.post(
        "/enrollments",
        content=b"{not json",
        headers={
            **auth(parent_token(mint, school, 0)),
            "Idempotency-Key": uid(),
            "Content-Type": "application/json",
        },
    )
    assert r.status_code == 422
    r = await svc.client.post(
        "/enrollments",
        json={"student_id": school.students[0], "course_id": uid(), "consent": True},
        headers={**auth(parent_token(mint, school, 0)), "Idempotency-Key": uid()},
    )
    assert r.status_code == 404
    assert await totals(svc) == before


async def test_x03_enrollment_route_refuses_bad_input_field_by_field(start_service, mint):
    """POST /enrollments runs without FastAPI's dependency solving (the rush
    route): bad input is still a 422 problem naming each field, a missing
    token a 401, and the route is still documented in OpenAPI."""
    svc = await start_service("afterschool")
    school = await seed_school(svc.ctx.db)
    headers = {**auth(parent_token(mint, school, 0)), "Idempotency-Key": uid()}
    r = await svc.client.post(
        "/enrollments?waitlist=perhaps",
        json={"student_id": school.students[0], "consent": "maybe"},
        headers=headers,
    )
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    fields = {e["field"] for e in r.json()["errors"]}
    assert fields == {"query.waitlist", "body.course_id", "body.consent"}
    r = await svc.client.post(
        "/enrollments",
        json={"student_id": school.students[0], "course_id": uid(), "consent": True, "x": 1},
        headers=headers,
    )
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} == {"body.x"}
    r = await svc.client.post(
        "/enrollments",
        json={"student_id": school.students[0], "course_id": uid(), "consent": True},
        headers={"Idempotency-Key": uid()},
    )
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["x-request-id"]  # still inside the chassis's request context
    metrics = (await svc.client.get("/metrics")).text
    assert 'route="/enrollments",service="afterschool",status="422"' in metrics
    r = await svc.client.get("/openapi.json")
    operation = r.json()["paths"]["/enrollments"]["post"]
    assert "201" in operation["responses"]
    assert {p["name"] for p in operation["parameters"]} >= {"waitlist"}
