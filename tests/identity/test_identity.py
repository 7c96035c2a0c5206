"""identity: OAuth2 tokens, roster, CSV import, masking and auditing (GW-02, GW-03, X-06)."""

from __future__ import annotations

import jwt
import pytest
from sqlalchemy import func, select

from chassis.messaging import outbox_table
from chassis.privacy import resident_id_check_digit
from services.identity import schemas, service
from services.identity.models import AccessAudit, Student
from tests.support import auth

pytestmark = pytest.mark.asyncio
REGION = "jinhua"


def id_number(seq: int, birth: str = "19880101") -> str:
    first17 = f"330702{birth}{seq:03d}"
    return first17 + resident_id_check_digit(first17)


@pytest.fixture
async def identity(start_service):
    return await start_service("identity")


@pytest.fixture
async def school(identity):
    db = identity.ctx.db
    await service.upsert_region(db, schemas.RegionIn(id=REGION, name="金华市", profile_id=REGION))
    s = await service.create_school(
        db,
        schemas.SchoolIn(region_id=REGION, name="站前小学", school_system="6-3", stage="primary"),
    )
    await service.create_user(
        db,
        schemas.UserIn(
            username="admin",
            password="secret-pass-1",
            display_name="教务处",
            roles=["school_admin"],
            tenants=[f"school:{s.id}"],
        ),
    )
    return s


async def login(client, username: str, password: str) -> dict:
    r = await client.post(
        "/oauth/token", data={"grant_type": "password", "username": username, "password": password}
    )
    assert r.status_code == 200, r.text
    return r.json()


async def test_gw02_password_login_issues_rs256_access_token_verifiable_by_jwks(identity, school):
    tokens = await login(identity.client, "admin", "secret-pass-1")
    jwks = (await identity.client.get("/.well-known/jwks.json")).json()
    header = jwt.get_unverified_header(tokens["access_token"])
    assert header["alg"] == "RS256" and header["typ"] == "at+jwt"
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    assert jwk["kty"] == "RSA" and "d" not in jwk  # the public half only
    claims = jwt.decode(
        tokens["access_token"], jwt.PyJWK(jwk), algorithms=["RS256"], audience="shuangjian"
    )
    assert claims["roles"] == ["school_admin"]
    assert claims["tenants"] == [f"school:{school.id}"]
    assert tokens["expires_in"] == 900 and tokens["refresh_token"]


async def test_wrong_password_and_unknown_user_look_the_same(identity, school):
    bad_pw = await identity.client.post(
        "/oauth/token",
        data={"grant_type": "password", "username": "admin", "password": "nope-nope"},
    )
    unknown = await identity.client.post(
        "/oauth/token",
        data={"grant_type": "password", "username": "ghost", "password": "nope-nope"},
    )
    for r in (bad_pw, unknown):
        assert r.status_code == 400
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["error"] == "invalid_grant"
    assert bad_pw.json()["detail"] == unknown.json()["detail"]


async def test_refresh_token_rotates_and_cannot_be_reused(identity, school):
    tokens = await login(identity.client, "admin", "secret-pass-1")
    first = await identity.client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert first.status_code == 200
    again = await identity.client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


async def test_gw02_client_credentials_scopes_are_limited(identity, school, mint):
    bureau = mint("bureau", tenants=[f"region:{REGION}"])
    created = await identity.client.post(
        "/clients",
        headers=auth(bureau),
        json={"name": "金托管", "scopes": ["afterschool.read"], "tenants": [f"region:{REGION}"]},
    )
    assert created.status_code == 201, created.text
    client = created.json()
    ok = await identity.client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client["client_id"],
            "client_secret": client["client_secret"],
        },
    )
    assert ok.status_code == 200
    claims = jwt.decode(ok.json()["access_token"], options={"verify_signature": False})
    assert claims["kind"] == "client" and claims["scope"] == "afterschool.read"
    assert claims["tenants"] == [f"region:{REGION}"]
    too_much = await identity.client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client["client_id"],
            "client_secret": client["client_secret"],
            "scope": "funds.write",
        },
    )
    assert too_much.status_code == 400 and too_much.json()["error"] == "invalid_scope"
    other_region = await identity.client.post(
        "/clients",
        headers=auth(bureau),
        json={"name": "x", "scopes": ["a"], "tenants": ["region:weihai-huancui"]},
    )
    assert other_region.status_code == 403


