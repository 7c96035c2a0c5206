"""Request and response models of homework's API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["written", "reading", "oral", "practice", "sport", "project"]
Layer = Literal["basic", "extended", "personalized"]
Location = Literal["in_school", "at_home"]
SubjectName = str


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Flags(Strict):
    """HW-05: any of these set to true refuses the assignment."""

    assigned_to_parents: bool = Field(default=False, description="布置给家长的作业")
    parents_must_check: bool = Field(default=False, description="要求家长检查、批改")
    students_self_grade: bool = Field(default=False, description="要求学生自批自改")
    requires_phone: bool = Field(default=False, description="需要使用手机完成或打卡")
    punitive: bool = Field(default=False, description="惩罚性作业")
    repetitive: bool = Field(default=False, description="重复性、机械性作业")


class AssignmentIn(Strict):
    date: dt.date = Field(description="作业日期（本地日期）")
    subject: str = Field(min_length=1, max_length=32, description="学科，须为本班任课学科")
    content: str = Field(min_length=1, max_length=4000, description="作业内容")
    kind: Kind = Field(description="类型：书面/阅读/口头/实践/体育/项目")
    layer: Layer = Field(description="分层：basic 必做 / extended 选做 / personalized 个性化")
    location: Location = Field(description="完成地点：in_school 校内 / at_home 家庭")
    estimated_minutes: int = Field(ge=1, le=300, description="教师试做得到的预计用时（分钟）")
    target_student_ids: list[str] = Field(
        default_factory=list, max_length=100, description="个性化作业面向的学生（仅 personalized）"
    )
    flags: Flags = Field(default_factory=Flags, description="禁止事项自查（HW-05）")
    acknowledged_warnings: list[str] = Field(
        default_factory=list, max_length=50, description="教师已确认的内容筛查提示（HW-05）"
    )

    @model_validator(mode="after")
    def _targets(self) -> AssignmentIn:
        check_targets(self.layer, self.target_student_ids)
        return self


def check_targets(layer: str | None, targets: list[str] | None) -> None:
    if layer == "personalized" and not targets:
        raise ValueError("个性化作业须指定 target_student_ids")
    if layer is not None and layer != "personalized" and targets:
        raise ValueError("只有个性化作业（personalized）可以指定 target_student_ids")
    if targets and len(set(targets)) != len(targets):
        raise ValueError("target_student_ids 有重复")


class AssignmentPatch(Strict):
    """Fields to change; the class never changes (withdraw and publish again)."""

    date: dt.date | None = None
    subject: str | None = Field(default=None, min_length=1, max_length=32)
    content: str | None = Field(default=None, min_length=1, max_length=4000)
    kind: Kind | None = None
    layer: Layer | None = None
    location: Location | None = None
    estimated_minutes: int | None = Field(default=None, ge=1, le=300)
    target_student_ids: list[str] | None = Field(default=None, max_length=100)
    flags: Flags | None = None
    acknowledged_warnings: list[str] | None = Field(default=None, max_length=50)
    reason: str | None = Field(default=None, max_length=500, description="修改原因")
    expected_version: int | None = Field(default=None, ge=1, description="乐观并发：当前版本号")

    @model_validator(mode="after")
    def _not_null(self) -> AssignmentPatch:
        for name in self.model_fields_set:
            if name not in ("reason", "expected_version") and getattr(self, name) is None:
                raise ValueError(f"{name} 不能为 null")
        return self


class WithdrawIn(Strict):
    reason: str = Field(min_length=1, max_length=500, description="撤回原因")


class Usage(BaseModel):
    """The class's required written homework at home for one day (HW-02)."""

    class_id: str
    date: dt.date
    day_kind: str = Field(description="school_day / weekend / statutory_holiday / vacation / other")
    rule: str = Field(description="决定上限的规则：HW-02（上学日）或 HW-04")
    limit: int = Field(description="当日上限（分钟）")
    used: int = Field(description="当日已用（分钟）")
    remaining: int = Field(description="当日剩余（分钟）")
    no_written_homework: str | None = Field(
        default=None, description="无书面作业的原因（节日或学校无书面作业日）"
    )
    subjects: dict[str, int] = Field(default_factory=dict, description="各学科已用分钟")
    quotas: dict[str, int] = Field(default_factory=dict, description="班主任设定的学科配额")


class AssignmentOut(BaseModel):
    id: str
    school_id: str
    class_id: str
    grade: int
    date: dt.date
    subject: str
    content: str
    kind: Kind
    layer: Layer
    location: Location
    estimated_minutes: int
    counts_toward_limit: bool = Field(description="是否计入班级每日书面作业总量（HW-02）")
    teacher_id: str
    target_student_ids: list[str]
    acknowledged_warnings: list[str]
    status: Literal["published", "withdrawn"]
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    withdrawn_at: dt.datetime | None = None


class AssignmentReply(BaseModel):
    assignment: AssignmentOut
    usage: Usage


class RevisionOut(BaseModel):
    version: int
    action: str
    actor_id: str
    reason: str | None
    at: dt.datetime
    snapshot: dict[str, object]


class QuotaItem(Strict):
    subject: str = Field(min_length=1, max_length=32)
    minutes: int = Field(ge=0, le=300)


