"""institutions over HTTP: registration, licences, lists, trainers, courses,
complaints, inspections and penalties (INST-01..INST-08, X-03, X-06)."""

from __future__ import annotations

import datetime as dt

import jwt
import pytest
from sqlalchemy import func, select

from chassis.db import utcnow
from chassis.messaging import outbox_table
from chassis.privacy import hash_identity_number, resident_id_check_digit
from chassis.roster import upsert
from services.institutions import service
from services.institutions.models import Complaint, Course, Institution, Trainer, roster
from tests.conftest import PEPPER
from tests.institutions.conftest import (
    REGION,
    act,
    application,
    credit_code,
    licensed,
    register,
)
from tests.support import auth

pytestmark = pytest.mark.asyncio


def id_number(seq: int) -> str:
    first17 = f"330702198801{seq:02d}{(seq * 7) % 1000:03d}"
    return first17 + resident_id_check_digit(first17)


async def count(svc, model, *where) -> int:
    async with svc.ctx.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)))


async def events(svc, type_name: str) -> int:
    async with svc.ctx.db.read() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(outbox_table)
                .where(outbox_table.c.type == type_name)
            )
        )


# ---------------------------------------------------------------- INST-01


async def test_inst01_registration_validates_credit_code_and_routes_to_department(inst, tokens):
    c = inst.client
    body = await register(c, tokens, "org-arts", category="arts", name="青禾美术")
    assert body["status"] == "applied" and body["department"] == "culture"
    assert body["can_enroll"] is False and body["credit_level"] == "A"

    bad = application(credit_code="91350100M000100Y44")
    r = await c.post("/institutions", json=bad, headers=auth(tokens.institution("org-bad")))
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["rule"] == "INST-01"
    assert problem["errors"][0]["field"] == "body.credit_code"
    assert await count(inst, Institution) == 1  # nothing written

    dup = application(credit_code=body["credit_code"])
    r = await c.post("/institutions", json=dup, headers=auth(tokens.institution("org-dup")))
    assert r.status_code == 409


async def test_inst01_institution_applies_only_for_itself_and_bad_input_is_problem(inst, tokens):
    c = inst.client
    r = await c.post(
        "/institutions",
        json=application(id="someone-else"),
        headers=auth(tokens.institution("org-me")),
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.id"
    for broken in (
        {**application(), "category": "cooking"},
        {**application(), "target_groups": []},
        {**application(), "unexpected": 1},
        {**application(), "region_id": "atlantis"},
        {**application(), "contact_phone": "12345"},
    ):
        r = await c.post("/institutions", json=broken, headers=auth(tokens.institution("org-me")))
        assert r.status_code == 422, (broken, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    r = await c.post("/institutions", content=b"{not json", headers=auth(tokens.institution("x1")))
    assert r.status_code == 422
    assert await count(inst, Institution) == 0
    # A regulator registers for its own department's categories only.
    r = await c.post(
        "/institutions",
        json=application(category="arts"),
        headers=auth(tokens.regulator("sports")),
    )
    assert r.status_code == 403


# ---------------------------------------------------------------- INST-02


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"category": "subject", "target_groups": ["compulsory"]}, "new_subject_compulsory"),
        ({"category": "subject", "target_groups": ["high_school"]}, "new_subject_high_school"),
        ({"category": "arts", "target_groups": ["preschool"]}, "preschool"),
    ],
)
async def test_inst02_forbidden_new_institutions_are_refused_with_rule(
    inst, tokens, overrides, code
):
    r = await inst.client.post(
        "/institutions",
        json=application(**overrides),
        headers=auth(tokens.institution("org-new")),
    )
    assert r.status_code == 422
    body = r.json()
    assert body["rule"] == "INST-02"
    assert code in [v["code"] for v in body["violations"]]
    assert await count(inst, Institution) == 0