async def test_class_creation_writes_event_in_same_transaction(identity, school, mint):
    admin = mint("school_admin", tenants=[f"school:{school.id}"])
    before = await _outbox_count(identity, "identity.class.upserted.v1")
    r = await identity.client.post(
        f"/schools/{school.id}/classes", headers=auth(admin), json={"grade": 3, "name": "三(2)班"}
    )
    assert r.status_code == 201, r.text
    assert await _outbox_count(identity, "identity.class.upserted.v1") == before + 1
    bad = await identity.client.post(
        f"/schools/{school.id}/classes", headers=auth(admin), json={"grade": 8, "name": "八(1)班"}
    )
    assert bad.status_code == 422  # a primary school has no grade 8
    assert await _outbox_count(identity, "identity.class.upserted.v1") == before + 1


async def _outbox_count(svc, event_type: str) -> int:
    async with svc.ctx.db.read() as session:
        return await session.scalar(
            select(func.count()).select_from(outbox_table).where(outbox_table.c.type == event_type)
        )


async def test_gw03_other_schools_objects_look_missing(identity, school, mint):
    other = await service.create_school(
        identity.ctx.db,
        schemas.SchoolIn(region_id=REGION, name="湖海塘小学", school_system="6-3", stage="primary"),
    )
    admin = mint("school_admin", tenants=[f"school:{school.id}"])
    for path in (
        f"/schools/{other.id}",
        f"/schools/{other.id}/classes",
        f"/schools/{other.id}/teachers",
        "/schools/does-not-exist",
    ):
        r = await identity.client.get(path, headers=auth(admin))
        assert r.status_code == 404, path
    r = await identity.client.post(
        f"/schools/{other.id}/classes", headers=auth(admin), json={"grade": 3, "name": "三(1)班"}
    )
    assert r.status_code == 404