class QuotasIn(Strict):
    quotas: list[QuotaItem] = Field(max_length=30, description="空列表表示取消配额（先到先得）")

    @model_validator(mode="after")
    def _unique(self) -> QuotasIn:
        subjects = [q.subject for q in self.quotas]
        if len(set(subjects)) != len(subjects):
            raise ValueError("学科重复")
        return self


class QuotasOut(BaseModel):
    class_id: str
    limit: int = Field(description="该年级上学日每日上限（分钟）")
    total: int
    quotas: dict[str, int]


class NoWrittenDayIn(Strict):
    reason: str = Field(min_length=1, max_length=200, description="原因，如 读书节")


class NoWrittenDayOut(BaseModel):
    school_id: str
    date: dt.date
    reason: str
    existing_written_assignments: int | None = Field(
        default=None, description="当日已发布的书面家庭作业条数（需教师自行调整）"
    )


class ReportIn(Strict):
    minutes: int = Field(ge=0, le=600, description="实际用时（分钟）")


class ReportOut(BaseModel):
    assignment_id: str
    student_id: str
    minutes: int
    reported_on: dt.date
    created_at: dt.datetime
    updated_at: dt.datetime


class CompareRow(BaseModel):
    subject: str | None = None
    teacher_id: str | None = None
    assignments: int = Field(description="有反馈的作业数")
    reports: int
    estimated_minutes_avg: float = Field(description="每条反馈对应的预计用时平均值")
    actual_minutes_avg: float = Field(description="反馈的实际用时平均值")
    ratio: float | None = Field(description="实际/预计")


class CompareOut(BaseModel):
    class_id: str
    date_from: dt.date
    date_to: dt.date
    overall: CompareRow
    by_subject: list[CompareRow]
    by_teacher: list[CompareRow]


class PublicAssignment(BaseModel):
    id: str
    subject: str
    content: str
    kind: Kind
    layer: Layer
    location: Location
    estimated_minutes: int
    teacher_name: str | None
    personalized_students: int = Field(description="个性化作业面向的学生人数（不公开姓名）")


class PublicClassDay(BaseModel):
    class_id: str
    class_name: str
    grade: int
    limit: int
    used: int
    assignments: list[PublicAssignment]


class PublicSchoolDay(BaseModel):
    school_id: str
    school_name: str
    date: dt.date
    no_written_homework: str | None
    classes: list[PublicClassDay]


class WeeklyRow(BaseModel):
    grade: int
    subject: str
    assignments: int
    total_minutes: int
    classes: int
    avg_daily_minutes: float = Field(description="每班每个上学日平均分钟数")
    last_week_total_minutes: int
    change_minutes: int
    change_percent: float | None
    direction: Literal["up", "down", "flat", "new"]


class WeeklySummary(BaseModel):
    school_id: str
    school_name: str
    week_start: dt.date
    week_end: dt.date
    school_days: int
    rows: list[WeeklyRow]


class MinutesStats(BaseModel):
    class_days: int
    avg: float | None
    p90: float | None


class GradeStats(BaseModel):
    grade: int
    estimated: MinutesStats
    reported: MinutesStats


class SchoolOversight(BaseModel):
    school_id: str
    school_name: str
    region_id: str
    published: int
    refused: int
    compliance_rate: float | None = Field(description="发布成功数 /（发布成功数 + 被拒次数）")
    refusals_by_rule: dict[str, int]
    grades: list[GradeStats]
    alerts_open: int
    alerts_closed: int


class OversightReport(BaseModel):
    date_from: dt.date
    date_to: dt.date
    schools: list[SchoolOversight]


class AlertOut(BaseModel):
    id: str
    class_id: str
    school_id: str
    region_id: str
    grade: int
    status: Literal["open", "closed"]
    limit_minutes: int
    opened_at: dt.datetime
    open_median_minutes: float
    open_window_start: dt.date
    open_window_end: dt.date
    closed_at: dt.datetime | None
    close_median_minutes: float | None
    close_window_start: dt.date | None
    close_window_end: dt.date | None


class EstimateGapOut(BaseModel):
    teacher_id: str
    teacher_name: str | None
    school_id: str
    reports: int
    estimated_minutes_total: int
    actual_minutes_total: int
    ratio: float
    threshold: float
    flagged: bool


class WarningOut(BaseModel):
    assignment_id: str
    school_id: str
    class_id: str
    date: dt.date
    subject: str
    teacher_id: str
    content: str
    acknowledged_warnings: list[str]
    status: str


class ClassRef(BaseModel):
    class_id: str
    school_id: str
    class_name: str
    grade: int
    student_ids: list[str] = Field(description="调用者在该班的孩子（家长）或本人（学生）")


class EveningStudyIn(BaseModel):
    weekdays: list[Annotated[int, Field(ge=1, le=7)]] = Field(
        max_length=7, description="参加晚自习的星期（1=周一 … 7=周日）；空列表即取消"
    )


class EveningStudyOut(BaseModel):
    class_id: str
    weekdays: list[int]
    written_homework_stays_at_school: bool = Field(
        description="本区域政策下，这些上学日的书面作业是否须在晚自习完成、不带回家（HW-02）"
    )
