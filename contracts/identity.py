"""Events published by identity: the school roster everyone else copies."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, Field

from contracts.base import IntegrationEvent, event


@event("identity.region.upserted.v1", "区域（教育局辖区）新建或变更")
class RegionUpserted(IntegrationEvent):
    id: str
    name: str
    profile_id: str = Field(description="区域政策配置编号（policy/*.toml）")


@event("identity.school.upserted.v1", "学校新建或变更")
class SchoolUpserted(IntegrationEvent):
    id: str
    region_id: str
    name: str
    school_system: Literal["6-3", "5-4"] = Field(description="学制：六三制或五四制")
    stage: Literal["primary", "junior", "nine_year"]


class SubjectTeacher(BaseModel):
    teacher_id: str
    subject: str


@event("identity.class.upserted.v1", "班级新建或变更（年级、班主任、任课教师）")
class ClassUpserted(IntegrationEvent):
    id: str
    school_id: str
    grade: int = Field(ge=1, le=9)
    name: str
    head_teacher_id: str | None = None
    subject_teachers: list[SubjectTeacher] = Field(default_factory=list)


@event("identity.teacher.upserted.v1", "教师新建或变更（在职名册）")
class TeacherUpserted(IntegrationEvent):
    id: str
    school_id: str
    name: str
    id_number_hash: str = Field(description="身份证号的带密钥哈希，仅用于比对")
    in_service: bool = True
    subjects: list[str] = Field(default_factory=list)


@event("identity.student.upserted.v1", "学生新建或变更")
class StudentUpserted(IntegrationEvent):
    id: str
    school_id: str
    class_id: str
    grade: int = Field(ge=1, le=9)
    name: str
    active: bool = True


@event("identity.guardian.upserted.v1", "监护人新建或变更")
class GuardianUpserted(IntegrationEvent):
    id: str
    name: str
    user_id: str | None = None
    phone_masked: str | None = None


@event("identity.guardian.linked.v1", "监护关系建立")
class GuardianLinked(IntegrationEvent):
    guardian_id: str
    student_id: str
    relation: str

    def subject_id(self) -> str:
        return f"{self.guardian_id}:{self.student_id}"


@event("identity.guardian.unlinked.v1", "监护关系解除")
class GuardianUnlinked(IntegrationEvent):
    guardian_id: str
    student_id: str

    def subject_id(self) -> str:
        return f"{self.guardian_id}:{self.student_id}"


class HolidayDay(BaseModel):
    date: date
    name: str


@event("identity.calendar.holidays.v1", "法定节假日与调休安排（运营人员导入）")
class HolidaysPublished(IntegrationEvent):
    year: int
    holidays: list[HolidayDay]
    workday_swaps: list[date] = Field(description="因调休而上班的周末日期")

    def subject_id(self) -> str:
        return str(self.year)
