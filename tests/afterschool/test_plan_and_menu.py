"""AS-01 plan, AS-02 menu, AS-03 providers through the HTTP API."""

from __future__ import annotations

import pytest

from tests.afterschool.helpers import (
    PRIMARY_SESSIONS,
    TERM,
    add_course,
    admin_token,
    course_body,
    make_plan,
    seed_school,
)
from tests.support import auth

pytestmark = pytest.mark.asyncio


async def test_as01_plan_counts_service_days_from_calendar_and_swaps(svc, mint):
    school = await seed_school(svc.ctx.db)
    plan = await make_plan(svc.client, admin_token(mint, school), school)
    days = set(plan["service_days"])
    assert "2026-09-01" in days  # Tuesday, first day of term
    assert "2026-09-20" in days  # Sunday made a working day (调休)
    assert "2026-10-10" in days  # Saturday made a working day
    assert "2026-09-25" not in days  # 中秋节 (Friday)
    assert not any(d in days for d in [f"2026-10-0{i}" for i in range(1, 8)])  # 国庆
    assert "2026-09-05" not in days  # ordinary Saturday
    assert "2027-01-01" not in days  # 元旦 (computed fallback year)
    assert plan["daily_minutes"] == 120
    assert plan["service_day_count"] == len(days)


@pytest.mark.parametrize(
    ("sessions", "needle"),
    [
        ([{"kind": "regular", "start": "16:00", "end": "17:30"}], "120"),
        (
            [
                {"kind": "regular", "start": "15:00", "end": "17:00"},
                {"kind": "delayed_care", "start": "17:00", "end": "18:00"},
            ],
            "17:30",
        ),
        ([{"kind": "regular", "start": "15:30", "end": "17:30"}], "延时托管"),
    ],
)
async def test_as01_plan_refused_with_rule_id(svc, mint, sessions, needle):
    school = await seed_school(svc.ctx.db)
    r = await svc.client.post(
        f"/schools/{school.id}/plans",
        json={"term": TERM, "sessions": sessions, "fee_standard_fen": 100},
        headers=auth(admin_token(mint, school)),
    )
    assert r.status_code == 422
    body = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert body["rule"] == "AS-01"
    assert needle in body["detail"]


async def test_as01_junior_evening_study_ends_by_2030(svc, mint):
    school = await seed_school(svc.ctx.db, stage="junior", grade=8)
    token = admin_token(mint, school)
    base = [
        {"kind": "regular", "start": "16:00", "end": "18:00"},
        {"kind": "delayed_care", "start": "18:00", "end": "18:30"},
    ]
    late = [*base, {"kind": "evening_study", "start": "19:00", "end": "20:45"}]
    r = await svc.client.post(
        f"/schools/{school.id}/plans",
        json={"term": TERM, "sessions": late, "fee_standard_fen": 100},
        headers=auth(token),
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-01"
    assert "20:30" in r.json()["detail"]
    ok = [*base, {"kind": "evening_study", "start": "19:00", "end": "20:30"}]
    plan = await make_plan(svc.client, token, school, sessions=ok)
    assert plan["stage"] == "junior"


async def test_as01_only_the_schools_own_admin_makes_its_plan(svc, mint):
    school = await seed_school(svc.ctx.db)
    other = await seed_school(svc.ctx.db)
    r = await svc.client.post(
        f"/schools/{school.id}/plans",
        json={"term": TERM, "sessions": PRIMARY_SESSIONS, "fee_standard_fen": 100},
        headers=auth(admin_token(mint, other)),
    )
    assert r.status_code == 404
    # nothing was written
    r = await svc.client.get(f"/schools/{school.id}/plans", headers=auth(admin_token(mint, school)))
    assert r.json() == []


async def test_as02_new_lessons_are_not_a_course_kind(svc, mint):
    school = await seed_school(svc.ctx.db)
    token = admin_token(mint, school)
    plan = await make_plan(svc.client, token, school)
    r = await svc.client.post(
        f"/plans/{plan['id']}/courses",
        json=course_body(school, kind="new_lessons"),
        headers=auth(token),
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-02"
    r = await svc.client.post(
        f"/plans/{plan['id']}/courses",
        json=course_body(school, start="14:00", end="15:00"),
        headers=auth(token),
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-02"


async def test_as02_one_plus_one_checked_before_the_window_opens_in_jinhua(svc, mint):
    school = await seed_school(svc.ctx.db)  # jinhua requires "1+1"
    token = admin_token(mint, school)
    plan = await make_plan(svc.client, token, school)
    await add_course(
        svc.client,
        token,
        plan["id"],
        course_body(school, name="作业辅导", kind="homework_guidance", weekdays=[1, 2, 3, 4, 5]),
    )
    await add_course(svc.client, token, plan["id"], course_body(school, weekdays=[1, 2, 3, 4]))
    window = {
        "opens_at": "2026-11-23T00:00:00+00:00",
        "closes_at": "2026-11-30T00:00:00+00:00",
        "mode": "first_come",
    }
    r = await svc.client.put(f"/plans/{plan['id']}/window", json=window, headers=auth(token))
    assert r.status_code == 422 and r.json()["rule"] == "AS-02"
    assert r.json()["weekdays_without_interest"] == [5]
    await add_course(
        svc.client, token, plan["id"], course_body(school, name="合唱", kind="arts", weekdays=[5])
    )
    r = await svc.client.put(f"/plans/{plan['id']}/window", json=window, headers=auth(token))
    assert r.status_code == 200, r.text


async def test_as05_course_fee_within_approved_standard(svc, mint):
    school = await seed_school(svc.ctx.db)
    token = admin_token(mint, school)
    plan = await make_plan(svc.client, token, school, fee_standard_fen=20000)
    r = await svc.client.post(
        f"/plans/{plan['id']}/courses",
        json=course_body(school, fee_fen=20001),
        headers=auth(token),
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-05"
    r = await svc.client.post(
        f"/plans/{plan['id']}/courses",
        json=course_body(school, fee_fen=100, fee_unit="session"),
        headers=auth(token),
    )
    assert r.status_code == 422 and r.json()["rule"] == "AS-05"
