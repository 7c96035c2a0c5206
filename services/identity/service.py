"""identity's use cases: each one transaction writing rows and events together."""

from __future__ import annotations

import csv
import io
import secrets
import uuid
from dataclasses import dataclass
from datetime import date, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.calendar import HolidayArrangement, today_in_china
from chassis.db import Database, utcnow
from chassis.errors import FieldError, Problem, conflict, not_found
from chassis.messaging import emit
from chassis.privacy import (
    hash_identity_number,
    is_valid_mobile,
    is_valid_resident_id,
    mask_identity_number,
    mask_phone,
)
from contracts import identity as ev
from services.identity import schemas
from services.identity.models import (
    Guardian,
    Guardianship,
    HolidayArrangementRecord,
    OAuthClient,
    RefreshToken,
    Region,
    School,
    SchoolClass,
    Student,
    Teacher,
    User,
)
from services.identity.tokens import TokenIssuer, hash_refresh_token, new_refresh_token

passwords = PasswordHasher()
# A real hash to verify against when the user is unknown, so timing does not
# tell which usernames exist.
_DUMMY_HASH = passwords.hash("not-a-real-password")
REFRESH_TTL = timedelta(days=30)

GRADES_BY_STAGE = {"primary": range(1, 7), "junior": range(7, 10), "nine_year": range(1, 10)}


def new_id() -> str:
    return str(uuid.uuid4())


def _grades_for(school: School) -> range:
    if school.stage == "primary":
        return range(1, 6) if school.school_system == "5-4" else range(1, 7)
    if school.stage == "junior":
        return range(6, 10) if school.school_system == "5-4" else range(7, 10)
    return range(1, 10)


# ---------------------------------------------------------------- tokens


@dataclass
class IssuedTokens:
    access_token: str
    expires_in: int
    refresh_token: str | None
    scope: str | None


def _invalid_grant(detail: str) -> Problem:
    return Problem(400, detail, slug="oauth/invalid_grant", error="invalid_grant")


