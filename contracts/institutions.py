"""Events published by institutions (INST-02, INST-03, INST-06, INST-08).

Licence and black-list events carry the facts their consumers act on without
calling back: funds freezes an escrow account and plans refunds (FUND-07) when
``can_charge`` turns false, and opens one (FUND-01) when a licence is granted;
afterschool drops an institution from the catalog and flags its courses
(AS-03) when ``can_enroll`` turns false. One transition, one event.
"""

from __future__ import annotations

from datetime import date, datetime, time
from typing import Literal

from pydantic import BaseModel, Field

from contracts.base import IntegrationEvent, event

Category = Literal["subject", "sports", "arts", "science_tech"]
Department = Literal["education", "sports", "culture", "science"]
LicenceStatus = Literal[
    "applied", "under_review", "licensed", "rejected", "suspended", "revoked", "terminated"
]


class InstitutionFacts(IntegrationEvent):
    """What every licence and black-list event says about the institution."""

    institution_id: str
    name: str
    region_id: str
    category: Category = Field(description="subject 学科类 / sports / arts / science_tech")
    department: Department = Field(description="主管部门：教育 / 体育 / 文旅 / 科技")
    credit_code: str = Field(description="统一社会信用代码")
    licence_number: str | None = Field(default=None, description="办学许可证编号")
    licence_valid_until: date | None = None
    status: LicenceStatus = Field(description="转换后的许可状态")
    previous_status: LicenceStatus | None = None
    profit_status: Literal["for_profit", "non_profit"]
    blacklisted: bool
    reregistration_pending: bool = Field(
        description="学科类机构尚未登记为非营利性（在此之前暂停招生及收费，INST-02）"
    )
    can_enroll: bool = Field(description="可否招生（afterschool 目录 AS-03）")
    can_charge: bool = Field(description="可否收费（funds 冻结 FUND-07）")
    reason: str = Field(description="变更原因")
    actor: str = Field(description="操作人")
    occurred_at: datetime

    def subject_id(self) -> str:
        return self.institution_id


@event("institutions.licence.review_started.v1", "机构申请受理，进入审核")
class LicenceReviewStarted(InstitutionFacts):
    pass


@event("institutions.licence.granted.v1", "办学许可已发放（可开设资金监管专户、进入课后服务目录）")
class LicenceGranted(InstitutionFacts):
    pass


@event("institutions.licence.rejected.v1", "办学许可申请不予许可")
class LicenceRejected(InstitutionFacts):
    pass


@event("institutions.licence.suspended.v1", "办学许可暂停（整改），暂停招生与收费")
class LicenceSuspended(InstitutionFacts):
    pass


@event("institutions.licence.reinstated.v1", "整改完成，办学许可恢复")
class LicenceReinstated(InstitutionFacts):
    pass


@event("institutions.licence.revoked.v1", "办学许可已吊销")
class LicenceRevoked(InstitutionFacts):
    pass


@event(
    "institutions.licence.transformed.v1",
    "机构转型（三转：转非学科类、转非营利性、人员分流）",
)
class LicenceTransformed(InstitutionFacts):
    transformation: Literal["to_non_subject", "to_non_profit", "staff_reassignment"]
    previous_category: Category
    previous_profit_status: Literal["for_profit", "non_profit"]
    staff_reassigned: int | None = None


@event("institutions.licence.terminated.v1", "机构终止办学（三转一止之“一止”）")
class LicenceTerminated(InstitutionFacts):
    pass


@event("institutions.blacklisted.v1", "机构列入黑名单")
class Blacklisted(InstitutionFacts):
    listed_on: date


@event("institutions.delisted.v1", "机构移出黑名单")
class Delisted(InstitutionFacts):
    delisted_on: date


class FiledLesson(BaseModel):
    date: date
    start: time
    end: time


@event("institutions.course.filed.v1", "课程备案完成（收费校验所需的价格与课时，FUND-02）")
class CourseFiled(IntegrationEvent):
    institution_id: str
    region_id: str
    course_id: str
    name: str
    subject: str
    subject_category: Category = Field(description="机构类别：学科类或非学科类")
    mode: Literal["offline", "online"]
    target_grades: list[int] = Field(description="0 学前，1–9 义务教育，10–12 高中")
    price_per_lesson_fen: int
    lesson_count: int
    lesson_minutes: int
    class_size_band: Literal["lt10", "10to35", "gt35"]
    period_start: date
    period_end: date
    lessons: list[FiledLesson] = Field(default_factory=list)
    filed_at: datetime

    def subject_id(self) -> str:
        return self.course_id
