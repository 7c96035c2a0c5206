"""Object-level authorization (GW-03) in institutions: another tenant's
objects answer 404 exactly like missing ones, and nothing of theirs changes."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from services.institutions.models import (
    Course,
    Institution,
    LicenceTransition,
    Penalty,
    Trainer,
)
from tests.institutions.conftest import act, application, licensed, register
from tests.institutions.test_api import course_body, trainer_body
from tests.support import auth

pytestmark = pytest.mark.asyncio


async def _setup(c, tokens):
    a = await licensed(c, tokens, "org-a", name="甲体育")
    b = await licensed(c, tokens, "org-b", name="乙体育")
    r = await c.post(
        "/institutions/org-b/trainers",
        json=trainer_body(11, teacher_certificate_number=None),
        headers=auth(tokens.institution("org-b")),
    )
    assert r.status_code == 201
    r = await c.post(
        "/institutions/org-b/courses",
        json=course_body(subject="football", name="乙足球"),
        headers=auth(tokens.institution("org-b")),
    )
    assert r.status_code == 201, r.text
    return a, b, r.json()["id"]


async def test_gw03_institution_a_reads_and_changes_nothing_of_b(inst, tokens):
    c = inst.client
    _, b, course_id = await _setup(c, tokens)
    a_token = auth(tokens.institution("org-a"))
    missing = (await c.get("/institutions/org-zzz", headers=a_token)).json()

    for path in (
        "/institutions/org-b",
        "/institutions/org-b/trainers",
        "/institutions/org-b/courses",
        f"/institutions/org-b/courses/{course_id}",
        "/institutions/org-b/credit",
        "/institutions/org-b/transitions",
        "/institutions/org-b/inspections",
        "/institutions/org-b/penalties",
        "/institutions/org-b/compliance-code",
    ):
        r = await c.get(path, headers=a_token)
        assert r.status_code == 404, path
        assert r.json()["detail"] == missing["detail"] or "不存在" in r.json()["detail"]

    writes = [
        ("PATCH", "/institutions/org-b", {"district": "篡改"}),
        ("POST", "/institutions/org-b/trainers", trainer_body(12, teacher_certificate_number=None)),
        ("POST", "/institutions/org-b/courses", course_body(subject="football")),
        ("POST", "/institutions/org-b/transitions", {"action": "suspend", "reason": "恶意"}),
        ("POST", "/institutions/org-b/blacklist", {"reason": "恶意举报"}),
        (
            "POST",
            "/institutions/org-b/inspections",
            {"inspected_on": "2026-11-01", "result": "serious_violation", "findings": "伪造"},
        ),
        (
            "POST",
            "/institutions/org-b/penalties",
            {
                "kind": "warning",
                "severity": "serious",
                "reason": "恶意",
                "decided_on": "2026-11-01",
            },
        ),
        ("POST", "/institutions/org-b/delist", {"reason": "恶意"}),
    ]
    trainers = await _count(inst, Trainer)
    for method, path, body in writes:
        r = await c.request(method, path, json=body, headers=a_token)
        assert r.status_code == 404, (path, r.text)
    trainer_id = (
        await c.get("/institutions/org-b/trainers", headers=auth(tokens.institution("org-b")))
    ).json()[0]["id"]
    r = await c.delete(f"/institutions/org-b/trainers/{trainer_id}", headers=a_token)
    assert r.status_code == 404
    # A's own path with B's trainer / course id is also "missing".
    assert (
        await c.delete(f"/institutions/org-a/trainers/{trainer_id}", headers=a_token)
    ).status_code == 404
    assert (
        await c.get(f"/institutions/org-a/courses/{course_id}", headers=a_token)
    ).status_code == 404

    # ``b`` is the regulator's view after the grant: compare like with like.
    after = (await c.get("/institutions/org-b", headers=auth(tokens.regulator("sports")))).json()
    assert after == {**b, "district": after["district"]} and after["district"] == b["district"]
    assert await _count(inst, Trainer) == trainers
    assert await _count(inst, Course) == 1
    listed = (await c.get("/institutions", headers=a_token)).json()["items"]
    assert [i["id"] for i in listed] == ["org-a"]
    # A cannot file an application in B's name either.
    r = await c.post("/institutions", json={**application(), "id": "org-b"}, headers=a_token)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.id"
    async with inst.ctx.db.read() as session:
        penalties = await session.scalar(select(func.count()).select_from(Penalty))
        history = await session.scalar(select(func.count()).select_from(LicenceTransition))
    assert penalties == 0 and history == 6  # 3 each for A and B: apply, review, grant
    assert (await c.get("/public/blacklist")).json()["items"] == []


async def test_x06_institution_phone_in_full_only_to_the_institution_itself(inst, tokens):
    c = inst.client
    await licensed(c, tokens, "org-p", contact_phone="13812345678")
    own = (await c.get("/institutions/org-p", headers=auth(tokens.institution("org-p")))).json()
    assert own["contact_phone"] == "13812345678"
    for token in (tokens.regulator("sports"), tokens.bureau()):
        seen = (await c.get("/institutions/org-p", headers=auth(token))).json()
        assert seen["contact_phone"] == "138****5678"
        listed = (await c.get("/institutions", headers=auth(token))).json()["items"]
        assert listed[0]["contact_phone"] == "138****5678"
    public = (await c.get("/public/institutions/org-p")).json()
    assert "13812345678" not in str(public)


async def test_gw03_regulators_see_only_their_department_and_region(inst, tokens):
    c = inst.client
    await licensed(c, tokens, "org-sport")
    await licensed(c, tokens, "org-art", category="arts")
    await licensed(c, tokens, "org-wh", region_id="weihai-huancui")
    sports_jh = auth(tokens.regulator("sports"))
    assert (await c.get("/institutions/org-art", headers=sports_jh)).status_code == 404
    assert (await c.get("/institutions/org-wh", headers=sports_jh)).status_code == 404
    r = await act(c, tokens.regulator("sports"), "org-art", "suspend")
    assert r.status_code == 404
    listed = (await c.get("/institutions", headers=sports_jh)).json()["items"]
    assert [i["id"] for i in listed] == ["org-sport"]

    bureau = auth(tokens.bureau())
    ids = {i["id"] for i in (await c.get("/institutions", headers=bureau)).json()["items"]}
    assert ids == {"org-sport", "org-art"}
    assert (await c.get("/institutions/org-wh", headers=bureau)).status_code == 404
    # Oversight reads but does not decide.
    r = await act(c, tokens.bureau(), "org-art", "suspend")
    assert r.status_code == 403
    # Roles outside the domain see nothing.
    parent = auth(tokens.mint("parent", tenants=["region:jinhua"]))
    assert (await c.get("/institutions/org-art", headers=parent)).status_code == 404
    assert (await c.get("/institutions", headers=parent)).json()["items"] == []
    assert (await c.get("/institutions")).status_code == 401
    async with inst.ctx.db.read() as session:
        statuses = set((await session.scalars(select(Institution.status))).all())
    assert statuses == {"licensed"}


async def test_gw03_complaints_are_seen_by_their_department_and_region_only(inst, tokens):
    c = inst.client
    await register(c, tokens, "org-x", category="arts")
    r = await c.post(
        "/public/complaints",
        json={"institution_id": "org-x", "category": "advertising", "description": "夸大宣传效果"},
    )
    complaint_id = r.json()["id"]
    for token in (
        tokens.regulator("sports"),
        tokens.regulator("culture", "weihai-huancui"),
        tokens.institution("org-x"),
        tokens.bureau("weihai-huancui"),
    ):
        assert (await c.get(f"/complaints/{complaint_id}", headers=auth(token))).status_code == 404
        r = await c.post(
            f"/complaints/{complaint_id}/transitions",
            json={"action": "assign"},
            headers=auth(token),
        )
        assert r.status_code == 404
        assert (await c.get("/complaints", headers=auth(token))).json()["items"] == []
    culture = auth(tokens.regulator("culture"))
    assert (await c.get(f"/complaints/{complaint_id}", headers=culture)).status_code == 200


async def _count(svc, model) -> int:
    async with svc.ctx.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(model)))
