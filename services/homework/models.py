"""homework's tables, including its read copy of identity's roster."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from chassis.db import TYPE_ANNOTATION_MAP, new_metadata, utcnow
from chassis.roster import roster_tables


class Base(DeclarativeBase):
    metadata = new_metadata()
    type_annotation_map = TYPE_ANNOTATION_MAP


roster = roster_tables(Base.metadata)


class Assignment(Base):
    """HW-01: one assignment for one class and one date."""

    __tablename__ = "assignments"
    __table_args__ = (
        Index("ix_assignments_class_day", "class_id", "day"),
        Index("ix_assignments_school_day", "school_id", "day"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    school_id: Mapped[str] = mapped_column(String(36))
    class_id: Mapped[str] = mapped_column(String(36))
    grade: Mapped[int] = mapped_column(Integer)
    day: Mapped[dt.date] = mapped_column(Date)
    subject: Mapped[str] = mapped_column(String(32))
    content: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))
    layer: Mapped[str] = mapped_column(String(16))
    location: Mapped[str] = mapped_column(String(16))
    estimated_minutes: Mapped[int] = mapped_column(Integer)
    # Minutes this assignment holds in the class/subject usage rows (HW-02):
    # the estimate for basic written homework at home, else 0.
    counted_minutes: Mapped[int] = mapped_column(Integer)
    teacher_id: Mapped[str] = mapped_column(String(36), index=True)
    target_student_ids: Mapped[list[str]] = mapped_column(JSON)
    acknowledged_warnings: Mapped[list[str]] = mapped_column(JSON)
    # HW-05: how many screening warnings the teacher acknowledged (bureau view).
    warning_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))  # published | withdrawn
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    withdrawn_at: Mapped[dt.datetime | None] = mapped_column()


class AssignmentRevision(Base):
    """HW-01: every publish, edit and withdrawal, with a snapshot."""

    __tablename__ = "assignment_revisions"
    __table_args__ = (UniqueConstraint("assignment_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    assignment_id: Mapped[str] = mapped_column(ForeignKey("assignments.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))  # published | edited | withdrawn
    actor_id: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ClassDayUsage(Base):
    """HW-02: minutes of required written homework at home, per class and day.

    Updated only with a guarded atomic UPDATE (``used + m <= limit``), so
    concurrent publishers can never push a class past its limit.
    """

    __tablename__ = "class_day_usage"
    # Covering (school, day, class, used): HW-08 reads the district's class-days
    # from the index alone.
    __table_args__ = (
        Index("ix_class_day_usage_school_day", "school_id", "day", "class_id", "used"),
    )

    class_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    school_id: Mapped[str] = mapped_column(String(36))
    used: Mapped[int] = mapped_column(Integer, default=0)


class SubjectDayUsage(Base):
    """HW-03: the same minutes per subject, against the head teacher's quota."""

    __tablename__ = "subject_day_usage"

    class_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    subject: Mapped[str] = mapped_column(String(32), primary_key=True)
    used: Mapped[int] = mapped_column(Integer, default=0)


class SubjectQuota(Base):
    """HW-03: the head teacher's daily minutes per subject for the class."""

    __tablename__ = "subject_quotas"

    class_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    subject: Mapped[str] = mapped_column(String(32), primary_key=True)
    minutes: Mapped[int] = mapped_column(Integer)
    set_by: Mapped[str] = mapped_column(String(36))
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class NoWrittenHomeworkDay(Base):
    """HW-04: a day a school declared without written homework (无书面作业日)."""

    __tablename__ = "no_written_homework_days"

    school_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    reason: Mapped[str] = mapped_column(String(200))
    declared_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class EveningStudyClass(Base):
    """HW-02 (004 §二.2): a junior class attending evening self-study (晚自习)
    on some weekdays; where the profile says so, its written homework stays at
    school on those days."""

    __tablename__ = "evening_study_classes"

    class_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    # ISO weekdays (1 = Monday) with evening self-study.
    weekdays: Mapped[list[int]] = mapped_column(JSON)
    set_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class TimeReport(Base):
    """HW-06: how long an assignment really took one student."""

    __tablename__ = "time_reports"
    __table_args__ = (
        UniqueConstraint("assignment_id", "student_id"),
        # HW-08 reads the district's reports from this index alone.
        Index("ix_time_reports_school_day", "school_id", "day", "assignment_id", "minutes"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    assignment_id: Mapped[str] = mapped_column(ForeignKey("assignments.id"), index=True)
    class_id: Mapped[str] = mapped_column(String(36), index=True)
    # The assignment's school and date, copied (kept in step when the date is edited).
    school_id: Mapped[str] = mapped_column(String(36))
    day: Mapped[dt.date] = mapped_column(Date)
    student_id: Mapped[str] = mapped_column(String(36))
    minutes: Mapped[int] = mapped_column(Integer)
    reporter_id: Mapped[str] = mapped_column(String(64))
    reporter_role: Mapped[str] = mapped_column(String(16))  # student | parent
    # Asia/Shanghai date of the first report: editable only that day.
    reported_on: Mapped[dt.date] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Refusal(Base):
    """HW-08: every refused attempt, recorded in its own transaction."""

    __tablename__ = "refusals"
    __table_args__ = (Index("ix_refusals_school_day", "school_id", "day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    action: Mapped[str] = mapped_column(String(16))  # publish | edit | quotas
    rule: Mapped[str] = mapped_column(String(8), index=True)
    region_id: Mapped[str | None] = mapped_column(String(64))
    school_id: Mapped[str] = mapped_column(String(36))
    class_id: Mapped[str] = mapped_column(String(36))
    grade: Mapped[int] = mapped_column(Integer)
    day: Mapped[dt.date] = mapped_column(Date)
    teacher_id: Mapped[str | None] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(32))
    minutes: Mapped[int | None] = mapped_column(Integer)
    limit_minutes: Mapped[int | None] = mapped_column(Integer)
    used_minutes: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text)


class BurdenState(Base):
    """HW-06: per class, the open alert if any (locked while it is evaluated)."""

    __tablename__ = "burden_states"

    class_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    open_alert_id: Mapped[str | None] = mapped_column(String(36))
    evaluated_at: Mapped[dt.datetime | None] = mapped_column()
    # The local date whose window was last evaluated (the daily re-check skips
    # classes already evaluated for that date).
    evaluated_for: Mapped[dt.date | None] = mapped_column(Date)


class BurdenAlert(Base):
    """HW-06: one alert from opening to closing."""

    __tablename__ = "burden_alerts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    class_id: Mapped[str] = mapped_column(String(36), index=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    region_id: Mapped[str] = mapped_column(String(64), index=True)
    grade: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(8))  # open | closed
    limit_minutes: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    open_median_minutes: Mapped[float] = mapped_column(Float)
    open_window_start: Mapped[dt.date] = mapped_column(Date)
    open_window_end: Mapped[dt.date] = mapped_column(Date)
    closed_at: Mapped[dt.datetime | None] = mapped_column()
    close_median_minutes: Mapped[float | None] = mapped_column(Float)
    close_window_start: Mapped[dt.date | None] = mapped_column(Date)
    close_window_end: Mapped[dt.date | None] = mapped_column(Date)