async def test_inst02_existing_subject_institution_cannot_enroll_until_non_profit(inst, tokens):
    c = inst.client
    granted = await licensed(
        c,
        tokens,
        "org-xueba",
        name="学霸教育",
        category="subject",
        target_groups=["compulsory"],
        profit_status="for_profit",
        existing_permit_number="教民133070210000123号",
    )
    assert granted["status"] == "licensed"
    assert granted["reregistration_pending"] is True
    assert granted["can_enroll"] is False and granted["can_charge"] is False
    async with inst.ctx.db.read() as session:
        row = (
            await session.execute(
                select(outbox_table.c.payload).where(
                    outbox_table.c.type == "institutions.licence.granted.v1"
                )
            )
        ).scalar_one()
    assert '"can_charge":false' in row and '"reregistration_pending":true' in row

    # It cannot file courses meanwhile (INST-02).
    r = await c.post(
        "/institutions/org-xueba/courses",
        json=course_body(),
        headers=auth(tokens.institution("org-xueba")),
    )
    assert r.status_code == 422 and r.json()["rule"] == "INST-02"

    # 三转: to non-profit, then it may enroll and charge; the event tells funds/afterschool.
    r = await act(
        c,
        tokens.regulator("education"),
        "org-xueba",
        "transform",
        reason="已登记为民办非企业单位",
        transformation="to_non_profit",
    )
    assert r.status_code == 200, r.text
    assert r.json()["can_enroll"] is True and r.json()["profit_status"] == "non_profit"
    assert await events(inst, "institutions.licence.transformed.v1") == 1


# ---------------------------------------------------------------- INST-03


async def test_inst03_lifecycle_records_actor_reason_time_and_refuses_illegal_moves(inst, tokens):
    c = inst.client
    reg = tokens.regulator("sports")
    await register(c, tokens, "org-run")
    r = await act(c, reg, "org-run", "grant")
    assert r.status_code == 409
    problem = r.json()
    assert problem["rule"] == "INST-03" and problem["allowed"] == ["start_review"]
    assert (await c.get("/institutions/org-run", headers=auth(reg))).json()["status"] == "applied"

    steps = [
        ("start_review", "under_review", False),
        ("grant", "licensed", True),
        ("suspend", "suspended", False),
        ("reinstate", "licensed", True),
        ("terminate", "terminated", False),
    ]
    for action, status, can_enroll in steps:
        r = await act(c, reg, "org-run", action, reason=f"原因：{action}")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == status and r.json()["can_enroll"] is can_enroll
    r = await act(c, reg, "org-run", "reinstate")
    assert r.status_code == 409 and r.json()["allowed"] == []

    history = (await c.get("/institutions/org-run/transitions", headers=auth(reg))).json()
    assert [h["action"] for h in history] == ["apply"] + [s[0] for s in steps]
    for h in history[1:]:
        assert h["actor"] == "reg-sports-jinhua" and h["actor_roles"] == ["regulator"]
        assert h["reason"] == f"原因：{h['action']}" and h["at"]
        assert h["event_type"] == f"institutions.licence.{_event_word(h['action'])}.v1"
    # The institution itself cannot move its own licence.
    r = await act(c, tokens.institution("org-run"), "org-run", "grant")
    assert r.status_code == 403


def _event_word(action: str) -> str:
    return {
        "start_review": "review_started",
        "grant": "granted",
        "reject": "rejected",
        "suspend": "suspended",
        "reinstate": "reinstated",
        "revoke": "revoked",
        "transform": "transformed",
        "terminate": "terminated",
    }[action]


async def test_inst03_transform_to_non_subject_moves_it_to_the_new_department(inst, tokens):
    c = inst.client
    await licensed(
        c,
        tokens,
        "org-t",
        category="subject",
        target_groups=["compulsory"],
        profit_status="non_profit",
        existing_permit_number="教民1330702000001号",
    )
    edu = tokens.regulator("education")
    r = await act(c, edu, "org-t", "transform", transformation="to_non_subject")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.new_category"
    r = await act(
        c, edu, "org-t", "transform", transformation="to_non_subject", new_category="science_tech"
    )
    assert r.status_code == 200
    assert r.json()["category"] == "science_tech" and r.json()["department"] == "science"
    # Now the science department supervises it; education no longer sees it.
    assert (await c.get("/institutions/org-t", headers=auth(edu))).status_code == 404
    sci = tokens.regulator("science")
    assert (await c.get("/institutions/org-t", headers=auth(sci))).status_code == 200
    r = await act(c, sci, "org-t", "transform", transformation="staff_reassignment")
    assert r.status_code == 422
    r = await act(
        c, sci, "org-t", "transform", transformation="staff_reassignment", staff_reassigned=12
    )
    assert r.status_code == 200


