"""identity's HTTP routes: parse, authorize, call a use case, shape the reply."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, Response
from sqlalchemy import select

from chassis.app import DB, Ctx
from chassis.auth import CurrentPrincipal, Principal, require_roles
from chassis.calendar import HolidayArrangement
from chassis.errors import Problem, not_found
from chassis.pagination import Page, PageQuery, paginate
from chassis.privacy import mask_phone
from services.identity import schemas, service
from services.identity.models import (
    AccessAudit,
    Guardian,
    Guardianship,
    HolidayArrangementRecord,
    Region,
    School,
    SchoolClass,
    Student,
    Teacher,
)
from services.identity.tokens import TokenIssuer

router = APIRouter()
STAFF = ("school_admin", "head_teacher", "teacher")
OVERSIGHT = ("bureau", "regulator", "auditor")


def token_issuer(ctx: Ctx) -> TokenIssuer:
    issuer: TokenIssuer = ctx.extras["issuer"]
    return issuer


Issuer = Annotated[TokenIssuer, Depends(token_issuer)]
Bureau = Annotated[Principal, Depends(require_roles("bureau"))]
SchoolAdmin = Annotated[Principal, Depends(require_roles("school_admin"))]


def _can_see_school(principal: Principal, school: School) -> bool:
    if principal.has_tenant("school", school.id) and principal.has_role(*STAFF):
        return True
    return principal.has_role(*OVERSIGHT) and principal.has_tenant("region", school.region_id)


def _ensure_school_admin(principal: Principal, school_id: str) -> None:
    if not principal.has_tenant("school", school_id):
        raise not_found("学校不存在。")


# ---------------------------------------------------------------- OAuth2


@router.post(
    "/oauth/token",
    response_model=schemas.TokenResponse,
    tags=["认证"],
    summary="获取访问令牌（OAuth2 密码模式、客户端凭证模式、刷新令牌）",
)
async def token(
    db: DB,
    issuer: Issuer,
    grant_type: Annotated[str, Form(description="password | client_credentials | refresh_token")],
    username: Annotated[str | None, Form()] = None,
    password: Annotated[str | None, Form()] = None,
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
    refresh_token: Annotated[str | None, Form()] = None,
    scope: Annotated[str | None, Form()] = None,
) -> schemas.TokenResponse:
    if grant_type == "password":
        if not username or not password:
            raise Problem(400, "密码模式需要 username 与 password。", error="invalid_request")
        issued = await service.password_grant(db, issuer, username, password)
    elif grant_type == "client_credentials":
        if not client_id or not client_secret:
            raise Problem(
                400, "客户端凭证模式需要 client_id 与 client_secret。", error="invalid_request"
            )
        issued = await service.client_credentials_grant(db, issuer, client_id, client_secret, scope)
    elif grant_type == "refresh_token":
        if not refresh_token:
            raise Problem(400, "需要 refresh_token。", error="invalid_request")
        issued = await service.refresh_grant(db, issuer, refresh_token)
    else:
        raise Problem(
            400,
            "不支持的授权类型。",
            slug="oauth/unsupported_grant_type",
            error="unsupported_grant_type",
        )
    return schemas.TokenResponse(
        access_token=issued.access_token,
        expires_in=issued.expires_in,
        refresh_token=issued.refresh_token,
        scope=issued.scope,
    )


@router.get("/.well-known/jwks.json", tags=["认证"], summary="令牌验证公钥（JWKS）")
async def jwks(issuer: Issuer, response: Response) -> dict[str, object]:
    response.headers["Cache-Control"] = "public, max-age=300"
    return issuer.jwks()


@router.get(
    "/.well-known/oauth-authorization-server", tags=["认证"], summary="授权服务器元数据（RFC 8414）"
)
async def oauth_metadata(ctx: Ctx) -> dict[str, object]:
    return {
        "issuer": ctx.platform.auth_issuer,
        "token_endpoint": "/api/v1/identity/oauth/token",
        "jwks_uri": "/api/v1/identity/.well-known/jwks.json",
        "grant_types_supported": ["password", "client_credentials", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
    }


@router.get("/me", response_model=schemas.MeOut, tags=["认证"], summary="当前登录身份")
async def me(principal: CurrentPrincipal) -> schemas.MeOut:
    return schemas.MeOut(
        subject=principal.subject,
        kind=principal.kind,
        roles=sorted(principal.roles),
        tenants=sorted(principal.tenants),
        person_id=principal.person_id,
        name=principal.name,
    )


# ---------------------------------------------------------------- regions & schools


@router.put(
    "/regions/{region_id}",
    response_model=schemas.RegionOut,
    tags=["区域与学校"],
    summary="新建或更新区域（教育局）",
)
async def put_region(region_id: str, body: schemas.RegionIn, principal: Bureau, ctx: Ctx) -> Region:
    if body.id != region_id:
        raise Problem(422, "路径与请求体中的区域编号不一致。")
    if not principal.has_tenant("region", region_id):
        raise not_found("区域不存在。")
    if body.profile_id not in ctx.policies.ids():
        raise Problem(422, f"政策配置 {body.profile_id} 不存在。")
    return await service.upsert_region(ctx.db, body)


@router.get(
    "/regions", response_model=list[schemas.RegionOut], tags=["区域与学校"], summary="区域列表"
)
async def list_regions(db: DB) -> list[Region]:
    async with db.read() as session:
        return list((await session.scalars(select(Region).order_by(Region.id))).all())


@router.post(
    "/schools",
    response_model=schemas.SchoolOut,
    status_code=201,
    tags=["区域与学校"],
    summary="新建学校（教育局）",
)
async def create_school(body: schemas.SchoolIn, principal: Bureau, db: DB) -> School:
    if not principal.has_tenant("region", body.region_id):
        raise Problem(422, "区域不存在。")
    return await service.create_school(db, body)


@router.get(
    "/schools",
    response_model=Page[schemas.SchoolOut],
    tags=["区域与学校"],
    summary="学校列表（按权限过滤）",
)
async def list_schools(
    principal: CurrentPrincipal,
    db: DB,
    page: PageQuery,
    region_id: str | None = None,
) -> Page[schemas.SchoolOut]:
    regions = principal.tenant_ids("region") if principal.has_role(*OVERSIGHT) else set()
    schools = principal.tenant_ids("school")
    query = select(School).where(School.region_id.in_(regions) | School.id.in_(schools))
    if region_id:
        query = query.where(School.region_id == region_id)
    async with db.read() as session:
        return await paginate(session, query, School.id, page, schemas.SchoolOut)


@router.get(
    "/schools/{school_id}",
    response_model=schemas.SchoolOut,
    tags=["区域与学校"],
    summary="学校详情",
)
async def get_school(school_id: str, principal: CurrentPrincipal, db: DB) -> School:
    async with db.read() as session:
        school = await session.get(School, school_id)
    if school is None or not _can_see_school(principal, school):
        raise not_found("学校不存在。")
    return school


# ---------------------------------------------------------------- classes & teachers


def _class_out(c: SchoolClass) -> schemas.ClassOut:
    return schemas.ClassOut(
        id=c.id,
        school_id=c.school_id,
        grade=c.grade,
        name=c.name,
        head_teacher_id=c.head_teacher_id,
        subject_teachers=[schemas.SubjectTeacherIn(**st) for st in c.subject_teachers],
    )


@router.post(
    "/schools/{school_id}/classes",
    response_model=schemas.ClassOut,
    status_code=201,
    tags=["班级与教师"],
    summary="新建班级（学校管理员）",
)
async def create_class(
    school_id: str, body: schemas.ClassIn, principal: SchoolAdmin, db: DB
) -> schemas.ClassOut:
    _ensure_school_admin(principal, school_id)
    return _class_out(await service.create_class(db, school_id, body))


@router.patch(
    "/classes/{class_id}",
    response_model=schemas.ClassOut,
    tags=["班级与教师"],
    summary="更新班级（班主任、任课教师）",
)
async def update_class(
    class_id: str, body: schemas.ClassPatch, principal: SchoolAdmin, db: DB
) -> schemas.ClassOut:
    return _class_out(
        await service.update_class(db, class_id, body, principal.tenant_ids("school"))
    )


@router.get(
    "/schools/{school_id}/classes",
    response_model=list[schemas.ClassOut],
    tags=["班级与教师"],
    summary="学校的班级",
)
async def list_classes(
    school_id: str, principal: CurrentPrincipal, db: DB
) -> list[schemas.ClassOut]:
    async with db.read() as session:
        school = await session.get(School, school_id)
        if school is None or not _can_see_school(principal, school):
            raise not_found("学校不存在。")
        rows = await session.scalars(
            select(SchoolClass)
            .where(SchoolClass.school_id == school_id)
            .order_by(SchoolClass.grade, SchoolClass.name)
        )
        return [_class_out(c) for c in rows]


@router.post(
    "/schools/{school_id}/teachers",
    response_model=schemas.TeacherOut,
    status_code=201,
    tags=["班级与教师"],
    summary="登记在职教师（身份证号只存哈希与掩码）",
)
async def create_teacher(
    school_id: str, body: schemas.TeacherIn, principal: SchoolAdmin, ctx: Ctx
) -> schemas.TeacherOut:
    _ensure_school_admin(principal, school_id)
    t = await service.create_teacher(ctx.db, school_id, body, ctx.platform.id_hash_pepper)
    return _teacher_out(t, principal)


def _teacher_out(t: Teacher, principal: Principal) -> schemas.TeacherOut:
    full_phone = principal.has_role("school_admin") and principal.has_tenant("school", t.school_id)
    return schemas.TeacherOut(
        id=t.id,
        school_id=t.school_id,
        name=t.name,
        id_number_masked=t.id_number_masked,
        phone=t.phone if full_phone else mask_phone(t.phone),
        subjects=t.subjects,
        in_service=t.in_service,
    )


@router.get(
    "/schools/{school_id}/teachers",
    response_model=list[schemas.TeacherOut],
    tags=["班级与教师"],
    summary="学校的教师名册",
)
async def list_teachers(
    school_id: str, principal: CurrentPrincipal, db: DB
) -> list[schemas.TeacherOut]:
    async with db.read() as session:
        school = await session.get(School, school_id)
        if school is None or not _can_see_school(principal, school):
            raise not_found("学校不存在。")
        rows = await session.scalars(
            select(Teacher).where(Teacher.school_id == school_id).order_by(Teacher.name)
        )
        return [_teacher_out(t, principal) for t in rows]


# ---------------------------------------------------------------- students & guardians


async def _student_out(session: object, s: Student) -> schemas.StudentOut:
    from sqlalchemy.ext.asyncio import AsyncSession

    assert isinstance(session, AsyncSession)
    c = await session.get(SchoolClass, s.class_id)
    return schemas.StudentOut(
        id=s.id,
        school_id=s.school_id,
        class_id=s.class_id,
        grade=c.grade if c else 0,
        student_no=s.student_no,
        name=s.name,
        id_number_masked=s.id_number_masked,
        active=s.active,
    )


@router.post(
    "/schools/{school_id}/students",
    response_model=schemas.StudentOut,
    status_code=201,
    tags=["学生与监护人"],
    summary="登记学生",
)
async def create_student(
    school_id: str, body: schemas.StudentIn, principal: SchoolAdmin, ctx: Ctx
) -> schemas.StudentOut:
    _ensure_school_admin(principal, school_id)
    s = await service.create_student(ctx.db, school_id, body, ctx.platform.id_hash_pepper)
    async with ctx.db.read() as session:
        return await _student_out(session, s)


@router.get(
    "/schools/{school_id}/students",
    response_model=list[schemas.StudentOut],
    tags=["学生与监护人"],
    summary="学生名册（教职工访问留痕，X-06）",
)
async def list_students(
    school_id: str,
    principal: CurrentPrincipal,
    db: DB,
    request: Request,
    class_id: str | None = None,
) -> list[schemas.StudentOut]:
    if not (principal.has_tenant("school", school_id) and principal.has_role(*STAFF)):
        raise not_found("学校不存在。")
    async with db.transaction() as session:
        query = select(Student).where(Student.school_id == school_id)
        if class_id:
            query = query.where(Student.class_id == class_id)
        students = list((await session.scalars(query.order_by(Student.student_no))).all())
        for s in students:
            session.add(_audit(principal, "list_students", s.id, request))
        return [await _student_out(session, s) for s in students]


def _audit(principal: Principal, action: str, student_id: str, request: Request) -> AccessAudit:
    return AccessAudit(
        actor_id=principal.subject,
        actor_roles=sorted(principal.roles),
        action=action,
        student_id=student_id,
        request_id=getattr(request.state, "request_id", None),
    )


@router.get(
    "/students/{student_id}",
    response_model=schemas.StudentOut,
    tags=["学生与监护人"],
    summary="学生详情（本人监护人或本校教职工）",
)
async def get_student(
    student_id: str, principal: CurrentPrincipal, db: DB, request: Request
) -> schemas.StudentOut:
    async with db.transaction() as session:
        s = await session.get(Student, student_id)
        if s is None:
            raise not_found("学生不存在。")
        is_guardian = (
            principal.person_id is not None
            and await session.get(Guardianship, (principal.person_id, s.id)) is not None
        )
        is_staff = principal.has_tenant("school", s.school_id) and principal.has_role(*STAFF)
        if not (is_guardian and principal.has_role("parent")) and not is_staff:
            raise not_found("学生不存在。")
        if is_staff:
            session.add(_audit(principal, "get_student", s.id, request))
        return await _student_out(session, s)


@router.post(
    "/schools/{school_id}/guardians",
    response_model=schemas.GuardianOut,
    status_code=201,
    tags=["学生与监护人"],
    summary="登记监护人并建立监护关系",
)
async def link_guardian(
    school_id: str, body: schemas.GuardianIn, principal: SchoolAdmin, db: DB
) -> schemas.GuardianOut:
    _ensure_school_admin(principal, school_id)
    g = await service.link_guardian(db, school_id, body)
    return schemas.GuardianOut(
        id=g.id, name=g.name, phone=mask_phone(g.phone), student_ids=[body.student_id]
    )


@router.delete(
    "/schools/{school_id}/guardians/{guardian_id}/students/{student_id}",
    status_code=204,
    tags=["学生与监护人"],
    summary="解除监护关系",
)
async def unlink_guardian(
    school_id: str, guardian_id: str, student_id: str, principal: SchoolAdmin, db: DB
) -> Response:
    _ensure_school_admin(principal, school_id)
    await service.unlink_guardian(db, school_id, guardian_id, student_id)
    return Response(status_code=204)


@router.get(
    "/me/children",
    response_model=list[schemas.StudentOut],
    tags=["学生与监护人"],
    summary="我的孩子（家长）",
)
async def my_children(
    principal: Annotated[Principal, Depends(require_roles("parent"))], db: DB
) -> list[schemas.StudentOut]:
    async with db.read() as session:
        rows = await session.scalars(
            select(Student)
            .join(Guardianship, Guardianship.student_id == Student.id)
            .where(Guardianship.guardian_id == (principal.person_id or ""))
        )
        return [await _student_out(session, s) for s in rows]


@router.get(
    "/me/guardian",
    response_model=schemas.GuardianOut,
    tags=["学生与监护人"],
    summary="我的监护人资料（本人可见完整手机号）",
)
async def my_guardian(
    principal: Annotated[Principal, Depends(require_roles("parent"))], db: DB
) -> schemas.GuardianOut:
    async with db.read() as session:
        g = await session.get(Guardian, principal.person_id or "")
        if g is None:
            raise not_found("监护人资料不存在。")
        ids = (
            await session.scalars(
                select(Guardianship.student_id).where(Guardianship.guardian_id == g.id)
            )
        ).all()
        return schemas.GuardianOut(id=g.id, name=g.name, phone=g.phone, student_ids=list(ids))


@router.post(
    "/schools/{school_id}/roster",
    response_model=schemas.RosterImportResult,
    tags=["学生与监护人"],
    summary="导入学校名册 CSV（任一行有误则全部不导入）",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "text/csv": {
                    "schema": {
                        "type": "string",
                        "example": ",".join(service.ROSTER_COLUMNS)
                        + "\n3,三(1)班,S001,张小明,,张伟,13800138000,father",
                    }
                }
            },
        }
    },
)
async def import_roster(
    school_id: str, request: Request, principal: SchoolAdmin, ctx: Ctx
) -> schemas.RosterImportResult:
    _ensure_school_admin(principal, school_id)
    body = await request.body()
    if len(body) > 5_000_000:
        raise Problem(413, "名册文件过大（上限 5 MB）。")
    return await service.import_roster_csv(ctx.db, school_id, body, ctx.platform.id_hash_pepper)


# ---------------------------------------------------------------- users & clients


def _tenants_within(principal: Principal, tenants: list[str], session_schools: set[str]) -> bool:
    regions = principal.tenant_ids("region")
    for t in tenants:
        kind, _, ident = t.partition(":")
        if kind == "region" and ident not in regions:
            return False
        if kind == "school" and ident not in session_schools:
            return False
    return True


@router.post(
    "/users",
    response_model=schemas.UserOut,
    status_code=201,
    tags=["账号"],
    summary="新建账号（教育局：本区域；学校管理员：本校教职工、家长、学生）",
)
async def create_user(body: schemas.UserIn, principal: CurrentPrincipal, db: DB) -> schemas.UserOut:
    if principal.has_role("bureau"):
        async with db.read() as session:
            schools = set(
                (
                    await session.scalars(
                        select(School.id).where(
                            School.region_id.in_(principal.tenant_ids("region"))
                        )
                    )
                ).all()
            )
        allowed = _tenants_within(principal, body.tenants, schools)
    elif principal.has_role("school_admin"):
        own = principal.tenant_ids("school")
        allowed = set(body.roles) <= {"teacher", "head_teacher", "parent", "student"} and all(
            t.partition(":")[0] == "school" and t.partition(":")[2] in own for t in body.tenants
        )
    else:
        raise Problem(403, "您的角色无权新建账号。")
    if not allowed:
        raise Problem(403, "不能授予超出本人管辖范围的角色或租户。")
    user = await service.create_user(db, body)
    return schemas.UserOut.model_validate(user, from_attributes=True)


@router.post(
    "/clients",
    response_model=schemas.ClientOut,
    status_code=201,
    tags=["账号"],
    summary="注册第三方平台（OAuth2 客户端凭证）",
)
async def create_client(body: schemas.ClientIn, principal: Bureau, db: DB) -> schemas.ClientOut:
    regions = principal.tenant_ids("region")
    if any(
        t.partition(":")[0] != "region" or t.partition(":")[2] not in regions for t in body.tenants
    ):
        raise Problem(403, "平台租户须在本教育局管辖区域内（region:编号）。")
    client, secret = await service.create_client(db, body)
    return schemas.ClientOut(
        client_id=client.client_id,
        name=client.name,
        scopes=client.scopes,
        tenants=client.tenants,
        client_secret=secret,
    )


# ---------------------------------------------------------------- calendar


@router.put(
    "/calendar/holidays/{year}",
    tags=["校历"],
    summary="导入某年法定节假日与调休安排（教育局运营人员）",
)
async def put_holidays(year: int, body: HolidayArrangement, _: Bureau, db: DB) -> dict[str, object]:
    if body.year != year:
        raise Problem(422, "路径与请求体中的年份不一致。")
    record = await service.publish_holidays(db, body)
    return record.data


@router.get("/calendar/holidays/{year}", tags=["校历"], summary="某年节假日安排（公开）")
async def get_holidays(year: int, db: DB) -> dict[str, object]:
    async with db.read() as session:
        record = await session.get(HolidayArrangementRecord, year)
    if record is None:
        raise not_found(f"{year} 年的节假日安排尚未导入。")
    return record.data
