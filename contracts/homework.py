"""Events published by homework.

Public facts only: no student names or ids ever leave the service in an event
(HW-01 publicity is about classes, not children; X-06).
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field

from contracts.base import IntegrationEvent, event

Kind = Literal["written", "reading", "oral", "practice", "sport", "project"]
Layer = Literal["basic", "extended", "personalized"]
Location = Literal["in_school", "at_home"]


class _AssignmentFacts(IntegrationEvent):
    id: str = Field(description="作业编号")
    school_id: str
    class_id: str
    grade: int = Field(ge=1, le=9)
    date: dt.date = Field(description="作业日期（北京时间的本地日期）")
    subject: str
    kind: Kind
    layer: Layer
    location: Location
    estimated_minutes: int = Field(ge=0, description="教师试做的预计用时（分钟）")


@event("homework.assignment.published.v1", "作业已公示（仅公开信息，不含学生姓名）")
class AssignmentPublished(_AssignmentFacts):
    pass


@event("homework.assignment.revised.v1", "已公示的作业被修改（修改后的公开信息）")
class AssignmentRevised(_AssignmentFacts):
    version: int = Field(ge=1)


@event("homework.assignment.withdrawn.v1", "已公示的作业被撤回")
class AssignmentWithdrawn(IntegrationEvent):
    id: str
    school_id: str
    class_id: str
    date: dt.date
    subject: str


class _BurdenAlert(IntegrationEvent):
    alert_id: str = Field(description="预警编号")
    school_id: str
    region_id: str
    class_id: str
    grade: int = Field(ge=1, le=9)
    median_minutes: float = Field(description="窗口内班级每日实际书面作业用时的中位数（分钟）")
    limit_minutes: int = Field(description="该年级每日书面作业时长上限（分钟）")
    window_start: dt.date
    window_end: dt.date
    window_school_days: int = Field(ge=1, description="窗口的上学日天数")

    def subject_id(self) -> str:
        return self.class_id


@event(
    "homework.burden.alert.opened.v1",
    "班级作业负担预警：最近若干上学日实际用时中位数超过上限（HW-06）",
)
class BurdenAlertOpened(_BurdenAlert):
    pass


@event("homework.burden.alert.closed.v1", "班级作业负担预警解除：实际用时中位数回落到上限以内")
class BurdenAlertClosed(_BurdenAlert):
    pass
