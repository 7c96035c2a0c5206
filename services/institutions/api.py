"""institutions's HTTP routes: parse, authorize, call a use case, shape the reply.

Public look-ups (no login) live under ``/public/...`` (INST-04, INST-07); the
gateway lets anonymous GETs there and POST ``/public/complaints`` through.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.app import Ctx
from chassis.auth import CurrentPrincipal, Principal
from chassis.errors import FieldError, Problem, not_found
from chassis.pagination import Page, PageParams, PageQuery, decode_cursor, encode_cursor
from chassis.policy import PolicyRegistry
from chassis.privacy import mask_name, mask_phone
from services.institutions import access, rules, schemas, service
from services.institutions.compliance import ComplianceSigner, InvalidComplianceCode
from services.institutions.models import (
    BlacklistEntry,
    Complaint,
    ComplaintStep,
    Course,
    CourseLesson,
    CreditRecord,
    Inspection,
    Institution,
    LicenceTransition,
    Penalty,
    Trainer,
)

router = APIRouter()
PUBLIC = ["公开查询"]
REG = ["登记与许可"]
PEOPLE = ["从业人员"]
COURSES = ["课程备案"]
CASES = ["举报投诉"]
OVERSIGHT = ["检查处罚与信用"]


def _signer(ctx: Ctx) -> ComplianceSigner:
    signer: ComplianceSigner = ctx.extras["compliance"]
    return signer


Signer = Annotated[ComplianceSigner, Depends(_signer)]


# ---------------------------------------------------------------- shaping


def _institution_out(
    inst: Institution, policies: PolicyRegistry, principal: Principal
) -> schemas.InstitutionOut:
    # the contact phone in full only to the institution itself.
    owner = access.is_owner(principal, inst.id)
    return schemas.InstitutionOut(
        id=inst.id,
        name=inst.name,
        credit_code=inst.credit_code,
        region_id=inst.region_id,
        district=inst.district,
        category=inst.category,  # type: ignore[arg-type]
        department=inst.department,  # type: ignore[arg-type]
        legal_representative=inst.legal_representative,
        contact_phone=inst.contact_phone if owner else mask_phone(inst.contact_phone),
        registered_address=inst.registered_address,
        training_addresses=inst.training_addresses,
        target_groups=inst.target_groups,  # type: ignore[arg-type]
        profit_status=inst.profit_status,  # type: ignore[arg-type]
        modes=inst.modes,  # type: ignore[arg-type]
        existing_permit_number=inst.existing_permit_number,
        status=inst.status,
        licence_number=inst.licence_number,
        licence_valid_from=inst.licence_valid_from,
        licence_valid_until=inst.licence_valid_until,
        reregistration_pending=inst.reregistration_pending,
        blacklisted=inst.blacklisted,
        can_enroll=inst.can_enroll,
        can_charge=inst.can_charge,
        credit_score=inst.credit_score,
        credit_level=service.credit_level_of(policies, inst),
        created_at=inst.created_at,
    )


def _public_item(inst: Institution, policies: PolicyRegistry) -> schemas.PublicListItem:
    return schemas.PublicListItem(
        id=inst.id,
        name=inst.name,
        credit_code=inst.credit_code,
        region_id=inst.region_id,
        district=inst.district,
        category=inst.category,  # type: ignore[arg-type]
        department=inst.department,  # type: ignore[arg-type]
        status=inst.status,
        licence_number=inst.licence_number,
        licence_valid_until=inst.licence_valid_until,
        can_enroll=inst.can_enroll,
        credit_level=service.credit_level_of(policies, inst),
    )


def _trainer_out(t: Trainer) -> schemas.TrainerOut:
    return schemas.TrainerOut.model_validate(t, from_attributes=True)


def _course_out(c: Course, lessons: list[CourseLesson], warnings: list[str] | None = None):
    out = schemas.CourseOut.model_validate(c, from_attributes=True)
    out.lessons = [schemas.LessonOut(date=x.day, start=x.start, end=x.end) for x in lessons]
    out.warnings = warnings or []
    return out


def _complaint_out(
    c: Complaint, principal: Principal, steps: list[ComplaintStep] | None = None
) -> schemas.ComplaintOut:
    handler = access.can_handle_complaint(principal, c)
    return schemas.ComplaintOut(
        id=c.id,
        institution_id=c.institution_id,
        institution_name=c.institution_name,
        region_id=c.region_id,
        department=c.department,
        category=c.category,
        description=c.description,
        anonymous=c.anonymous,
        # the reporter's contact only to the department handling the case.
        contact_name=c.contact_name
        if handler
        else (mask_name(c.contact_name) if c.contact_name else None),
        contact_phone=c.contact_phone if handler else mask_phone(c.contact_phone),
        status=c.status,
        received_at=c.received_at,
        received_on=c.received_on,
        deadline=c.deadline,
        overdue=rules.complaint_overdue(c.status, c.deadline, service.today()),
        assignee=c.assignee,
        outcome=c.outcome,
        substantiated=c.substantiated,
        closed_at=c.closed_at,
        history=[
            schemas.ComplaintStepOut.model_validate(s, from_attributes=True) for s in steps or []
        ],
    )


_CURSOR_PREFIX = "k1:"


async def _keyset(
    session: AsyncSession, query: Select[Any], key: Any, page: PageParams
) -> tuple[list[Any], str | None]:
    if page.cursor:
        decoded = decode_cursor(page.cursor)
        if not decoded.startswith(_CURSOR_PREFIX):
            raise Problem(
                422,
                "分页游标无效。",
                errors=[FieldError(field="query.cursor", message="游标无效")],
            )
        query = query.where(key > decoded.removeprefix(_CURSOR_PREFIX))
    rows = list((await session.execute(query.order_by(key).limit(page.limit + 1))).all())
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    next_cursor = encode_cursor(_CURSOR_PREFIX + str(rows[-1][-1])) if more and rows else None
    return rows, next_cursor


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _public_filters(
    query: Select[Any],
    *,
    q: str | None,
    credit_code: str | None,
    region_id: str | None,
    district: str | None,
    category: str | None,
) -> Select[Any]:
    if q:
        query = query.where(Institution.name.like(_like(q.strip()), escape="\\"))
    if credit_code:
        query = query.where(Institution.credit_code == rules.normalize_credit_code(credit_code))
    if region_id:
        query = query.where(Institution.region_id == region_id)
    if district:
        query = query.where(Institution.district == district)
    if category:
        query = query.where(Institution.category == category)
    return query


Q = Annotated[str | None, Query(max_length=100, description="名称关键字")]
CreditCodeQ = Annotated[str | None, Query(max_length=18, description="统一社会信用代码")]
RegionQ = Annotated[str | None, Query(max_length=64, description="区域编号")]
DistrictQ = Annotated[str | None, Query(max_length=100, description="街镇/片区")]
CategoryQ = Annotated[rules.Category | None, Query(description="类别")]


# ---------------------------------------------------------------- public (INST-04)


@router.get(
    "/public/whitelist",
    response_model=Page[schemas.PublicListItem],
    tags=PUBLIC,
    summary="白名单：持证正常经营的机构（按名称、信用代码、区域、类别查询）",
)
async def public_whitelist(
    ctx: Ctx,
    page: PageQuery,
    q: Q = None,
    credit_code: CreditCodeQ = None,
    region_id: RegionQ = None,
    district: DistrictQ = None,
    category: CategoryQ = None,
) -> Page[schemas.PublicListItem]:
    query = select(Institution, Institution.id).where(
        Institution.status == "licensed",
        Institution.blacklisted.is_(False),
        # A licence past its validity is not a licence in force.
        Institution.licence_valid_until >= service.today(),
    )
    query = _public_filters(
        query,
        q=q,
        credit_code=credit_code,
        region_id=region_id,
        district=district,
        category=category,
    )
    async with ctx.db.read() as session:
        rows, cursor = await _keyset(session, query, Institution.id, page)
    items = [_public_item(r[0], ctx.policies) for r in rows]
    return Page[schemas.PublicListItem](items=items, next_cursor=cursor)


@router.get(
    "/public/blacklist",
    response_model=Page[schemas.BlacklistItem],
    tags=PUBLIC,
    summary="黑名单：列入黑名单的机构、原因与日期",
)
async def public_blacklist(
    ctx: Ctx,
    page: PageQuery,
    q: Q = None,
    credit_code: CreditCodeQ = None,
    region_id: RegionQ = None,
    district: DistrictQ = None,
    category: CategoryQ = None,
) -> Page[schemas.BlacklistItem]:
    query = (
        select(Institution, BlacklistEntry, Institution.id)
        .join(BlacklistEntry, BlacklistEntry.institution_id == Institution.id)
        .where(BlacklistEntry.delisted_on.is_(None), Institution.blacklisted.is_(True))
    )
    query = _public_filters(
        query,
        q=q,
        credit_code=credit_code,
        region_id=region_id,
        district=district,
        category=category,
    )
    async with ctx.db.read() as session:
        rows, cursor = await _keyset(session, query, Institution.id, page)
    items = [
        schemas.BlacklistItem(
            id=inst.id,
            name=inst.name,
            credit_code=inst.credit_code,
            region_id=inst.region_id,
            district=inst.district,
            category=inst.category,  # type: ignore[arg-type]
            status=inst.status,
            licence_number=inst.licence_number,
            reason=entry.reason,
            listed_on=entry.listed_on,
        )
        for inst, entry, _ in rows
    ]
    return Page[schemas.BlacklistItem](items=items, next_cursor=cursor)


@router.get(
    "/public/institutions/{institution_id}",
    response_model=schemas.PublicInstitutionOut,
    tags=PUBLIC,
    summary="机构公开信息：许可状态、从业人员（掩码）、备案课程、信用等级",
)
async def public_institution(institution_id: str, ctx: Ctx) -> schemas.PublicInstitutionOut:
    async with ctx.db.read() as session:
        inst = await session.get(Institution, institution_id)
        if inst is None or (inst.status not in rules.PUBLIC_STATUSES and not inst.blacklisted):
            raise not_found("机构不存在或尚未取得许可。")
        trainers = (
            await session.scalars(
                select(Trainer)
                .where(Trainer.institution_id == inst.id, Trainer.status == "active")
                .order_by(Trainer.created_at, Trainer.id)
            )
        ).all()
        courses = (
            await session.scalars(
                select(Course)
                .where(Course.institution_id == inst.id, Course.status == "filed")
                .order_by(Course.filed_at, Course.id)
            )
        ).all()
        entry = (
            await session.scalars(
                select(BlacklistEntry).where(
                    BlacklistEntry.institution_id == inst.id, BlacklistEntry.delisted_on.is_(None)
                )
            )
        ).first()
    return schemas.PublicInstitutionOut(
        id=inst.id,
        name=inst.name,
        credit_code=inst.credit_code,
        region_id=inst.region_id,
        district=inst.district,
        category=inst.category,  # type: ignore[arg-type]
        category_zh=rules.CATEGORY_NAMES_ZH[inst.category],
        department=inst.department,  # type: ignore[arg-type]
        department_zh=rules.DEPARTMENT_NAMES_ZH[inst.department],
        legal_representative=inst.legal_representative,
        training_addresses=inst.training_addresses,
        target_groups=inst.target_groups,
        profit_status=inst.profit_status,
        modes=inst.modes,
        status=inst.status,
        status_zh=rules.LICENCE_STATUS_NAMES_ZH[inst.status],
        licence_number=inst.licence_number,
        licence_valid_until=inst.licence_valid_until,
        can_enroll=inst.can_enroll,
        can_charge=inst.can_charge,
        reregistration_pending=inst.reregistration_pending,
        blacklisted=inst.blacklisted,
        blacklist_reason=entry.reason if entry else None,
        blacklisted_on=entry.listed_on if entry else None,
        credit_level=service.credit_level_of(ctx.policies, inst),
        credit_score=inst.credit_score,
        trainers=[
            schemas.PublicTrainerOut(
                name=mask_name(t.name),
                id_number_masked=t.id_number_masked,
                teacher_certificate_number=t.teacher_certificate_number,
                subjects=t.subjects,
            )
            for t in trainers
        ],
        courses=[schemas.PublicCourseOut.model_validate(c, from_attributes=True) for c in courses],
    )


@router.get(
    "/public/compliance-keys",
    tags=PUBLIC,
    summary="合规码验签公钥（JWKS，供离线核验）",
)
async def compliance_keys(signer: Signer, response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = "public, max-age=300"
    return signer.jwks()


def _licence_lapsed(inst: Institution) -> bool:
    until = inst.licence_valid_until
    return until is not None and until < service.today()


_VERDICT_ZH = {
    "licensed": "持证经营",
    "suspended": "许可暂停（整改中）",
    "revoked": "许可已吊销",
    "terminated": "已终止办学",
    "blacklisted": "已列入黑名单",
    "expired": "许可已过有效期",
    "superseded": "合规码已被新证取代",
    "unknown": "机构不存在",
}


@router.get(
    "/public/verify/{code}",
    response_model=schemas.VerifyOut,
    tags=PUBLIC,
    summary="在线核验合规码：签名真伪与机构的实时许可状态",
)
async def verify_code(code: str, ctx: Ctx, signer: Signer) -> schemas.VerifyOut:
    try:
        claims, expired = signer.verify(code)
    except InvalidComplianceCode as exc:
        raise Problem(
            422, f"{exc}：该二维码不是本平台签发的合规码。", rule="INST-04", genuine=False
        ) from None
    async with ctx.db.read() as session:
        inst = await session.get(Institution, str(claims["sub"]))
    if inst is None:
        verdict = "unknown"
    elif inst.status in ("suspended", "revoked", "terminated"):
        verdict = inst.status
    elif inst.blacklisted:
        verdict = "blacklisted"
    elif inst.status != "licensed":
        verdict = "unknown"
    elif inst.licence_number != claims.get("licence_number"):
        verdict = "superseded"
    elif expired or _licence_lapsed(inst):
        verdict = "expired"
    else:
        verdict = "licensed"
    return schemas.VerifyOut(
        genuine=True,
        expired=expired,
        verdict=verdict,
        verdict_zh=_VERDICT_ZH[verdict],
        institution_id=str(claims["sub"]),
        name=str(claims.get("name", "")),
        credit_code=str(claims.get("credit_code", "")),
        licence_number=claims.get("licence_number"),
        issued_at=datetime.fromtimestamp(int(claims["iat"]), UTC),
        live=_public_item(inst, ctx.policies) if inst is not None else None,
        blacklisted=bool(inst and inst.blacklisted),
    )


# ---------------------------------------------------------------- public complaints (INST-07)


def _client_address(request: Request) -> str | None:
    """The reporter's address for the rate limit: the last X-Forwarded-For hop
    (the one the gateway appends), else the TCP peer."""
    hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
    hops = [h for h in hops if h]
    if hops:
        return hops[-1]
    return request.client.host if request.client else None


@router.post(
    "/public/complaints",
    response_model=schemas.ComplaintReceipt,
    status_code=201,
    tags=PUBLIC,
    summary="举报校外培训违规行为（可匿名）",
)
async def submit_complaint(
    body: schemas.ComplaintIn, ctx: Ctx, request: Request
) -> schemas.ComplaintReceipt:
    receipt = await service.submit_complaint(ctx, body, _client_address(request))
    c = receipt.complaint
    return schemas.ComplaintReceipt(
        id=c.id,
        tracking_code=receipt.tracking_code,
        status=c.status,
        department=c.department,
        received_on=c.received_on,
        deadline=c.deadline,
    )


@router.get(
    "/public/complaints/{tracking_code}",
    response_model=schemas.ComplaintPublicStatus,
    tags=PUBLIC,
    summary="凭查询码查询举报办理进度",
)
async def complaint_status(tracking_code: str, ctx: Ctx) -> schemas.ComplaintPublicStatus:
    async with ctx.db.read() as session:
        c = (
            await session.scalars(
                select(Complaint).where(
                    Complaint.tracking_code_hash == service.hash_tracking_code(tracking_code)
                )
            )
        ).first()
    if c is None:
        raise not_found("查询码无效。")
    return schemas.ComplaintPublicStatus.model_validate(c, from_attributes=True)


# ---------------------------------------------------------------- registration and licence


@router.post(
    "/institutions",
    response_model=schemas.InstitutionOut,
    status_code=201,
    tags=REG,
    summary="提交机构登记申请（INST-01、INST-02）",
)
async def register(
    body: schemas.ApplicationIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.InstitutionOut:
    inst = await service.register(ctx, body, principal)
    return _institution_out(inst, ctx.policies, principal)


@router.get(
    "/institutions",
    response_model=Page[schemas.InstitutionOut],
    tags=REG,
    summary="机构列表（按权限：本机构 / 本部门本区域 / 本区域）",
)
async def list_institutions(
    principal: CurrentPrincipal,
    ctx: Ctx,
    page: PageQuery,
    status: Annotated[str | None, Query(max_length=16)] = None,
    q: Q = None,
    region_id: RegionQ = None,
    category: CategoryQ = None,
) -> Page[schemas.InstitutionOut]:
    query = select(Institution, Institution.id).where(
        access.institution_scope(principal, Institution)
    )
    if status:
        query = query.where(Institution.status == status)
    query = _public_filters(
        query, q=q, credit_code=None, region_id=region_id, district=None, category=category
    )
    async with ctx.db.read() as session:
        rows, cursor = await _keyset(session, query, Institution.id, page)
    return Page[schemas.InstitutionOut](
        items=[_institution_out(r[0], ctx.policies, principal) for r in rows], next_cursor=cursor
    )


async def _visible(session: AsyncSession, principal: Principal, institution_id: str) -> Institution:
    inst = await session.get(Institution, institution_id)
    access.ensure_view(principal, inst)
    assert inst is not None
    return inst


@router.get(
    "/institutions/{institution_id}",
    response_model=schemas.InstitutionOut,
    tags=REG,
    summary="机构详情",
)
async def get_institution(
    institution_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.InstitutionOut:
    async with ctx.db.read() as session:
        inst = await _visible(session, principal, institution_id)
    return _institution_out(inst, ctx.policies, principal)


@router.patch(
    "/institutions/{institution_id}",
    response_model=schemas.InstitutionOut,
    tags=REG,
    summary="更正机构登记信息（地址、联系人；不含类别与许可）",
)
async def patch_institution(
    institution_id: str, body: schemas.ApplicationPatch, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.InstitutionOut:
    changes = body.model_dump(exclude_unset=True)
    for key in ("legal_representative", "registered_address", "training_addresses"):
        if key in changes and changes[key] is None:
            raise Problem(
                422,
                "该字段不能清空。",
                errors=[FieldError(field=f"body.{key}", message="不能为空")],
            )
    inst = await service.update_application(ctx, institution_id, changes, principal)
    return _institution_out(inst, ctx.policies, principal)


@router.post(
    "/institutions/{institution_id}/transitions",
    response_model=schemas.InstitutionOut,
    tags=REG,
    summary="许可状态变更：受理、许可、不予许可、暂停、恢复、吊销、转型、终止（INST-03）",
)
async def licence_transition(
    institution_id: str, body: schemas.TransitionIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.InstitutionOut:
    inst = await service.transition(ctx, institution_id, body, principal)
    return _institution_out(inst, ctx.policies, principal)


@router.get(
    "/institutions/{institution_id}/transitions",
    response_model=list[schemas.TransitionOut],
    tags=REG,
    summary="许可变更记录（操作人、原因、时间）",
)
async def list_transitions(
    institution_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> list[schemas.TransitionOut]:
    async with ctx.db.read() as session:
        await _visible(session, principal, institution_id)
        rows = await session.scalars(
            select(LicenceTransition)
            .where(LicenceTransition.institution_id == institution_id)
            .order_by(LicenceTransition.id)
        )
        return [schemas.TransitionOut.model_validate(r, from_attributes=True) for r in rows]


@router.post(
    "/institutions/{institution_id}/blacklist",
    response_model=schemas.InstitutionOut,
    tags=REG,
    summary="列入黑名单（INST-04、INST-08）",
)
async def blacklist(
    institution_id: str, body: schemas.BlacklistIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.InstitutionOut:
    inst = await service.blacklist(ctx, institution_id, body.reason, principal)
    return _institution_out(inst, ctx.policies, principal)


@router.post(
    "/institutions/{institution_id}/delist",
    response_model=schemas.InstitutionOut,
    tags=REG,
    summary="移出黑名单",
)
async def delist(
    institution_id: str, body: schemas.BlacklistIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.InstitutionOut:
    inst = await service.delist(ctx, institution_id, body.reason, principal)
    return _institution_out(inst, ctx.policies, principal)


@router.get(
    "/institutions/{institution_id}/compliance-code",
    response_model=schemas.ComplianceCodeOut,
    tags=REG,
    summary="领取合规码（签名二维码内容，INST-04）",
)
async def compliance_code(
    institution_id: str, principal: CurrentPrincipal, ctx: Ctx, signer: Signer
) -> schemas.ComplianceCodeOut:
    async with ctx.db.read() as session:
        inst = await _visible(session, principal, institution_id)
    if (
        inst.status != "licensed"
        or inst.blacklisted
        or inst.licence_number is None
        or _licence_lapsed(inst)
    ):
        raise Problem(
            409,
            "只有持证（许可在有效期内）且未列入黑名单的机构可以领取合规码。",
            rule="INST-04",
            status_now=inst.status,
            blacklisted=inst.blacklisted,
        )
    code = signer.issue(
        institution_id=inst.id,
        name=inst.name,
        credit_code=inst.credit_code,
        licence_number=inst.licence_number,
        region_id=inst.region_id,
        category=inst.category,
        valid_until=inst.licence_valid_until,
    )
    base = str(ctx.extras.get("public_base_url", "")).rstrip("/")
    verify_url = f"{base}/api/v1/institutions/public/verify/{code}"
    return schemas.ComplianceCodeOut(
        code=code,
        qr_payload=verify_url,
        verify_url=verify_url,
        keys_url=f"{base}/api/v1/institutions/public/compliance-keys",
    )


# ---------------------------------------------------------------- trainers (INST-05)


@router.post(
    "/institutions/{institution_id}/trainers",
    response_model=schemas.TrainerOut,
    status_code=201,
    tags=PEOPLE,
    summary="登记从业人员（实名、背景审查、在职教师比对，INST-05）",
)
async def add_trainer(
    institution_id: str, body: schemas.TrainerIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.TrainerOut:
    return _trainer_out(await service.add_trainer(ctx, institution_id, body, principal))


@router.get(
    "/institutions/{institution_id}/trainers",
    response_model=list[schemas.TrainerOut],
    tags=PEOPLE,
    summary="本机构从业人员（证件号掩码）",
)
async def list_trainers(
    institution_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> list[schemas.TrainerOut]:
    async with ctx.db.read() as session:
        await _visible(session, principal, institution_id)
        rows = await session.scalars(
            select(Trainer)
            .where(Trainer.institution_id == institution_id)
            .order_by(Trainer.created_at, Trainer.id)
        )
        return [_trainer_out(t) for t in rows]


@router.delete(
    "/institutions/{institution_id}/trainers/{trainer_id}",
    response_model=schemas.TrainerOut,
    tags=PEOPLE,
    summary="从业人员离职",
)
async def remove_trainer(
    institution_id: str, trainer_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.TrainerOut:
    return _trainer_out(await service.remove_trainer(ctx, institution_id, trainer_id, principal))


# ---------------------------------------------------------------- courses (INST-06)


@router.post(
    "/institutions/{institution_id}/courses",
    response_model=schemas.CourseOut,
    status_code=201,
    tags=COURSES,
    summary="课程备案（时间、时长、指导价等一次列出全部违规，INST-06）",
)
async def file_course(
    institution_id: str, body: schemas.CourseIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.CourseOut:
    filed = await service.file_course(ctx, institution_id, body, principal)
    return _course_out(filed.course, filed.lessons, filed.warnings)


@router.get(
    "/institutions/{institution_id}/courses",
    response_model=list[schemas.CourseOut],
    tags=COURSES,
    summary="本机构备案课程",
)
async def list_courses(
    institution_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> list[schemas.CourseOut]:
    async with ctx.db.read() as session:
        await _visible(session, principal, institution_id)
        rows = await session.scalars(
            select(Course)
            .where(Course.institution_id == institution_id)
            .order_by(Course.filed_at, Course.id)
        )
        return [_course_out(c, []) for c in rows]


@router.get(
    "/institutions/{institution_id}/courses/{course_id}",
    response_model=schemas.CourseOut,
    tags=COURSES,
    summary="备案课程详情（含课表）",
)
async def get_course(
    institution_id: str, course_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.CourseOut:
    async with ctx.db.read() as session:
        await _visible(session, principal, institution_id)
        course = await session.get(Course, course_id)
        if course is None or course.institution_id != institution_id:
            raise not_found("课程不存在。")
        lessons = list(
            (
                await session.scalars(
                    select(CourseLesson)
                    .where(CourseLesson.course_id == course_id)
                    .order_by(CourseLesson.seq)
                )
            ).all()
        )
    return _course_out(course, lessons)


# ---------------------------------------------------------------- complaints (INST-07)


@router.get(
    "/complaints",
    response_model=Page[schemas.ComplaintOut],
    tags=CASES,
    summary="举报列表（本部门本区域；教育局看本区域）",
)
async def list_complaints(
    principal: CurrentPrincipal,
    ctx: Ctx,
    page: PageQuery,
    status: Annotated[
        Literal["received", "assigned", "investigating", "resolved", "dismissed"] | None, Query()
    ] = None,
    overdue: bool = False,
) -> Page[schemas.ComplaintOut]:
    query = select(Complaint, Complaint.id).where(access.complaint_scope(principal, Complaint))
    if status:
        query = query.where(Complaint.status == status)
    if overdue:
        query = query.where(
            Complaint.status.not_in(rules.COMPLAINT_CLOSED), Complaint.deadline < service.today()
        )
    async with ctx.db.read() as session:
        rows, cursor = await _keyset(session, query, Complaint.id, page)
    return Page[schemas.ComplaintOut](
        items=[_complaint_out(r[0], principal) for r in rows], next_cursor=cursor
    )


@router.get(
    "/complaints/overdue",
    response_model=Page[schemas.ComplaintOut],
    tags=CASES,
    summary="逾期未办结的举报（教育局督办）",
)
async def overdue_complaints(
    principal: CurrentPrincipal, ctx: Ctx, page: PageQuery
) -> Page[schemas.ComplaintOut]:
    return await list_complaints(principal, ctx, page, None, True)


@router.get(
    "/complaints/{complaint_id}",
    response_model=schemas.ComplaintOut,
    tags=CASES,
    summary="举报详情与办理记录",
)
async def get_complaint(
    complaint_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.ComplaintOut:
    async with ctx.db.read() as session:
        c = await session.get(Complaint, complaint_id)
        if c is None or not access.complaint_visible(principal, c):
            raise not_found("举报不存在。")
        steps = list(
            (
                await session.scalars(
                    select(ComplaintStep)
                    .where(ComplaintStep.complaint_id == c.id)
                    .order_by(ComplaintStep.id)
                )
            ).all()
        )
    return _complaint_out(c, principal, steps)


@router.post(
    "/complaints/{complaint_id}/transitions",
    response_model=schemas.ComplaintOut,
    tags=CASES,
    summary="办理举报：指派、调查、办结、不予受理（INST-07）",
)
async def complaint_transition(
    complaint_id: str,
    body: schemas.ComplaintTransitionIn,
    principal: CurrentPrincipal,
    ctx: Ctx,
) -> schemas.ComplaintOut:
    await service.complaint_transition(ctx, complaint_id, body, principal)
    return await get_complaint(complaint_id, principal, ctx)


# ---------------------------------------------------------------- inspections, penalties, credit


@router.post(
    "/institutions/{institution_id}/inspections",
    response_model=schemas.InspectionOut,
    status_code=201,
    tags=OVERSIGHT,
    summary="记录检查结果（INST-08）",
)
async def record_inspection(
    institution_id: str, body: schemas.InspectionIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.InspectionOut:
    inspection = await service.record_inspection(ctx, institution_id, body, principal)
    return schemas.InspectionOut.model_validate(inspection, from_attributes=True)


@router.get(
    "/institutions/{institution_id}/inspections",
    response_model=list[schemas.InspectionOut],
    tags=OVERSIGHT,
    summary="检查记录",
)
async def list_inspections(
    institution_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> list[schemas.InspectionOut]:
    async with ctx.db.read() as session:
        await _visible(session, principal, institution_id)
        rows = await session.scalars(
            select(Inspection)
            .where(Inspection.institution_id == institution_id)
            .order_by(Inspection.inspected_on, Inspection.id)
        )
        return [schemas.InspectionOut.model_validate(r, from_attributes=True) for r in rows]


@router.post(
    "/institutions/{institution_id}/penalties",
    response_model=schemas.PenaltyOut,
    status_code=201,
    tags=OVERSIGHT,
    summary="作出处罚（警告、责令整改、罚款、吊销；情节严重列入黑名单，INST-08）",
)
async def impose_penalty(
    institution_id: str, body: schemas.PenaltyIn, principal: CurrentPrincipal, ctx: Ctx
) -> schemas.PenaltyOut:
    result = await service.impose_penalty(ctx, institution_id, body, principal)
    out = schemas.PenaltyOut.model_validate(result.penalty, from_attributes=True)
    out.revoked, out.blacklisted = result.revoked, result.blacklisted
    return out


@router.get(
    "/institutions/{institution_id}/penalties",
    response_model=list[schemas.PenaltyOut],
    tags=OVERSIGHT,
    summary="处罚记录",
)
async def list_penalties(
    institution_id: str, principal: CurrentPrincipal, ctx: Ctx
) -> list[schemas.PenaltyOut]:
    async with ctx.db.read() as session:
        await _visible(session, principal, institution_id)
        rows = await session.scalars(
            select(Penalty)
            .where(Penalty.institution_id == institution_id)
            .order_by(Penalty.decided_on, Penalty.id)
        )
        return [schemas.PenaltyOut.model_validate(r, from_attributes=True) for r in rows]


CREDIT_METHOD = (
    "起始 100 分；举报属实 -5，检查发现问题 -3、严重违规 -10，处罚轻微 -5、一般 -15、严重 -30，"
    "退费逾期 -5，资金风险预警 -3；取值 0–100，按区域政策配置的分数线评为 A/B/C/D。"
)


@router.get(
    "/institutions/{institution_id}/credit",
    response_model=schemas.CreditOut,
    tags=OVERSIGHT,
    summary="信用档案：分数、等级与每一条记录（INST-04）",
)
async def credit(institution_id: str, principal: CurrentPrincipal, ctx: Ctx) -> schemas.CreditOut:
    async with ctx.db.read() as session:
        inst = await _visible(session, principal, institution_id)
        rows = await session.scalars(
            select(CreditRecord)
            .where(CreditRecord.institution_id == institution_id)
            .order_by(CreditRecord.id)
        )
        records = [schemas.CreditRecordOut.model_validate(r, from_attributes=True) for r in rows]
    return schemas.CreditOut(
        institution_id=inst.id,
        score=inst.credit_score,
        level=service.credit_level_of(ctx.policies, inst),
        start=rules.CREDIT_START,
        method=CREDIT_METHOD,
        records=records,
    )
