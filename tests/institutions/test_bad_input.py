"""X-03 in institutions: bad input answers problem+json (422/400/409), never a
500, and changes nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from chassis.messaging import outbox_table
from services.institutions import service
from services.institutions.models import Complaint, Course, Institution, LicenceTransition
from tests.institutions.conftest import application, licensed
from tests.institutions.test_api import course_body, subject_institution
from tests.support import auth

pytestmark = pytest.mark.asyncio


async def _counts(svc) -> tuple[int, ...]:
    async with svc.ctx.db.read() as session:
        return tuple(
            [
                int(await session.scalar(select(func.count()).select_from(t)))
                for t in (Institution, LicenceTransition, Course, Complaint, outbox_table)
            ]
        )


def _lessons(*days: str) -> list[dict]:
    return [{"date": d, "start": "18:00", "end": "18:45"} for d in days]


async def test_x03_bad_input_is_a_problem_never_a_500_and_writes_nothing(inst, tokens):
    c = inst.client
    await subject_institution(c, tokens, "org-x3")
    own = auth(tokens.institution("org-x3"))
    edu = auth(tokens.regulator("education"))
    before = await _counts(inst)
    cases = [
        ("POST", "/institutions", own, "not json at all"),
        ("POST", "/institutions", own, {**application(), "category": "cooking"}),
        ("POST", "/institutions", own, {**application(), "target_groups": []}),
        ("POST", "/institutions", own, {**application(), "unexpected": 1}),
        ("POST", "/institutions", own, {**application(), "credit_code": "１２３"}),
        ("POST", "/institutions", own, {**application(), "name": "x" * 5000}),
        ("POST", "/institutions/org-x3/courses", own, course_body(lessons=[])),
        ("POST", "/institutions/org-x3/courses", own, course_body(price_per_lesson_fen="40")),
        ("POST", "/institutions/org-x3/courses", own, course_body(target_grades=[13])),
        ("POST", "/institutions/org-x3/courses", own, course_body(lesson_count=1)),
        (
            "POST",
            "/institutions/org-x3/courses",
            own,
            course_body(lessons=_lessons("2026-02-30", "2026-12-03")),
        ),
        # Dates at the edges of the calendar: refused or judged, never a crash.
        (
            "POST",
            "/institutions/org-x3/courses",
            own,
            course_body(lessons=_lessons("0001-01-01", "9999-12-31")),
        ),
        (
            "POST",
            "/institutions/org-x3/courses",
            own,
            course_body(lessons=[{"date": "2026-12-01", "start": "25:00", "end": "26:00"}] * 2),
        ),
        ("POST", "/institutions/org-x3/transitions", edu, {"action": "fly", "reason": "x"}),
        ("POST", "/institutions/org-x3/transitions", edu, {"action": "suspend"}),
        (
            "POST",
            "/institutions/org-x3/transitions",
            edu,
            {"action": "grant", "reason": "再次许可", "valid_until": "2020-01-01"},
        ),
        (
            "POST",
            "/institutions/org-x3/transitions",
            edu,
            {"action": "grant", "reason": "再次许可", "valid_until": "9999-12-31"},
        ),
        (
            "POST",
            "/institutions/org-x3/penalties",
            edu,
            {
                "kind": "fine",
                "severity": "general",
                "fine_fen": 10**20,
                "reason": "超标收费",
                "decided_on": "2026-11-01",
            },
        ),
        ("POST", "/public/complaints", None, {"category": "advertising", "description": "短"}),
        (
            "POST",
            "/public/complaints",
            None,
            {"institution_id": "nobody", "category": "advertising", "description": "夸大宣传效果"},
        ),
        (
            "POST",
            "/public/complaints",
            None,
            {
                "institution_name": "某机构",
                "region_id": "atlantis",
                "category": "advertising",
                "description": "夸大宣传效果",
            },
        ),
        ("GET", "/public/whitelist?cursor=%%%garbage", None, None),
        ("GET", "/public/whitelist?limit=0", None, None),
        ("GET", "/public/whitelist?category=cooking", None, None),
        ("GET", "/public/whitelist?q=" + "长" * 500, None, None),
        ("GET", "/public/verify/not.a.code", None, None),
        ("GET", "/public/verify/" + "A" * 3000, None, None),
        ("GET", "/complaints?status=lost", edu, None),
    ]
    for method, path, headers, body in cases:
        kwargs: dict = {"headers": headers or {}}
        if isinstance(body, str):
            kwargs["content"] = body
            kwargs["headers"] = {**kwargs["headers"], "content-type": "application/json"}
        elif body is not None:
            kwargs["json"] = body
        r = await c.request(method, path, **kwargs)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json"), (path, r.text)
        problem = r.json()
        assert problem["status"] == r.status_code and problem["detail"], problem
        if r.status_code == 422 and "rule" not in problem and "verify" not in path:
            assert problem.get("errors"), (path, problem)
    assert await _counts(inst) == before


async def test_inst03_grant_on_29_february_defaults_to_28_february_three_years_on(
    inst, tokens, monkeypatch
):
    from datetime import UTC, datetime

    leap = datetime(2028, 2, 29, 4, 0, tzinfo=UTC)
    monkeypatch.setattr(service, "now", lambda: leap)
    body = await licensed(inst.client, tokens, "org-leap")
    assert body["licence_valid_from"] == "2028-02-29"
    assert body["licence_valid_until"] == "2031-02-28"


async def test_inst03_a_typed_licence_validity_far_in_the_future_is_refused(inst, tokens):
    from tests.institutions.conftest import act, register

    c = inst.client
    await register(c, tokens, "org-far")
    reg = tokens.regulator("sports")
    assert (await act(c, reg, "org-far", "start_review")).status_code == 200
    r = await act(c, reg, "org-far", "grant", valid_until="9999-12-31")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.valid_until"
    two_years = service.today().replace(day=1) + timedelta(days=730)
    r = await act(c, reg, "org-far", "grant", valid_until=two_years.isoformat())
    assert r.status_code == 200 and r.json()["licence_valid_until"] == two_years.isoformat()
    code = await c.get("/institutions/org-far/compliance-code", headers=auth(reg))
    assert code.status_code == 200


async def test_inst08_a_large_fine_is_stored_exactly(inst, tokens):
    c = inst.client
    await licensed(c, tokens, "org-fine")
    reg = auth(tokens.regulator("sports"))
    fine = 5_000_000_000  # 5 千万元: beyond a 32-bit integer
    r = await c.post(
        "/institutions/org-fine/penalties",
        json={
            "kind": "fine",
            "severity": "general",
            "fine_fen": fine,
            "reason": "违规收取超过三个月的费用",
            "decided_on": "2026-11-01",
        },
        headers=reg,
    )
    assert r.status_code == 201, r.text
    listed = (await c.get("/institutions/org-fine/penalties", headers=reg)).json()
    assert [p["fine_fen"] for p in listed] == [fine]


async def test_inst01_concurrent_registrations_of_one_credit_code_one_wins_one_conflicts(
    inst, tokens
):
    import asyncio

    from tests.institutions.conftest import credit_code

    c = inst.client
    code = credit_code(990001)
    regulator = auth(tokens.regulator("sports"))
    replies = await asyncio.gather(
        *(
            c.post(
                "/institutions",
                json={**application(), "id": f"org-race-{i}", "credit_code": code},
                headers=regulator,
            )
            for i in range(4)
        )
    )
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [201, 409, 409, 409], [r.text for r in replies]
    async with inst.ctx.db.read() as session:
        n = await session.scalar(
            select(func.count()).select_from(Institution).where(Institution.credit_code == code)
        )
    assert n == 1
