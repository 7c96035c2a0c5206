"""Events published by afterschool (AS-01..AS-08).

Small facts for whoever notifies guardians or reports upwards. Student ids
appear where a guardian must be told about their own child (attendance,
leaving, seats); names never leave the service (X-06).
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field

from contracts.base import IntegrationEvent, event

EnrollmentStatus = Literal["applied", "held", "waitlisted", "withdrawn", "not_drawn"]
AttendanceStatus = Literal["present", "absent", "excused"]
LeaveMode = Literal["guardian_pickup", "alone_with_consent", "flexible_early"]


@event("afterschool.plan.published.v1", "学校课后服务方案（一校一案）已发布")
class PlanPublished(IntegrationEvent):
    id: str = Field(description="方案编号")
    school_id: str
    region_id: str
    term: str = Field(description="学期名称")
    service_days: int = Field(description="服务天数")
    first_day: dt.date | None = None
    last_day: dt.date | None = None
    daily_minutes: int
    end_time: dt.time


@event("afterschool.course.flagged.v1", "课后服务课程被标记（机构退出目录），须告知家长")
class CourseFlagged(IntegrationEvent):
    id: str = Field(description="课程编号")
    school_id: str
    institution_id: str | None = None
    reason: str
    affected_student_ids: list[str] = Field(
        default_factory=list, description="已报名/候补学生编号（用于通知其监护人）"
    )


@event("afterschool.enrollment.changed.v1", "课后服务报名状态变化（报名、候补、递补、退课、抽签）")
class EnrollmentChanged(IntegrationEvent):
    id: str = Field(description="报名编号")
    course_id: str
    school_id: str
    student_id: str
    status: EnrollmentStatus
    previous_status: EnrollmentStatus | None = None
    waitlist_position: int | None = None
    occurred_at: dt.datetime


@event("afterschool.attendance.recorded.v1", "课后服务点名结果（出勤、缺勤、请假），通知监护人")
class AttendanceRecorded(IntegrationEvent):
    course_id: str
    school_id: str
    student_id: str
    date: dt.date
    status: AttendanceStatus
    recorded_by: str

    def subject_id(self) -> str:
        return f"{self.course_id}:{self.date.isoformat()}:{self.student_id}"


@event("afterschool.student.left.v1", "学生离校记录（家长接走、自行离校、弹性离校），通知监护人")
class StudentLeft(IntegrationEvent):
    id: str = Field(description="离校记录编号")
    school_id: str
    student_id: str
    date: dt.date
    left_at: dt.datetime
    mode: LeaveMode
    guardian_id: str | None = Field(default=None, description="接走学生的监护人")


@event("afterschool.fee.settled.v1", "课后服务费按实际服务天数结算（收支两条线，非税账户）")
class FeeSettled(IntegrationEvent):
    id: str = Field(description="账单编号")
    school_id: str
    student_id: str
    course_id: str
    month: str = Field(description="YYYY-MM")
    amount_fen: int
    waived: bool


@event("afterschool.fee.paid.v1", "课后服务费已缴入学校非税账户")
class FeePaid(IntegrationEvent):
    id: str = Field(description="缴费编号")
    statement_id: str
    school_id: str
    amount_fen: int
    non_tax_account_ref: str
