"""Request and response models of identity's API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chassis.auth import ROLES
from chassis.privacy import is_valid_mobile, is_valid_resident_id

SchoolSystem = Literal["6-3", "5-4"]
Stage = Literal["primary", "junior", "nine_year"]
Relation = Literal["father", "mother", "grandparent", "other"]
SUBJECTS = (
    "chinese",
    "math",
    "english",
    "science",
    "morality",
    "history",
    "geography",
    "physics",
    "chemistry",
    "biology",
    "pe",
    "music",
    "art",
    "it",
    "labour",
    "other",
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int
    refresh_token: str | None = None
    scope: str | None = None


class RegionIn(Strict):
    id: str = Field(pattern=r"^[a-z0-9-]{2,64}$", description="区域编号")
    name: str = Field(min_length=1, max_length=100)
    profile_id: str = Field(description="政策配置编号，须在 policy/ 中存在")


class RegionOut(BaseModel):
    id: str
    name: str
    profile_id: str


class SchoolIn(Strict):
    region_id: str
    name: str = Field(min_length=1, max_length=200)
    school_system: SchoolSystem = Field(description="学制：6-3 或 5-4")
    stage: Stage


class SchoolOut(BaseModel):
    id: str
    region_id: str
    name: str
    school_system: SchoolSystem
    stage: Stage


class SubjectTeacherIn(Strict):
    teacher_id: str
    subject: str = Field(min_length=1, max_length=32)


class ClassIn(Strict):
    grade: int = Field(ge=1, le=9, description="年级 1–9")
    name: str = Field(min_length=1, max_length=100)
    head_teacher_id: str | None = None
    subject_teachers: list[SubjectTeacherIn] = Field(default_factory=list)


class ClassPatch(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    head_teacher_id: str | None = None
    subject_teachers: list[SubjectTeacherIn] | None = None


class ClassOut(BaseModel):
    id: str
    school_id: str
    grade: int
    name: str
    head_teacher_id: str | None
    subject_teachers: list[SubjectTeacherIn]


class TeacherIn(Strict):
    name: str = Field(min_length=1, max_length=100)
    id_number: str = Field(description="身份证号（仅存哈希与掩码）")
    phone: str | None = None
    subjects: list[str] = Field(default_factory=list)
    in_service: bool = True

    @field_validator("id_number")
    @classmethod
    def _id(cls, v: str) -> str:
        if not is_valid_resident_id(v):
            raise ValueError("身份证号无效（校验位不符）")
        return v.upper()

    @field_validator("phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        if v is not None and not is_valid_mobile(v):
            raise ValueError("手机号格式不正确")
        return v


class TeacherOut(BaseModel):
    id: str
    school_id: str
    name: str
    id_number_masked: str
    phone: str | None
    subjects: list[str]
    in_service: bool


class StudentIn(Strict):
    class_id: str
    student_no: str = Field(min_length=1, max_length=32)
    name: str = Field(min_length=1, max_length=100)
    id_number: str | None = None

    @field_validator("id_number")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not is_valid_resident_id(v):
            raise ValueError("身份证号无效（校验位不符）")
        return v.upper() if v else v


class StudentOut(BaseModel):
    id: str
    school_id: str
    class_id: str
    grade: int
    student_no: str
    name: str
    id_number_masked: str | None
    active: bool


class GuardianIn(Strict):
    name: str = Field(min_length=1, max_length=100)
    phone: str
    student_id: str
    relation: Relation

    @field_validator("phone")
    @classmethod
    def _phone(cls, v: str) -> str:
        if not is_valid_mobile(v):
            raise ValueError("手机号格式不正确")
        return v


class GuardianOut(BaseModel):
    id: str
    name: str
    phone: str | None = Field(description="仅本人可见完整号码，其余角色看到掩码")
    student_ids: list[str]


class UserIn(Strict):
    username: str = Field(pattern=r"^[A-Za-z0-9_.@-]{3,64}$")
    password: str = Field(min_length=8, max_length=128)
    display_name: str = Field(min_length=1, max_length=100)
    roles: list[str] = Field(min_length=1)
    tenants: list[str] = Field(default_factory=list)
    person_id: str | None = None

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        unknown = set(v) - ROLES
        if unknown:
            raise ValueError(f"未知角色：{', '.join(sorted(unknown))}")
        return sorted(set(v))

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, v: list[str]) -> list[str]:
        kinds = {"region", "school", "institution", "bank", "department"}
        for t in v:
            kind, _, ident = t.partition(":")
            if kind not in kinds or not ident:
                raise ValueError(f"租户格式应为 类型:编号（{'/'.join(sorted(kinds))}）：{t}")
        return sorted(set(v))


class UserOut(BaseModel):
    id: str
    username: str
    display_name: str
    roles: list[str]
    tenants: list[str]
    person_id: str | None
    active: bool


class ClientIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    scopes: list[str] = Field(min_length=1)
    tenants: list[str] = Field(
        default_factory=list, description="平台可访问的租户（如 region:jinhua）"
    )


class ClientOut(BaseModel):
    client_id: str
    name: str
    scopes: list[str]
    tenants: list[str]
    client_secret: str | None = Field(default=None, description="仅在创建时返回一次")


class RosterRowError(BaseModel):
    row: int
    field: str
    message: str


class RosterImportResult(BaseModel):
    classes_created: int
    students_imported: int
    guardians_imported: int


class MeOut(BaseModel):
    subject: str
    kind: str
    roles: list[str]
    tenants: list[str]
    person_id: str | None
    name: str | None