async def password_grant(
    db: Database, issuer: TokenIssuer, username: str, password: str
) -> IssuedTokens:
    async with db.transaction() as session:
        user = await session.scalar(select(User).where(User.username == username))
        try:
            passwords.verify(user.password_hash if user else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            raise _invalid_grant("用户名或密码错误。") from None
        if user is None or not user.active:
            raise _invalid_grant("用户名或密码错误。")
        refresh, refresh_hash = new_refresh_token()
        session.add(
            RefreshToken(
                token_hash=refresh_hash, user_id=user.id, expires_at=utcnow() + REFRESH_TTL
            )
        )
        return IssuedTokens(_user_access_token(issuer, user), _ttl(issuer), refresh, None)


async def refresh_grant(db: Database, issuer: TokenIssuer, refresh_token: str) -> IssuedTokens:
    async with db.transaction() as session:
        stored = await session.get(RefreshToken, hash_refresh_token(refresh_token))
        if stored is None or stored.revoked_at is not None or stored.expires_at < utcnow():
            raise _invalid_grant("刷新令牌无效或已过期。")
        user = await session.get(User, stored.user_id)
        if user is None or not user.active:
            raise _invalid_grant("刷新令牌无效或已过期。")
        # Rotation: a refresh token is good for one use.
        stored.revoked_at = utcnow()
        refresh, refresh_hash = new_refresh_token()
        session.add(
            RefreshToken(
                token_hash=refresh_hash, user_id=user.id, expires_at=utcnow() + REFRESH_TTL
            )
        )
        return IssuedTokens(_user_access_token(issuer, user), _ttl(issuer), refresh, None)


async def client_credentials_grant(
    db: Database, issuer: TokenIssuer, client_id: str, client_secret: str, scope: str | None
) -> IssuedTokens:
    async with db.read() as session:
        client = await session.get(OAuthClient, client_id)
    try:
        passwords.verify(client.secret_hash if client else _DUMMY_HASH, client_secret)
    except (VerificationError, InvalidHashError):
        raise Problem(
            401, "客户端认证失败。", slug="oauth/invalid_client", error="invalid_client"
        ) from None
    if client is None or not client.active:
        raise Problem(401, "客户端认证失败。", slug="oauth/invalid_client", error="invalid_client")
    requested = set(scope.split()) if scope else set(client.scopes)
    if not requested <= set(client.scopes):
        raise Problem(
            400,
            "申请的权限范围超出该客户端的授权。",
            slug="oauth/invalid_scope",
            error="invalid_scope",
        )
    granted = " ".join(sorted(requested))
    token = issuer.access_token(
        subject=f"client:{client.client_id}",
        kind="client",
        roles=["platform"],
        tenants=client.tenants,
        scope=granted,
        client_id=client.client_id,
        name=client.name,
    )
    return IssuedTokens(token, _ttl(issuer), None, granted)


def _user_access_token(issuer: TokenIssuer, user: User) -> str:
    return issuer.access_token(
        subject=user.id,
        kind="user",
        roles=user.roles,
        tenants=user.tenants,
        person_id=user.person_id,
        name=user.display_name,
    )


def _ttl(issuer: TokenIssuer) -> int:
    return int(issuer.access_ttl.total_seconds())


# ---------------------------------------------------------------- roster


async def upsert_region(db: Database, data: schemas.RegionIn) -> Region:
    async with db.transaction() as session:
        region = await session.get(Region, data.id)
        if region is None:
            region = Region(id=data.id, name=data.name, profile_id=data.profile_id)
            session.add(region)
        else:
            region.name, region.profile_id = data.name, data.profile_id
        await emit(
            session, ev.RegionUpserted(id=data.id, name=data.name, profile_id=data.profile_id)
        )
        return region


async def create_school(db: Database, data: schemas.SchoolIn) -> School:
    async with db.transaction() as session:
        if await session.get(Region, data.region_id) is None:
            raise Problem(
                422,
                "区域不存在。",
                errors=[FieldError(field="body.region_id", message="区域不存在")],
            )
        school = School(id=new_id(), **data.model_dump())
        session.add(school)
        await emit(session, ev.SchoolUpserted(**data.model_dump(), id=school.id))
        return school


async def get_school(session: AsyncSession, school_id: str) -> School:
    school = await session.get(School, school_id)
    if school is None:
        raise not_found("学校不存在。")
    return school


async def _check_teachers(session: AsyncSession, school_id: str, teacher_ids: set[str]) -> None:
    if not teacher_ids:
        return
    found = set(
        (
            await session.scalars(
                select(Teacher.id).where(
                    Teacher.id.in_(teacher_ids), Teacher.school_id == school_id
                )
            )
        ).all()
    )
    missing = teacher_ids - found
    if missing:
        raise Problem(
            422,
            "教师不属于本校。",
            errors=[
                FieldError(field="body.teachers", message=f"本校无此教师：{t}")
                for t in sorted(missing)
            ],
        )


def _class_event(c: SchoolClass) -> ev.ClassUpserted:
    return ev.ClassUpserted(
        id=c.id,
        school_id=c.school_id,
        grade=c.grade,
        name=c.name,
        head_teacher_id=c.head_teacher_id,
        subject_teachers=[ev.SubjectTeacher(**st) for st in c.subject_teachers],
    )


async def create_class(db: Database, school_id: str, data: schemas.ClassIn) -> SchoolClass:
    async with db.transaction() as session:
        school = await get_school(session, school_id)
        if data.grade not in _grades_for(school):
            raise Problem(
                422,
                f"该校（{school.stage}，{school.school_system} 学制）没有 {data.grade} 年级。",
                errors=[FieldError(field="body.grade", message="年级与学校学段不符")],
            )
        ids = {st.teacher_id for st in data.subject_teachers}
        if data.head_teacher_id:
            ids.add(data.head_teacher_id)
        await _check_teachers(session, school_id, ids)
        exists = await session.scalar(
            select(SchoolClass.id).where(
                SchoolClass.school_id == school_id,
                SchoolClass.grade == data.grade,
                SchoolClass.name == data.name,
            )
        )
        if exists:
            raise conflict("同年级已有同名班级。")
        c = SchoolClass(
            id=new_id(),
            school_id=school_id,
            grade=data.grade,
            name=data.name,
            head_teacher_id=data.head_teacher_id,
            subject_teachers=[st.model_dump() for st in data.subject_teachers],
        )
        session.add(c)
        await emit(session, _class_event(c))
        return c


async def update_class(
    db: Database, class_id: str, data: schemas.ClassPatch, allowed_schools: set[str]
) -> SchoolClass:
    async with db.transaction() as session:
        c = await session.get(SchoolClass, class_id)
        if c is None or c.school_id not in allowed_schools:
            raise not_found("班级不存在。")
        ids = set()
        if data.head_teacher_id:
            ids.add(data.head_teacher_id)
        if data.subject_teachers is not None:
            ids |= {st.teacher_id for st in data.subject_teachers}
        await _check_teachers(session, c.school_id, ids)
        if data.name is not None:
            c.name = data.name
        if "head_teacher_id" in data.model_fields_set:
            c.head_teacher_id = data.head_teacher_id
        if data.subject_teachers is not None:
            c.subject_teachers = [st.model_dump() for st in data.subject_teachers]
        await emit(session, _class_event(c))
        return c


async def create_teacher(
    db: Database, school_id: str, data: schemas.TeacherIn, pepper: str
) -> Teacher:
    async with db.transaction() as session:
        await get_school(session, school_id)
        id_hash = hash_identity_number(data.id_number, pepper)
        if await session.scalar(select(Teacher.id).where(Teacher.id_number_hash == id_hash)):
            raise conflict("该身份证号的教师已在名册中。")
        t = Teacher(
            id=new_id(),
            school_id=school_id,
            name=data.name,
            id_number_hash=id_hash,
            id_number_masked=mask_identity_number(data.id_number),
            phone=data.phone,
            subjects=data.subjects,
            in_service=data.in_service,
        )
        session.add(t)
        await emit(
            session,
            ev.TeacherUpserted(
                id=t.id,
                school_id=school_id,
                name=t.name,
                id_number_hash=id_hash,
                in_service=t.in_service,
                subjects=t.subjects,
            ),
        )
        return t


async def create_student(
    db: Database, school_id: str, data: schemas.StudentIn, pepper: str
) -> Student:
    async with db.transaction() as session:
        c = await session.get(SchoolClass, data.class_id)
        if c is None or c.school_id != school_id:
            raise Problem(
                422,
                "班级不属于本校。",
                errors=[FieldError(field="body.class_id", message="班级不存在")],
            )
        if await session.scalar(
            select(Student.id).where(
                Student.school_id == school_id, Student.student_no == data.student_no
            )
        ):
            raise conflict("学籍号已存在。")
        s = Student(
            id=new_id(),
            school_id=school_id,
            class_id=c.id,
            student_no=data.student_no,
            name=data.name,
            id_number_hash=hash_identity_number(data.id_number, pepper) if data.id_number else None,
            id_number_masked=mask_identity_number(data.id_number) if data.id_number else None,
        )
        session.add(s)
        await emit(
            session,
            ev.StudentUpserted(
                id=s.id, school_id=school_id, class_id=c.id, grade=c.grade, name=s.name
            ),
        )
        return s


async def link_guardian(db: Database, school_id: str, data: schemas.GuardianIn) -> Guardian:
    async with db.transaction() as session:
        student = await session.get(Student, data.student_id)
        if student is None or student.school_id != school_id:
            raise Problem(
                422,
                "学生不属于本校。",
                errors=[FieldError(field="body.student_id", message="学生不存在")],
            )
        guardian = await _guardian_for(session, data.name, data.phone)
        await _link(session, guardian, student.id, data.relation)
        return guardian


async def _guardian_for(session: AsyncSession, name: str, phone: str) -> Guardian:
    guardian = await session.scalar(select(Guardian).where(Guardian.phone == phone))
    if guardian is None:
        guardian = Guardian(id=new_id(), name=name, phone=phone)
        session.add(guardian)
        await emit(
            session, ev.GuardianUpserted(id=guardian.id, name=name, phone_masked=mask_phone(phone))
        )
    return guardian


async def _link(session: AsyncSession, guardian: Guardian, student_id: str, relation: str) -> None:
    if await session.get(Guardianship, (guardian.id, student_id)) is None:
        session.add(Guardianship(guardian_id=guardian.id, student_id=student_id, relation=relation))
        await emit(
            session,
            ev.GuardianLinked(guardian_id=guardian.id, student_id=student_id, relation=relation),
        )


async def unlink_guardian(db: Database, school_id: str, guardian_id: str, student_id: str) -> None:
    async with db.transaction() as session:
        student = await session.get(Student, student_id)
        link = await session.get(Guardianship, (guardian_id, student_id))
        if student is None or student.school_id != school_id or link is None:
            raise not_found("监护关系不存在。")
        await session.delete(link)
        await emit(session, ev.GuardianUnlinked(guardian_id=guardian_id, student_id=student_id))


ROSTER_COLUMNS = (
    "grade",
    "class_name",
    "student_no",
    "name",
    "id_number",
    "guardian_name",
    "guardian_phone",
    "relation",
)
RELATIONS = {
    "father": "father",
    "mother": "mother",
    "grandparent": "grandparent",
    "other": "other",
    "父亲": "father",
    "母亲": "mother",
}


async def import_roster_csv(
    db: Database, school_id: str, content: bytes, pepper: str
) -> schemas.RosterImportResult:
    """All rows or none: every bad row is reported and nothing is imported."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Problem(422, "CSV 文件须为 UTF-8 编码。") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in ROSTER_COLUMNS if c not in header]
    if missing:
        raise Problem(
            422,
            "CSV 缺少列：" + "、".join(missing),
            errors=[FieldError(field=f"header.{c}", message="缺少此列") for c in missing],
        )
    async with db.transaction() as session:
        school = await get_school(session, school_id)
        grades = _grades_for(school)
        errors: list[FieldError] = []
        rows: list[dict[str, str]] = []
        seen_numbers: dict[str, int] = {}
        for index, raw in enumerate(reader, start=2):  # row 1 is the header
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}

            def bad(field: str, message: str, index: int = index) -> None:
                errors.append(FieldError(field=f"row {index}.{field}", message=message))

            if not row["grade"].isdigit() or int(row["grade"]) not in grades:
                bad("grade", f"年级应为 {grades.start}–{grades.stop - 1} 之间的整数")
            if not row["class_name"]:
                bad("class_name", "班级名称不能为空")
            if not row["student_no"]:
                bad("student_no", "学籍号不能为空")
            elif row["student_no"] in seen_numbers:
                bad("student_no", f"与第 {seen_numbers[row['student_no']]} 行学籍号重复")
            else:
                seen_numbers[row["student_no"]] = index
            if not row["name"]:
                bad("name", "姓名不能为空")
            if row["id_number"] and not is_valid_resident_id(row["id_number"]):
                bad("id_number", "身份证号无效（校验位不符）")
            if not row["guardian_name"]:
                bad("guardian_name", "监护人姓名不能为空")
            if not is_valid_mobile(row["guardian_phone"]):
                bad("guardian_phone", "手机号格式不正确")
            if row["relation"] not in RELATIONS:
                bad("relation", "关系应为 father/mother/grandparent/other")
            rows.append(row)
        if not rows and not errors:
            errors.append(FieldError(field="row 2", message="CSV 没有数据行"))
        if errors:
            raise Problem(422, f"名册有 {len(errors)} 处错误，未导入任何数据。", errors=errors)

        classes = {
            (c.grade, c.name): c
            for c in (
                await session.scalars(select(SchoolClass).where(SchoolClass.school_id == school_id))
            ).all()
        }
        existing = {
            s.student_no: s
            for s in (
                await session.scalars(select(Student).where(Student.school_id == school_id))
            ).all()
        }
        classes_created = guardians = 0
        for row in rows:
            key = (int(row["grade"]), row["class_name"])
            c = classes.get(key)
            if c is None:
                c = SchoolClass(
                    id=new_id(), school_id=school_id, grade=key[0], name=key[1], subject_teachers=[]
                )
                session.add(c)
                classes[key] = c
                classes_created += 1
                await emit(session, _class_event(c))
            student = existing.get(row["student_no"])
            id_number = row["id_number"] or None
            if student is None:
                student = Student(
                    id=new_id(),
                    school_id=school_id,
                    student_no=row["student_no"],
                    class_id=c.id,
                    name=row["name"],
                )
                session.add(student)
                existing[row["student_no"]] = student
            student.class_id, student.name = c.id, row["name"]
            if id_number:
                student.id_number_hash = hash_identity_number(id_number, pepper)
                student.id_number_masked = mask_identity_number(id_number)
            await emit(
                session,
                ev.StudentUpserted(
                    id=student.id,
                    school_id=school_id,
                    class_id=c.id,
                    grade=c.grade,
                    name=student.name,
                ),
            )
            await session.flush()
            guardian = await _guardian_for(session, row["guardian_name"], row["guardian_phone"])
            await _link(session, guardian, student.id, RELATIONS[row["relation"]])
            guardians += 1
        return schemas.RosterImportResult(
            classes_created=classes_created,
            students_imported=len(rows),
            guardians_imported=guardians,
        )


# ---------------------------------------------------------------- accounts


async def create_user(db: Database, data: schemas.UserIn) -> User:
    async with db.transaction() as session:
        if await session.scalar(select(User.id).where(User.username == data.username)):
            raise conflict("用户名已被使用。")
        user = User(
            id=new_id(),
            username=data.username,
            password_hash=passwords.hash(data.password),
            display_name=data.display_name,
            roles=data.roles,
            tenants=data.tenants,
            person_id=data.person_id,
        )
        session.add(user)
        if data.person_id and "parent" in data.roles:
            guardian = await session.get(Guardian, data.person_id)
            if guardian is not None:
                guardian.user_id = user.id
                await emit(
                    session,
                    ev.GuardianUpserted(
                        id=guardian.id,
                        name=guardian.name,
                        user_id=user.id,
                        phone_masked=mask_phone(guardian.phone),
                    ),
                )
        return user


async def create_client(db: Database, data: schemas.ClientIn) -> tuple[OAuthClient, str]:
    secret = secrets.token_urlsafe(32)
    async with db.transaction() as session:
        client = OAuthClient(
            client_id="cli_" + secrets.token_hex(8),
            name=data.name,
            secret_hash=passwords.hash(secret),
            scopes=sorted(set(data.scopes)),
            tenants=sorted(set(data.tenants)),
        )
        session.add(client)
        return client, secret


async def publish_holidays(db: Database, data: HolidayArrangement) -> HolidayArrangementRecord:
    async with db.transaction() as session:
        record = await session.get(HolidayArrangementRecord, data.year)
        payload = data.model_dump(mode="json")
        if record is None:
            record = HolidayArrangementRecord(year=data.year, data=payload, note=data.source)
            session.add(record)
        else:
            record.data, record.note = payload, data.source
        await emit(
            session,
            ev.HolidaysPublished(
                year=data.year,
                holidays=[ev.HolidayDay(date=h.date, name=h.name) for h in data.holidays],
                workday_swaps=list(data.workday_swaps),
            ),
        )
        return record


def today_local() -> date:
    return today_in_china()
