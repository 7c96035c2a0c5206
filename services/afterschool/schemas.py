"""afterschool's request and response models."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _local_time(value: dt.time) -> dt.time:
    if value.tzinfo is not None:
        raise ValueError("请填写北京时间的本地时刻（如 17:30），不带时区")
    return value


def _aware(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("须带时区（如 2026-09-01T08:00:00+08:00）")
    return value


LocalTime = Annotated[dt.time, AfterValidator(_local_time)]
AwareDatetime = Annotated[dt.datetime, AfterValidator(_aware)]


class SessionIn(_In):
    kind: Literal["regular", "evening_study", "delayed_care"] = "regular"
    start: LocalTime
    end: LocalTime


class PlanIn(_In):
    term: str = Field(min_length=1, max_length=100, description="学期名称（本地区校历）")
    stage: Literal["primary", "junior"] | None = Field(
        default=None, description="学段；九年一贯制学校须指明"
    )
    sessions: list[SessionIn] = Field(min_length=1, max_length=10)
    delayed_care_student_ids: list[str] = Field(default_factory=list, max_length=2000)
    fee_standard_fen: int = Field(ge=0, description="物价部门核定的收费标准（分）")
    fee_unit: Literal["month", "session"] = "month"
    make_up_weekdays: dict[dt.date, int] = Field(
        default_factory=dict,
        max_length=20,
        description="调休上班日按哪一天的课表上课（日期 → 1-5）；未指明的按其补的节假日所在星期",
    )


class PlanOut(BaseModel):
    id: str
    school_id: str
    region_id: str
    term: str
    stage: str
    sessions: list[SessionIn]
    service_days: list[dt.date]
    service_day_count: int
    daily_minutes: int
    delayed_care_students: int
    fee_standard_fen: int
    fee_unit: str
    window_opens_at: dt.datetime | None
    window_closes_at: dt.datetime | None
    window_mode: str | None
    lottery_seed_hash: str | None
    lottery_seed: str | None
    lottery_drawn_at: dt.datetime | None
    make_up_weekdays: dict[str, int] = Field(
        default_factory=dict, description="调休上班日（服务日）→ 所按课表的星期"
    )


class WindowIn(_In):
    opens_at: AwareDatetime
    closes_at: AwareDatetime
    mode: Literal["first_come", "lottery"]
    seed: str | None = Field(
        default=None, min_length=8, max_length=128, description="抽签种子（不填则随机生成）"
    )


class CourseIn(_In):
    name: str = Field(min_length=1, max_length=200)
    kind: str = Field(min_length=1, max_length=32, description="homework_guidance 或兴趣类")
    weekdays: list[int] = Field(min_length=1, max_length=7)
    start: LocalTime
    end: LocalTime
    capacity: int = Field(ge=1, le=10_000)
    provider_type: Literal[
        "own_teacher", "retired_teacher", "professional", "volunteer", "institution"
    ]
    provider_name: str = Field(min_length=1, max_length=200)
    institution_id: str | None = None
    teacher_id: str | None = Field(default=None, description="负责点名的教师（人员编号）")
    fee_fen: int = Field(ge=0)
    fee_unit: Literal["month", "session"] = "month"


class CourseOut(BaseModel):
    id: str
    plan_id: str
    school_id: str
    name: str
    kind: str
    weekdays: list[int]
    start: dt.time
    end: dt.time
    capacity: int
    seats_taken: int
    seats_left: int
    provider_type: str
    provider_name: str
    institution_id: str | None
    teacher_id: str | None
    fee_fen: int
    fee_unit: str
    status: str
    flag_reason: str | None


class EnrollIn(_In):
    student_id: str
    course_id: str
    consent: bool = Field(description="监护人明确同意参加课后服务（自愿）")
    consent_statement: str = Field(default="本人自愿为孩子报名参加学校课后服务。", max_length=500)


class EnrollmentOut(BaseModel):
    id: str
    course_id: str
    student_id: str
    status: str
    waitlist_position: int | None
    consent_at: dt.datetime
    created_at: dt.datetime


class RollCallMark(_In):
    student_id: str
    status: Literal["present", "absent", "excused"]


class RollCallIn(_In):
    marks: list[RollCallMark] = Field(min_length=1, max_length=1000)


class ExitIn(_In):
    student_id: str
    date: dt.date
    left_at: AwareDatetime
    mode: Literal["guardian_pickup", "alone_with_consent", "flexible_early"]
    guardian_id: str | None = None
    reason: str | None = Field(default=None, max_length=500)


class WaiverIn(_In):
    student_id: str
    share_percent: int = Field(ge=1, le=100)


class SettleIn(_In):
    month: str = Field(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")
    final: bool = Field(
        default=False, description="false：按计划课次预收；true：按实际服务天数结算（多退）"
    )


class StatementOut(BaseModel):
    id: str
    enrollment_id: str
    course_id: str
    student_id: str
    month: str
    planned_sessions: int
    served_sessions: int
    gross_fen: int
    waiver_fen: int
    amount_fen: int
    paid_fen: int


class PaymentIn(_In):
    amount_fen: int = Field(gt=0)
    non_tax_account_ref: str = Field(
        min_length=4, max_length=100, description="学校非税收入账户缴款凭证号"
    )


class RatingIn(_In):
    student_id: str
    month: str = Field(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")
    score: int
    comment: str = Field(default="", max_length=1000)


class SurveyIn(_In):
    student_id: str
    score: int
    comment: str = Field(default="", max_length=2000)