async def test_x06_teacher_identity_number_is_stored_hashed_and_shown_masked(
    identity, school, mint
):
    admin = mint("school_admin", tenants=[f"school:{school.id}"])
    number = id_number(7)
    r = await identity.client.post(
        f"/schools/{school.id}/teachers",
        headers=auth(admin),
        json={"name": "赵老师", "id_number": number, "phone": "13912345678", "subjects": ["math"]},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert number not in r.text
    assert body["id_number_masked"] == number[:3] + "*" * 11 + number[-4:]
    teacher = mint("teacher", tenants=[f"school:{school.id}"])
    listed = (
        await identity.client.get(f"/schools/{school.id}/teachers", headers=auth(teacher))
    ).json()
    assert listed[0]["phone"] == "139****5678"
    bad = await identity.client.post(
        f"/schools/{school.id}/teachers",
        headers=auth(admin),
        json={
            "name": "钱老师",
            "id_number": number[:-1] + "0" if number[-1] != "0" else number[:-1] + "1",
        },
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "body.id_number"


ROSTER_HEADER = "grade,class_name,student_no,name,id_number,guardian_name,guardian_phone,relation\n"


async def test_roster_csv_imports_all_rows(identity, school, mint):
    admin = mint("school_admin", tenants=[f"school:{school.id}"])
    csv = ROSTER_HEADER + (
        f"3,三(1)班,S001,张小明,{id_number(11, '20170101')},张伟,13800138000,father\n"
        "3,三(1)班,S002,李小红,,李娜,13800138001,mother\n"
        "4,四(1)班,S003,陈小刚,,陈静,13800138002,mother\n"
    )
    r = await identity.client.post(
        f"/schools/{school.id}/roster",
        headers={**auth(admin), "content-type": "text/csv"},
        content=csv.encode(),
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"classes_created": 2, "students_imported": 3, "guardians_imported": 3}
    assert await _outbox_count(identity, "identity.student.upserted.v1") == 3
    assert await _outbox_count(identity, "identity.guardian.linked.v1") == 3


async def test_roster_csv_with_bad_rows_reports_each_and_imports_nothing(identity, school, mint):
    admin = mint("school_admin", tenants=[f"school:{school.id}"])
    csv = ROSTER_HEADER + (
        "3,三(1)班,S001,张小明,,张伟,13800138000,father\n"
        "12,三(1)班,S002,李小红,,李娜,13800138001,mother\n"
        "3,三(1)班,S001,陈小刚,110101199003071234,陈静,12345,uncle\n"
    )
    r = await identity.client.post(
        f"/schools/{school.id}/roster",
        headers={**auth(admin), "content-type": "text/csv"},
        content=csv.encode(),
    )
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["errors"]}
    assert fields == {
        "row 3.grade",
        "row 4.student_no",
        "row 4.id_number",
        "row 4.guardian_phone",
        "row 4.relation",
    }
    async with identity.ctx.db.read() as session:
        assert await session.scalar(select(func.count()).select_from(Student)) == 0
    assert await _outbox_count(identity, "identity.student.upserted.v1") == 0


async def test_x06_staff_reads_of_student_records_are_audited_and_parents_see_only_own(
    identity, school, mint
):
    admin = mint("school_admin", tenants=[f"school:{school.id}"])
    csv = ROSTER_HEADER + (
        "3,三(1)班,S001,张小明,,张伟,13800138000,father\n"
        "3,三(1)班,S002,李小红,,李娜,13800138001,mother\n"
    )
    await identity.client.post(
        f"/schools/{school.id}/roster",
        headers={**auth(admin), "content-type": "text/csv"},
        content=csv.encode(),
    )
    teacher = mint("teacher", tenants=[f"school:{school.id}"], subject="teacher-1")
    students = (
        await identity.client.get(f"/schools/{school.id}/students", headers=auth(teacher))
    ).json()
    assert len(students) == 2
    async with identity.ctx.db.read() as session:
        audits = (await session.scalars(select(AccessAudit))).all()
    assert {a.student_id for a in audits} == {s["id"] for s in students}
    assert all(a.actor_id == "teacher-1" for a in audits)

    from services.identity.models import Guardian, Guardianship

    async with identity.ctx.db.read() as session:
        zhang = await session.scalar(select(Guardian).where(Guardian.phone == "13800138000"))
        own = await session.scalar(
            select(Guardianship.student_id).where(Guardianship.guardian_id == zhang.id)
        )
    parent = mint("parent", person_id=zhang.id)
    mine = await identity.client.get(f"/students/{own}", headers=auth(parent))
    assert mine.status_code == 200 and mine.json()["name"] == "张小明"
    other = next(s["id"] for s in students if s["id"] != own)
    assert (
        await identity.client.get(f"/students/{other}", headers=auth(parent))
    ).status_code == 404
    children = (await identity.client.get("/me/children", headers=auth(parent))).json()
    assert [c["id"] for c in children] == [own]


async def test_x03_validation_errors_are_problem_json_with_field_list(identity, school, mint):
    admin = mint("school_admin", tenants=[f"school:{school.id}"])
    r = await identity.client.post(
        f"/schools/{school.id}/classes", headers=auth(admin), json={"grade": "three", "extra": 1}
    )
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 422 and body["request_id"]
    assert {e["field"] for e in body["errors"]} == {"body.grade", "body.name", "body.extra"}
    assert any("\u4e00" <= ch <= "\u9fff" for ch in body["detail"])


async def test_school_admin_cannot_grant_roles_beyond_own_school(identity, school, mint):
    admin = mint("school_admin", tenants=[f"school:{school.id}"])
    r = await identity.client.post(
        "/users",
        headers=auth(admin),
        json={
            "username": "sneaky",
            "password": "password-123",
            "display_name": "x",
            "roles": ["bureau"],
            "tenants": [f"region:{REGION}"],
        },
    )
    assert r.status_code == 403
    ok = await identity.client.post(
        "/users",
        headers=auth(admin),
        json={
            "username": "teacher1",
            "password": "password-123",
            "display_name": "刘老师",
            "roles": ["teacher"],
            "tenants": [f"school:{school.id}"],
        },
    )
    assert ok.status_code == 201, ok.text
