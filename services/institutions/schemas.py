"""Request and response models of the institutions API."""

from __future__ import annotations

from datetime import date, datetime, time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chassis.privacy import is_valid_mobile
from services.institutions.rules import (
    BackgroundCheck,
    Category,
    ComplaintAction,
    ComplaintCategory,
    Department,
    LicenceAction,
    Mode,
    PenaltyKind,
    ProfitStatus,
    Severity,
    TargetGroup,
    Transformation,
)

InstitutionId = str
ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _unique(values: list[Any], what: str) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"{what}有重复项")
    return values


# ---------------------------------------------------------------- registration


class ApplicationIn(Strict):
    id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="机构编号（机构账号申请时取令牌中的 institution 租户；监管部门可指定）",
    )
    name: str = Field(min_length=2, max_length=200, description="机构名称")
    credit_code: str = Field(description="统一社会信用代码（18 位，GB 32100 校验）")
    region_id: str = Field(min_length=2, max_length=64, description="所在区域编号")
    district: str | None = Field(default=None, max_length=100, description="街镇/片区")
    legal_representative: str = Field(min_length=1, max_length=100, description="法定代表人")
    contact_phone: str | None = Field(default=None, description="联系电话（公开时掩码）")
    registered_address: str = Field(min_length=2, max_length=300, description="登记住所")
    training_addresses: list[str] = Field(
        default_factory=list, max_length=20, description="培训场所地址"
    )
    category: Category = Field(description="类别：subject 学科类 / sports / arts / science_tech")
    target_groups: list[TargetGroup] = Field(
        min_length=1, description="培训对象：preschool / compulsory / high_school"
    )
    profit_status: ProfitStatus = Field(description="for_profit 营利性 / non_profit 非营利性")
    modes: list[Mode] = Field(min_length=1, description="offline 线下 / online 线上")
    existing_permit_number: str | None = Field(
        default=None,
        min_length=3,
        max_length=64,
        description="原办学许可证号（现有机构重新登记时填写）",
    )

    @field_validator("target_groups", "modes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return _unique(v, "列表")

    @field_validator("training_addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        if any(not a.strip() or len(a) > 300 for a in v):
            raise ValueError("培训场所地址不能为空且不超过 300 字")
        return [a.strip() for a in v]

    @field_validator("contact_phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        if v is not None and not is_valid_mobile(v):
            raise ValueError("手机号格式不正确")
        return v


class InstitutionOut(BaseModel):
    id: str
    name: str
    credit_code: str
    region_id: str
    district: str | None
    category: Category
    department: Department
    legal_representative: str
    contact_phone: str | None = Field(description="联系电话（仅机构本身可见完整号码，X-06）")
    registered_address: str
    training_addresses: list[str]
    target_groups: list[TargetGroup]
    profit_status: ProfitStatus
    modes: list[Mode]
    existing_permit_number: str | None
    status: str
    licence_number: str | None
    licence_valid_from: date | None
    licence_valid_until: date | None
    reregistration_pending: bool
    blacklisted: bool
    can_enroll: bool
    can_charge: bool
    credit_score: int
    credit_level: str
    created_at: datetime


class TransitionIn(Strict):
    action: LicenceAction = Field(
        description="start_review 受理 / grant 许可 / reject 不予许可 / suspend 暂停 / "
        "reinstate 恢复 / revoke 吊销 / transform 转型 / terminate 终止"
    )
    reason: str = Field(min_length=2, max_length=1000, description="原因（记录在案）")
    valid_until: date | None = Field(default=None, description="许可有效期至（grant，默认 3 年）")
    transformation: Transformation | None = Field(
        default=None, description="三转：to_non_subject / to_non_profit / staff_reassignment"
    )
    new_category: Category | None = Field(default=None, description="转非学科类后的类别")
    staff_reassigned: int | None = Field(default=None, ge=0, le=100000, description="分流人数")


class TransitionOut(BaseModel):
    id: int
    action: str
    from_status: str | None
    to_status: str
    reason: str
    actor: str
    actor_roles: list[str]
    detail: dict[str, Any]
    event_type: str | None
    at: datetime


class BlacklistIn(Strict):
    reason: str = Field(min_length=2, max_length=1000)


# ---------------------------------------------------------------- trainers


class BackgroundCheckIn(Strict):
    result: BackgroundCheck = Field(description="clear 无记录 / pending 审查中 / record_found")
    checked_on: date
    authority: str = Field(min_length=2, max_length=100, description="出具机关")


class TrainerIn(Strict):
    name: str = Field(min_length=1, max_length=100)
    id_type: Literal["resident_id", "passport", "foreign_permanent_residence"] = "resident_id"
    id_number: str = Field(min_length=5, max_length=40, description="证件号（只存哈希与掩码）")
    nationality: str = Field(default="CN", pattern=r"^[A-Z]{2}$", description="国籍 ISO 3166")
    located_abroad: bool = Field(default=False, description="是否身在境外")
    teacher_certificate_number: str | None = Field(
        default=None, pattern=r"^[0-9A-Za-z-]{8,40}$", description="教师资格证书编号"
    )
    subjects: list[str] = Field(default_factory=list, max_length=20)
    consent_given: bool = Field(description="本人同意实名登记与公示")
    background_check: BackgroundCheckIn

    @field_validator("id_number")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.strip().upper()


class TrainerOut(BaseModel):
    id: str
    institution_id: str
    name: str
    id_type: str
    id_number_masked: str
    nationality: str
    located_abroad: bool
    teacher_certificate_number: str | None
    subjects: list[str]
    background_check: str
    background_checked_on: date
    status: str
    flag_reason: str | None
    created_at: datetime


class PublicTrainerOut(BaseModel):
    name: str = Field(description="姓名（掩码）")
    id_number_masked: str
    teacher_certificate_number: str | None
    subjects: list[str]


# ---------------------------------------------------------------- courses


class LessonIn(Strict):
    date: date
    start: time
    end: time


class CourseIn(Strict):
    name: str = Field(min_length=2, max_length=200)
    subject: str = Field(pattern=r"^[a-z_]{2,40}$", description="科目，如 math、english、football")
    mode: Mode
    target_grades: list[int] = Field(
        min_length=1, max_length=13, description="年级：0 学前，1–9 义务教育，10–12 高中"
    )
    min_age_years: int | None = Field(default=None, ge=0, le=30, description="最小学员年龄")
    lesson_minutes: int = Field(ge=1, le=300, description="每课时分钟数")
    price_per_lesson_fen: int = Field(
        strict=True, gt=0, le=100_000_000, description="每课时价格（分）"
    )
    lesson_count: int = Field(ge=1, le=500)
    max_class_size: int = Field(ge=1, le=1000, description="班额上限（决定指导价档次）")
    lessons: list[LessonIn] = Field(min_length=1, max_length=500, description="课表")
    overseas_curriculum: bool = False
    exams_or_rankings: bool = False

    @field_validator("target_grades")
    @classmethod
    def _grades(cls, v: list[int]) -> list[int]:
        if any(g < 0 or g > 12 for g in v):
            raise ValueError("年级应在 0–12 之间")
        return sorted(_unique(v, "年级"))


class LessonOut(BaseModel):
    date: date
    start: time
    end: time


class CourseOut(BaseModel):
    id: str
    institution_id: str
    name: str
    subject: str
    subject_category: str
    mode: str
    target_grades: list[int]
    min_age_years: int | None
    lesson_minutes: int
    price_per_lesson_fen: int
    lesson_count: int
    max_class_size: int
    class_size_band: str
    price_group: str | None
    period_start: date
    period_end: date
    status: str
    filed_at: datetime
    lessons: list[LessonOut] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- complaints


class ComplaintIn(Strict):
    institution_id: str | None = Field(default=None, description="被举报机构编号（已登记的）")
    institution_name: str | None = Field(
        default=None, min_length=2, max_length=200, description="被举报机构名称（未登记时填写）"
    )
    region_id: str | None = Field(default=None, description="区域（未填机构编号时必填）")
    training_category: Category | None = Field(
        default=None, description="培训类别（未登记机构时用于分派主管部门）"
    )
    category: ComplaintCategory
    description: str = Field(min_length=5, max_length=4000)
    anonymous: bool = True
    contact_name: str | None = Field(default=None, max_length=100)
    contact_phone: str | None = None

    @field_validator("contact_phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        if v is not None and not is_valid_mobile(v):
            raise ValueError("手机号格式不正确")
        return v


class ComplaintReceipt(BaseModel):
    id: str
    tracking_code: str = Field(description="查询码：凭此查询办理进度（只显示一次）")
    status: str
    department: str
    received_on: date
    deadline: date


class ComplaintPublicStatus(BaseModel):
    id: str
    category: str
    institution_name: str
    status: str
    received_on: date
    deadline: date
    outcome: str | None


class ComplaintStepOut(BaseModel):
    action: str
    from_status: str | None
    to_status: str
    note: str | None
    actor: str
    at: datetime


class ComplaintOut(BaseModel):
    id: str
    institution_id: str | None
    institution_name: str
    region_id: str
    department: str
    category: str
    description: str
    anonymous: bool
    contact_name: str | None
    contact_phone: str | None = Field(description="联系电话（仅机构本身可见完整号码，X-06）")
    status: str
    received_at: datetime
    received_on: date
    deadline: date
    overdue: bool
    assignee: str | None
    outcome: str | None
    substantiated: bool | None
    closed_at: datetime | None
    history: list[ComplaintStepOut] = Field(default_factory=list)


class ComplaintTransitionIn(Strict):
    action: ComplaintAction
    note: str | None = Field(default=None, max_length=2000)
    assignee: str | None = Field(default=None, max_length=80, description="承办人（默认本人）")
    outcome: str | None = Field(default=None, min_length=2, max_length=4000)
    substantiated: bool | None = Field(default=None, description="举报是否属实（resolve 必填）")


# ---------------------------------------------------------------- inspections, penalties, credit


class InspectionIn(Strict):
    inspected_on: date
    result: Literal["compliant", "issues_found", "serious_violation"]
    findings: str = Field(min_length=2, max_length=4000)


class InspectionOut(BaseModel):
    id: str
    institution_id: str
    inspected_on: date
    result: str
    findings: str
    inspector: str
    created_at: datetime


class PenaltyIn(Strict):
    kind: PenaltyKind = Field(
        description="warning 警告 / rectification_order 责令整改 / fine 罚款 / "
        "licence_revocation 吊销办学许可证"
    )
    severity: Severity = Field(description="minor 轻微 / general 一般 / serious 严重（列入黑名单）")
    fine_fen: int | None = Field(
        default=None, strict=True, gt=0, le=10**13, description="罚款金额（分）"
    )
    reason: str = Field(min_length=2, max_length=4000)
    decided_on: date
    inspection_id: str | None = None
    complaint_id: str | None = None


class PenaltyOut(BaseModel):
    id: str
    institution_id: str
    kind: str
    severity: str
    fine_fen: int | None
    reason: str
    decided_on: date
    inspection_id: str | None
    complaint_id: str | None
    decided_by: str
    created_at: datetime
    revoked: bool = False
    blacklisted: bool = False


class CreditRecordOut(BaseModel):
    source: str
    source_ref: str
    delta: int
    reason: str
    recorded_at: datetime


class CreditOut(BaseModel):
    institution_id: str
    score: int
    level: str
    start: int
    method: str
    records: list[CreditRecordOut]


# ---------------------------------------------------------------- public


class PublicListItem(BaseModel):
    id: str
    name: str
    credit_code: str
    region_id: str
    district: str | None
    category: Category
    department: Department
    status: str
    licence_number: str | None
    licence_valid_until: date | None
    can_enroll: bool
    credit_level: str


class BlacklistItem(BaseModel):
    id: str
    name: str
    credit_code: str
    region_id: str
    district: str | None
    category: Category
    status: str
    licence_number: str | None
    reason: str
    listed_on: date


class PublicCourseOut(BaseModel):
    id: str
    name: str
    subject: str
    mode: str
    target_grades: list[int]
    lesson_minutes: int
    price_per_lesson_fen: int
    lesson_count: int
    period_start: date
    period_end: date


class PublicInstitutionOut(BaseModel):
    id: str
    name: str
    credit_code: str
    region_id: str
    district: str | None
    category: Category
    category_zh: str
    department: Department
    department_zh: str
    legal_representative: str
    training_addresses: list[str]
    target_groups: list[str]
    profit_status: str
    modes: list[str]
    status: str
    status_zh: str
    licence_number: str | None
    licence_valid_until: date | None
    can_enroll: bool
    can_charge: bool
    reregistration_pending: bool
    blacklisted: bool
    blacklist_reason: str | None
    blacklisted_on: date | None
    credit_level: str
    credit_score: int
    trainers: list[PublicTrainerOut]
    courses: list[PublicCourseOut]


class ComplianceCodeOut(BaseModel):
    code: str = Field(description="合规码（EdDSA 签名的 JWS）")
    qr_payload: str = Field(description="二维码内容：在线核验地址")
    verify_url: str
    keys_url: str


class VerifyOut(BaseModel):
    genuine: bool = Field(description="签名是否由本平台签发")
    expired: bool = Field(description="合规码是否已过期（随许可证有效期）")
    verdict: str = Field(description="当前结论：licensed / suspended / revoked / ...")
    verdict_zh: str
    institution_id: str
    name: str
    credit_code: str
    licence_number: str | None
    issued_at: datetime
    live: PublicListItem | None = Field(description="当前实时状态")
    blacklisted: bool


class ApplicationPatch(Strict):
    """What an institution may correct on its record (not category, groups or licence)."""

    district: str | None = Field(default=None, max_length=100)
    legal_representative: str | None = Field(default=None, min_length=1, max_length=100)
    contact_phone: str | None = None
    registered_address: str | None = Field(default=None, min_length=2, max_length=300)
    training_addresses: list[str] | None = Field(default=None, max_length=20)

    @field_validator("contact_phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        if v is not None and not is_valid_mobile(v):
            raise ValueError("手机号格式不正确")
        return v

    @field_validator("training_addresses")
    @classmethod
    def _addresses(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not a.strip() or len(a) > 300 for a in v):
            raise ValueError("培训场所地址不能为空且不超过 300 字")
        return None if v is None else [a.strip() for a in v]