# ---------------------------------------------------------------- INST-04


async def test_inst04_white_list_search_and_cursor_pagination(inst, tokens):
    c = inst.client
    for i in range(5):
        await licensed(c, tokens, f"org-w{i}", name=f"阳光体育{i}号馆")
    await licensed(c, tokens, "org-arts1", name="墨香书画", category="arts", district="金东区")
    await register(c, tokens, "org-pending", name="阳光体育待批")  # not on the white list

    names = []
    cursor = None
    while True:
        params = {"limit": 2, "q": "阳光"} | ({"cursor": cursor} if cursor else {})
        page = (await c.get("/public/whitelist", params=params)).json()
        names += [i["name"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(names) == [f"阳光体育{i}号馆" for i in range(5)]

    arts = (await c.get("/public/whitelist", params={"category": "arts"})).json()["items"]
    assert [i["id"] for i in arts] == ["org-arts1"]
    code = arts[0]["credit_code"]
    by_code = (await c.get("/public/whitelist", params={"credit_code": code.lower()})).json()
    assert [i["id"] for i in by_code["items"]] == ["org-arts1"]
    by_district = (await c.get("/public/whitelist", params={"district": "金东区"})).json()
    assert [i["id"] for i in by_district["items"]] == ["org-arts1"]
    elsewhere = (await c.get("/public/whitelist", params={"region_id": "weihai-huancui"})).json()
    assert elsewhere["items"] == []
    # LIKE wildcards are literal.
    assert (await c.get("/public/whitelist", params={"q": "%"})).json()["items"] == []
    r = await c.get("/public/whitelist", params={"cursor": "!!!"})
    assert r.status_code == 422
    # Applied institutions have no public page.
    assert (await c.get("/public/institutions/org-pending")).status_code == 404


async def test_inst04_black_list_after_revocation_with_reason_and_date(inst, tokens):
    c = inst.client
    await licensed(c, tokens, "org-bad", name="卷款跑路培训")
    r = await act(c, tokens.regulator("sports"), "org-bad", "revoke", reason="无证多址办学")
    assert r.status_code == 200 and r.json()["blacklisted"] is True
    black = (await c.get("/public/blacklist", params={"q": "卷款"})).json()["items"]
    assert len(black) == 1
    assert black[0]["reason"] == "无证多址办学" and black[0]["status"] == "revoked"
    assert black[0]["listed_on"] == service.today().isoformat()
    white = (await c.get("/public/whitelist", params={"q": "卷款"})).json()["items"]
    assert white == []
    detail = (await c.get("/public/institutions/org-bad")).json()
    assert detail["blacklisted"] and detail["blacklist_reason"] == "无证多址办学"


async def test_inst04_a_lapsed_licence_leaves_the_white_list_and_its_plate_says_so(
    inst, tokens, monkeypatch
):
    c = inst.client
    body = await licensed(c, tokens, "org-old", name="过期体育")
    own = auth(tokens.institution("org-old"))
    plate = (await c.get("/institutions/org-old/compliance-code", headers=own)).json()
    ids = [i["id"] for i in (await c.get("/public/whitelist")).json()["items"]]
    assert ids == ["org-old"]

    until = dt.date.fromisoformat(body["licence_valid_until"])
    after = dt.datetime.combine(until + dt.timedelta(days=2), dt.time(4), dt.UTC)
    monkeypatch.setattr(service, "now", lambda: after)
    assert (await c.get("/public/whitelist")).json()["items"] == []
    verdict = (await c.get(f"/public/verify/{plate['code']}")).json()
    assert verdict["genuine"] is True and verdict["verdict"] == "expired"
    r = await c.get("/institutions/org-old/compliance-code", headers=own)
    assert r.status_code == 409 and r.json()["rule"] == "INST-04"


async def test_inst04_compliance_code_verifies_offline_and_online_with_live_status(inst, tokens):
    c = inst.client
    await licensed(c, tokens, "org-qr", name="扫码验证体育")
    r = await c.get(
        "/institutions/org-qr/compliance-code", headers=auth(tokens.institution("org-qr"))
    )
    assert r.status_code == 200
    plate = r.json()
    assert plate["qr_payload"].endswith(f"/public/verify/{plate['code']}")

    # Offline: anyone with the published key can check the signature.
    jwks = (await c.get("/public/compliance-keys")).json()
    header = jwt.get_unverified_header(plate["code"])
    assert header["alg"] == "EdDSA" and header["typ"] == "inst-compliance+jwt"
    key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == header["kid"]))
    claims = jwt.decode(plate["code"], key, algorithms=["EdDSA"])
    assert claims["sub"] == "org-qr" and claims["licence_number"]

    live = (await c.get(f"/public/verify/{plate['code']}")).json()
    assert live["genuine"] and live["verdict"] == "licensed"

    # An old plate of a suspended, then revoked institution shows the live status.
    await act(c, tokens.regulator("sports"), "org-qr", "suspend", reason="整改")
    assert (await c.get(f"/public/verify/{plate['code']}")).json()["verdict"] == "suspended"
    r = await c.get(
        "/institutions/org-qr/compliance-code", headers=auth(tokens.institution("org-qr"))
    )
    assert r.status_code == 409 and r.json()["rule"] == "INST-04"
    await act(c, tokens.regulator("sports"), "org-qr", "revoke", reason="整改不到位")
    revoked = (await c.get(f"/public/verify/{plate['code']}")).json()
    assert revoked["verdict"] == "revoked" and revoked["verdict_zh"] == "许可已吊销"

    # A forged plate (payload changed, signature kept) is refused.
    head, payload, sig = plate["code"].split(".")
    forged = ".".join([head, payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB"), sig])
    r = await c.get(f"/public/verify/{forged}")
    assert r.status_code == 422 and r.json()["rule"] == "INST-04"
    assert (await c.get("/public/verify/not-a-code")).status_code == 422


# ---------------------------------------------------------------- INST-05


def trainer_body(seq: int, **overrides):
    body = {
        "name": "李明华",
        "id_number": id_number(seq),
        "teacher_certificate_number": "20213300000012345",
        "subjects": ["math"],
        "consent_given": True,
        "background_check": {
            "result": "clear",
            "checked_on": "2026-11-01",
            "authority": "婺城公安分局",
        },
    }
    body.update(overrides)
    return body


async def test_inst05_in_service_teacher_refused_by_roster_match(inst, tokens):
    c = inst.client
    await register(c, tokens, "org-tr", category="sports")
    moonlighter = id_number(7)
    async with inst.ctx.db.transaction() as session:
        await upsert(
            session,
            roster.teachers,
            {
                "id": "t-1",
                "school_id": "s-1",
                "name": "赵老师",
                "id_number_hash": hash_identity_number(moonlighter, PEPPER),
                "in_service": True,
                "subjects": ["math"],
                "synced_at": utcnow(),
            },
        )
    token = tokens.institution("org-tr")
    r = await c.post("/institutions/org-tr/trainers", json=trainer_body(7), headers=auth(token))
    assert r.status_code == 422
    assert r.json()["rule"] == "INST-05"
    assert [v["code"] for v in r.json()["violations"]] == ["in_service_teacher"]
    assert await count(inst, Trainer) == 0

    # A retired teacher (in_service = false) may train.
    async with inst.ctx.db.transaction() as session:
        await upsert(
            session,
            roster.teachers,
            {
                "id": "t-1",
                "school_id": "s-1",
                "name": "赵老师",
                "id_number_hash": hash_identity_number(moonlighter, PEPPER),
                "in_service": False,
                "subjects": ["math"],
                "synced_at": utcnow(),
            },
        )
    r = await c.post("/institutions/org-tr/trainers", json=trainer_body(7), headers=auth(token))
    assert r.status_code == 201, r.text


async def test_inst05_foreigners_abroad_certificates_consent_and_masking(inst, tokens):
    c = inst.client
    await licensed(
        c,
        tokens,
        "org-sub",
        category="subject",
        target_groups=["compulsory"],
        profit_status="non_profit",
        existing_permit_number="教民1330702000009号",
    )
    token = tokens.institution("org-sub")
    url = "/institutions/org-sub/trainers"
    r = await c.post(
        url,
        json=trainer_body(
            1,
            id_type="passport",
            id_number="E12345678",
            nationality="US",
            located_abroad=True,
            teacher_certificate_number=None,
            consent_given=False,
        ),
        headers=auth(token),
    )
    assert r.status_code == 422
    assert {v["code"] for v in r.json()["violations"]} == {
        "foreign_abroad",
        "teacher_certificate_missing",
        "no_consent",
    }
    valid = id_number(2)
    broken = valid[:-1] + ("0" if valid[-1] != "0" else "1")
    r = await c.post(url, json=trainer_body(2, id_number=broken), headers=auth(token))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.id_number"

    clear_id = id_number(3)
    r = await c.post(url, json=trainer_body(3, name="欧阳娜娜"), headers=auth(token))
    assert r.status_code == 201
    out = r.json()
    assert clear_id not in r.text
    assert out["id_number_masked"] == clear_id[:3] + "*" * 11 + clear_id[-4:]
    r = await c.post(url, json=trainer_body(3), headers=auth(token))
    assert r.status_code == 409
    async with inst.ctx.db.read() as session:
        stored = (await session.scalars(select(Trainer))).one()
    assert clear_id not in repr(stored.__dict__)
    assert stored.id_number_hash == hash_identity_number(clear_id, PEPPER)

    public = (await c.get("/public/institutions/org-sub")).json()
    assert public["trainers"] == [
        {
            "name": "欧**娜",
            "id_number_masked": out["id_number_masked"],
            "teacher_certificate_number": "20213300000012345",
            "subjects": ["math"],
        }
    ]


# ---------------------------------------------------------------- INST-06


def course_body(**overrides):
    body = {
        "name": "五年级数学思维",
        "subject": "math",
        "mode": "offline",
        "target_grades": [5],
        "lesson_minutes": 45,
        "price_per_lesson_fen": 4000,
        "lesson_count": 2,
        "max_class_size": 20,
        "lessons": [
            {"date": "2026-12-01", "start": "18:00", "end": "18:45"},
            {"date": "2026-12-03", "start": "18:00", "end": "18:45"},
        ],
    }
    body.update(overrides)
    return body


async def subject_institution(c, tokens, institution_id="org-math", region=REGION):
    return await licensed(
        c,
        tokens,
        institution_id,
        category="subject",
        region_id=region,
        target_groups=["compulsory"],
        profit_status="non_profit",
        existing_permit_number=f"教民{institution_id}",
        modes=["offline", "online"],
    )


async def test_inst06_course_filing_reports_every_violation_and_writes_nothing(inst, tokens):
    c = inst.client
    await subject_institution(c, tokens)
    token = tokens.institution("org-math")
    bad = course_body(
        price_per_lesson_fen=4401,
        lessons=[
            {"date": "2026-12-05", "start": "18:00", "end": "18:45"},  # Saturday
            {"date": "2027-02-01", "start": "19:50", "end": "20:35"},  # vacation, late
        ],
    )
    r = await c.post("/institutions/org-math/courses", json=bad, headers=auth(token))
    assert r.status_code == 422
    body = r.json()
    assert body["rule"] == "INST-06"
    found = {(v["code"], v.get("lesson")) for v in body["violations"]}
    assert found == {
        ("weekend", 1),
        ("vacation", 2),
        ("ends_too_late", 2),
        ("price_above_guide", None),
    }
    assert await count(inst, Course) == 0
    assert await events(inst, "institutions.course.filed.v1") == 0

    r = await c.post("/institutions/org-math/courses", json=course_body(), headers=auth(token))
    assert r.status_code == 201, r.text
    filed = r.json()
    assert filed["class_size_band"] == "10to35" and filed["period_end"] == "2026-12-03"
    assert await events(inst, "institutions.course.filed.v1") == 1
    public = (await c.get("/public/institutions/org-math")).json()
    assert [x["name"] for x in public["courses"]] == ["五年级数学思维"]
    detail = (
        await c.get(f"/institutions/org-math/courses/{filed['id']}", headers=auth(token))
    ).json()
    assert len(detail["lessons"]) == 2


async def test_inst06_year_2150_weekend_and_qingming_refused_through_the_api(inst, tokens):
    from chassis.calendar import festival_date

    c = inst.client
    await subject_institution(c, tokens)
    qingming = festival_date(2150, "qingming")
    r = await c.post(
        "/institutions/org-math/courses",
        json=course_body(
            lessons=[
                {"date": qingming.isoformat(), "start": "18:00", "end": "18:45"},
                {"date": "2150-06-06", "start": "18:00", "end": "18:45"},  # Saturday
            ]
        ),
        headers=auth(tokens.institution("org-math")),
    )
    assert r.status_code == 422
    found = {(v["code"], v.get("lesson")) for v in r.json()["violations"]}
    assert ("statutory_holiday", 1) in found and ("weekend", 2) in found
    assert any("2150" in w for w in r.json()["warnings"])


async def test_inst06_weihai_5_4_region_vacation_applies_to_grade_6(inst, tokens):
    c = inst.client
    await subject_institution(c, tokens, "org-weihai", region="weihai-huancui")
    lesson = {"date": "2027-01-20", "start": "18:00", "end": "18:45"}
    r = await c.post(
        "/institutions/org-weihai/courses",
        json=course_body(target_grades=[6], lesson_count=1, lessons=[lesson]),
        headers=auth(tokens.institution("org-weihai")),
    )
    assert r.status_code == 422
    assert [v["code"] for v in r.json()["violations"]] == ["vacation"]
    # The same Wednesday is a term day in jinhua.
    await subject_institution(c, tokens, "org-jh")
    r = await c.post(
        "/institutions/org-jh/courses",
        json=course_body(target_grades=[6], lesson_count=1, lessons=[lesson]),
        headers=auth(tokens.institution("org-jh")),
    )
    assert r.status_code == 201, r.text


async def test_inst06_schedule_shape_errors_and_unlicensed_filing(inst, tokens):
    c = inst.client
    await subject_institution(c, tokens)
    token = tokens.institution("org-math")
    r = await c.post(
        "/institutions/org-math/courses",
        json=course_body(lesson_count=3),
        headers=auth(token),
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.lesson_count"
    r = await c.post(
        "/institutions/org-math/courses",
        json=course_body(price_per_lesson_fen="4000"),
        headers=auth(token),
    )
    assert r.status_code == 422
    await register(c, tokens, "org-applied")
    r = await c.post(
        "/institutions/org-applied/courses",
        json=course_body(),
        headers=auth(tokens.institution("org-applied")),
    )
    assert r.status_code == 409 and r.json()["rule"] == "INST-03"


# ---------------------------------------------------------------- INST-07


async def test_inst07_anonymous_complaint_workflow_deadline_and_credit(inst, tokens):
    c = inst.client
    await licensed(c, tokens, "org-c", category="arts", name="彩虹美术")
    r = await c.post(
        "/public/complaints",
        json={
            "institution_id": "org-c",
            "category": "refund_refused",
            "description": "退课后三个月未退费",
        },
    )
    assert r.status_code == 201, r.text
    receipt = r.json()
    assert receipt["department"] == "culture" and receipt["status"] == "received"
    from chassis.calendar import Calendar, load_holiday_files, load_school_terms

    cal = Calendar(load_holiday_files(), load_school_terms()["jinhua"])
    received = dt.date.fromisoformat(receipt["received_on"])
    assert receipt["deadline"] == cal.add_working_days(received, 15).isoformat()
    status = (await c.get(f"/public/complaints/{receipt['tracking_code']}")).json()
    assert status["status"] == "received" and status["institution_name"] == "彩虹美术"
    assert (await c.get("/public/complaints/wrong-code")).status_code == 404

    culture = tokens.regulator("culture")
    url = f"/complaints/{receipt['id']}/transitions"
    r = await c.post(url, json={"action": "resolve", "outcome": "处理完毕"}, headers=auth(culture))
    assert r.status_code == 409 and r.json()["allowed"] == ["assign"]
    assert (await c.post(url, json={"action": "assign"}, headers=auth(culture))).status_code == 200
    r = await c.post(url, json={"action": "investigate", "note": "约谈"}, headers=auth(culture))
    assert r.status_code == 200
    r = await c.post(url, json={"action": "resolve", "outcome": "责令退费"}, headers=auth(culture))
    assert r.status_code == 422  # substantiated or not must be said
    r = await c.post(
        url,
        json={"action": "resolve", "outcome": "已责令全额退费", "substantiated": True},
        headers=auth(culture),
    )
    assert r.status_code == 200
    done = r.json()
    assert done["status"] == "resolved"
    assert [h["to_status"] for h in done["history"]] == [
        "received",
        "assigned",
        "investigating",
        "resolved",
    ]
    credit = (await c.get("/institutions/org-c/credit", headers=auth(culture))).json()
    assert credit["score"] == 95 and credit["records"][0]["source"] == "complaint"
    assert (await c.get(f"/public/complaints/{receipt['tracking_code']}")).json()["outcome"]


async def test_inst07_public_reports_are_rate_limited_per_client_address(inst, tokens, monkeypatch):
    c = inst.client
    await register(c, tokens, "org-r", category="arts")
    inst.ctx.extras["complaint_rate"] = service.ComplaintRate(limit=3, window_seconds=3600)
    report = {"institution_id": "org-r", "category": "advertising", "description": "夸大宣传效果"}
    flood = {"X-Forwarded-For": "203.0.113.7"}
    for _ in range(3):
        assert (await c.post("/public/complaints", json=report, headers=flood)).status_code == 201
    r = await c.post("/public/complaints", json=report, headers=flood)
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["rule"] == "INST-07" and problem["limit"] == 3 and "频繁" in problem["detail"]
    assert 1 <= int(r.headers["Retry-After"]) <= 3600
    assert await count(inst, Complaint) == 3  # the refused report wrote nothing
    # Another address is not affected; the address itself is never stored.
    other = {"X-Forwarded-For": "198.51.100.9"}
    assert (await c.post("/public/complaints", json=report, headers=other)).status_code == 201
    async with inst.ctx.db.read() as session:
        hashes = set((await session.scalars(select(Complaint.source_hash))).all())
    assert len(hashes) == 2 and not any("203.0.113.7" in (h or "") for h in hashes)
    # After the window the address may report again.
    later = utcnow() + dt.timedelta(seconds=3601)
    monkeypatch.setattr(service, "now", lambda: later)
    assert (await c.post("/public/complaints", json=report, headers=flood)).status_code == 201


async def test_inst07_unregistered_institution_report_routing_contact_and_overdue(
    inst, tokens, monkeypatch
):
    c = inst.client
    r = await c.post(
        "/public/complaints",
        json={
            "institution_name": "某小区地下补习班",
            "region_id": REGION,
            "category": "no_licence",
            "description": "周末在小区内开设数学补习班",
            "anonymous": False,
            "contact_name": "陈女士",
            "contact_phone": "13900000002",
        },
    )
    assert r.status_code == 201 and r.json()["department"] == "education"
    complaint_id = r.json()["id"]
    deadline = dt.date.fromisoformat(r.json()["deadline"])
    r = await c.post(
        "/public/complaints",
        json={"institution_name": "无区域", "category": "other", "description": "缺少区域信息"},
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.region_id"
    r = await c.post(
        "/public/complaints",
        json={
            "institution_name": "某机构",
            "region_id": REGION,
            "category": "other",
            "description": "实名但未留电话",
            "anonymous": False,
        },
    )
    assert r.status_code == 422

    edu = tokens.regulator("education")
    bureau = tokens.bureau()
    handled = (await c.get(f"/complaints/{complaint_id}", headers=auth(edu))).json()
    assert handled["contact_phone"] == "13900000002"
    overseen = (await c.get(f"/complaints/{complaint_id}", headers=auth(bureau))).json()
    assert overseen["contact_phone"] == "139****0002" and overseen["contact_name"] == "陈*士"
    assert (await c.get("/complaints/overdue", headers=auth(bureau))).json()["items"] == []

    later = dt.datetime.combine(deadline + dt.timedelta(days=1), dt.time(12), dt.UTC)
    monkeypatch.setattr(service, "now", lambda: later)
    overdue = (await c.get("/complaints/overdue", headers=auth(bureau))).json()["items"]
    assert [o["id"] for o in overdue] == [complaint_id] and overdue[0]["overdue"] is True
    other_region = tokens.bureau("weihai-huancui")
    assert (await c.get("/complaints/overdue", headers=auth(other_region))).json()["items"] == []
    # The bureau oversees but does not handle.
    r = await c.post(
        f"/complaints/{complaint_id}/transitions", json={"action": "assign"}, headers=auth(bureau)
    )
    assert r.status_code == 403


# ---------------------------------------------------------------- INST-08


async def test_inst08_inspection_penalties_credit_and_blacklisting(inst, tokens):
    c = inst.client
    reg = tokens.regulator("sports")
    await licensed(c, tokens, "org-p", name="问题体育")
    r = await c.post(
        "/institutions/org-p/inspections",
        json={"inspected_on": "2026-11-02", "result": "issues_found", "findings": "消防通道堵塞"},
        headers=auth(reg),
    )
    assert r.status_code == 201
    inspection_id = r.json()["id"]
    r = await c.post(
        "/institutions/org-p/penalties",
        json={
            "kind": "fine",
            "severity": "general",
            "reason": "超范围经营",
            "decided_on": "2026-11-03",
        },
        headers=auth(reg),
    )
    assert r.status_code == 422  # a fine needs its amount
    r = await c.post(
        "/institutions/org-p/penalties",
        json={
            "kind": "fine",
            "severity": "general",
            "fine_fen": 500000,
            "reason": "超范围经营",
            "decided_on": "2026-11-03",
            "inspection_id": inspection_id,
        },
        headers=auth(reg),
    )
    assert r.status_code == 201 and r.json()["blacklisted"] is False
    credit = (await c.get("/institutions/org-p/credit", headers=auth(reg))).json()
    assert credit["score"] == 100 - 3 - 15 and credit["level"] == "B"
    assert (await c.get("/public/institutions/org-p")).json()["credit_level"] == "B"

    r = await c.post(
        "/institutions/org-p/penalties",
        json={
            "kind": "fine",
            "severity": "serious",
            "fine_fen": 2000000,
            "reason": "虚假宣传",
            "decided_on": "2026-11-10",
        },
        headers=auth(reg),
    )
    assert r.status_code == 201 and r.json()["blacklisted"] is True
    detail = (await c.get("/institutions/org-p", headers=auth(reg))).json()
    assert detail["blacklisted"] and detail["status"] == "licensed" and not detail["can_charge"]
    assert detail["credit_score"] == 52 and detail["credit_level"] == "D"
    assert await events(inst, "institutions.blacklisted.v1") == 1


async def test_inst08_revocation_penalty_revokes_and_blacklists(inst, tokens):
    c = inst.client
    reg = tokens.regulator("sports")
    await licensed(c, tokens, "org-r")
    bad = {
        "kind": "licence_revocation",
        "severity": "general",
        "reason": "x1",
        "decided_on": "2026-11-10",
    }
    r = await c.post("/institutions/org-r/penalties", json=bad, headers=auth(reg))
    assert r.status_code == 422
    bad["severity"] = "serious"
    r = await c.post("/institutions/org-r/penalties", json=bad, headers=auth(reg))
    assert r.status_code == 201 and r.json()["revoked"] and r.json()["blacklisted"]
    assert await events(inst, "institutions.licence.revoked.v1") == 1
    assert await events(inst, "institutions.blacklisted.v1") == 1
    r = await c.post("/institutions/org-r/penalties", json=bad, headers=auth(reg))
    assert r.status_code == 409 and r.json()["rule"] == "INST-03"
    # Delisting needs the regulator; the record goes back to the white list only if licensed.
    r = await c.post("/institutions/org-r/delist", json={"reason": "信用修复"}, headers=auth(reg))
    assert r.status_code == 200 and r.json()["can_enroll"] is False
    assert await events(inst, "institutions.delisted.v1") == 1


async def test_credit_code_fixture_is_valid():
    from services.institutions.rules import is_valid_credit_code

    assert is_valid_credit_code(credit_code())
