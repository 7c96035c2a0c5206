"""afterschool's tables, including its read copy of identity's roster."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Time,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from chassis.db import TYPE_ANNOTATION_MAP, new_metadata, utcnow
from chassis.roster import roster_tables


class Base(DeclarativeBase):
    metadata = new_metadata()
    type_annotation_map = TYPE_ANNOTATION_MAP


roster = roster_tables(Base.metadata)

#: Enrollment statuses that occupy (or claim) the student's slot.
ACTIVE_STATUSES = ("applied", "held", "waitlisted")


class Plan(Base):
    """AS-01 一校一案: one plan per school and term, with its enrollment window."""

    __tablename__ = "plans"
    __table_args__ = (UniqueConstraint("school_id", "term"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    region_id: Mapped[str] = mapped_column(String(64), index=True)
    term: Mapped[str] = mapped_column(String(100))
    stage: Mapped[str] = mapped_column(String(16))  # primary | junior
    # [{"kind": "regular|evening_study|delayed_care", "start": "HH:MM", "end": "HH:MM"}]
    sessions: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    service_days: Mapped[list[str]] = mapped_column(JSON)  # ISO dates
    service_weekdays: Mapped[list[int]] = mapped_column(JSON)
    delayed_care_student_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    # 调休上班日: ISO date of each weekend make-up working day -> the weekday
    # (1-7) whose timetable it runs (AS-01: a make-up day is a service day).
    make_up_weekdays: Mapped[dict[str, int]] = mapped_column(
        JSON, default=dict, server_default="{}"
    )
    fee_standard_fen: Mapped[int] = mapped_column(Integer)
    fee_unit: Mapped[str] = mapped_column(String(16))  # month | session
    window_opens_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    window_closes_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    window_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    lottery_seed_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lottery_seed: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lottery_drawn_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class CatalogInstitution(Base):
    """AS-03 校外机构目录库: kept current from institutions' licence events."""

    __tablename__ = "catalog_institutions"
    institution_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    region_id: Mapped[str] = mapped_column(String(64), index=True)
    category: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    blacklisted: Mapped[bool] = mapped_column(Boolean)
    can_enroll: Mapped[bool] = mapped_column(Boolean)
    # The licence's last valid day: expiry is a date no event announces.
    licence_valid_until: Mapped[dt.date | None] = mapped_column(Date)
    reason: Mapped[str] = mapped_column(Text, default="")
    occurred_at: Mapped[dt.datetime] = mapped_column()
    synced_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Course(Base):
    """AS-02 菜单式课程; seats_taken always equals the held enrollments."""

    __tablename__ = "courses"
    __table_args__ = (
        # The database is the seat authority, whatever runs in front of it.
        CheckConstraint("seats_taken >= 0 AND seats_taken <= capacity", name="seats_within"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"), index=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    weekdays: Mapped[list[int]] = mapped_column(JSON)
    start: Mapped[dt.time] = mapped_column(Time)
    end: Mapped[dt.time] = mapped_column(Time)
    capacity: Mapped[int] = mapped_column(Integer)
    seats_taken: Mapped[int] = mapped_column(Integer, default=0)
    waitlist_seq: Mapped[int] = mapped_column(Integer, default=0)
    provider_type: Mapped[str] = mapped_column(String(32))
    provider_name: Mapped[str] = mapped_column(String(200))
    institution_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    teacher_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    fee_fen: Mapped[int] = mapped_column(Integer)
    fee_unit: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | flagged
    flag_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Enrollment(Base):
    """AS-04: one row per (course, student) attempt; status tells where it stands."""

    __tablename__ = "enrollments"
    __table_args__ = (
        # A student holds at most one live enrollment per course (no duplicates).
        Index(
            "uq_enrollments_live",
            "course_id",
            "student_id",
            unique=True,
            sqlite_where=text("status IN ('applied', 'held', 'waitlisted')"),
            postgresql_where=text("status IN ('applied', 'held', 'waitlisted')"),
        ),
        Index("ix_enrollments_course_status", "course_id", "status", "waitlist_position"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    course_id: Mapped[str] = mapped_column(ForeignKey("courses.id"))
    plan_id: Mapped[str] = mapped_column(String(36), index=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    student_id: Mapped[str] = mapped_column(String(36), index=True)
    guardian_id: Mapped[str] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16))
    waitlist_position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    consent_at: Mapped[dt.datetime] = mapped_column()
    consent_statement: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    held_from: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    withdrawn_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class LotteryDraw(Base):
    """AS-04: the auditable record of a draw (seed and resulting order)."""

    __tablename__ = "lottery_draws"
    course_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(36), index=True)
    seed: Mapped[str] = mapped_column(String(128))
    applicants: Mapped[list[str]] = mapped_column(JSON)  # sorted student ids (input)
    order: Mapped[list[str]] = mapped_column(JSON)  # drawn order (output)
    drawn_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Attendance(Base):
    """AS-06 在线点名: one mark per course, day and student."""

    __tablename__ = "attendance"
    __table_args__ = (UniqueConstraint("course_id", "day", "student_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    course_id: Mapped[str] = mapped_column(ForeignKey("courses.id"), index=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    day: Mapped[dt.date] = mapped_column(Date)
    student_id: Mapped[str] = mapped_column(String(36), index=True)
    status: Mapped[str] = mapped_column(String(16))
    recorded_by: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class LeaveConsent(Base):
    """AS-06: a guardian's standing consent that the child may leave alone."""

    __tablename__ = "leave_consents"
    student_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    guardian_id: Mapped[str] = mapped_column(String(36))
    given_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class ExitRecord(Base):
    """AS-06 进出校园管理: how and when a student left."""

    __tablename__ = "exit_records"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    student_id: Mapped[str] = mapped_column(String(36), index=True)
    day: Mapped[dt.date] = mapped_column(Date)
    left_at: Mapped[dt.datetime] = mapped_column()
    mode: Mapped[str] = mapped_column(String(32))
    guardian_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    recorded_by: Mapped[str] = mapped_column(String(64))


class Waiver(Base):
    """AS-05 减免: students from families in difficulty, marked by the school."""

    __tablename__ = "waivers"
    school_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    student_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    share_percent: Mapped[int] = mapped_column(Integer)  # 100 = fully waived
    marked_by: Mapped[str] = mapped_column(String(64))
    marked_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class FeeStatement(Base):
    """AS-05: a month's fee for one enrollment, on days actually served."""

    __tablename__ = "fee_statements"
    __table_args__ = (UniqueConstraint("enrollment_id", "month"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    enrollment_id: Mapped[str] = mapped_column(ForeignKey("enrollments.id"))
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    course_id: Mapped[str] = mapped_column(String(36))
    student_id: Mapped[str] = mapped_column(String(36), index=True)
    month: Mapped[str] = mapped_column(String(7))
    planned_sessions: Mapped[int] = mapped_column(Integer)
    served_sessions: Mapped[int] = mapped_column(Integer)
    gross_fen: Mapped[int] = mapped_column(Integer)
    waiver_fen: Mapped[int] = mapped_column(Integer)
    amount_fen: Mapped[int] = mapped_column(Integer)
    paid_fen: Mapped[int] = mapped_column(Integer, default=0)
    # Paid back on withdrawal (per day not served); see Refund.
    refunded_fen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # False: billed in advance on planned sessions; True: settled on days served.
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Payment(Base):
    """AS-05 收支两条线: every payment names the school's non-tax account reference."""

    __tablename__ = "payments"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    statement_id: Mapped[str] = mapped_column(ForeignKey("fee_statements.id"), index=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    amount_fen: Mapped[int] = mapped_column(Integer)
    non_tax_account_ref: Mapped[str] = mapped_column(String(100))
    recorded_by: Mapped[str] = mapped_column(String(64))
    paid_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Refund(Base):
    """AS-05: money paid back per day not served when a seat ends (withdrawal or
    the student leaving the school), from the school's non-tax account."""

    __tablename__ = "refunds"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    enrollment_id: Mapped[str] = mapped_column(ForeignKey("enrollments.id"), index=True)
    statement_id: Mapped[str] = mapped_column(ForeignKey("fee_statements.id"), index=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    course_id: Mapped[str] = mapped_column(String(36))
    student_id: Mapped[str] = mapped_column(String(36), index=True)
    month: Mapped[str] = mapped_column(String(7))
    days: Mapped[int] = mapped_column(Integer)  # sessions paid for and not served
    amount_fen: Mapped[int] = mapped_column(Integer)
    non_tax_account_ref: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(String(16))  # withdrawn | left_school
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Rating(Base):
    """AS-07: a guardian's rating of a course, once per course, student and month."""

    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("course_id", "student_id", "month"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    course_id: Mapped[str] = mapped_column(ForeignKey("courses.id"), index=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    student_id: Mapped[str] = mapped_column(String(36))
    guardian_id: Mapped[str] = mapped_column(String(36))
    month: Mapped[str] = mapped_column(String(7))
    score: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Survey(Base):
    """AS-07: term satisfaction survey, one answer per student and plan."""

    __tablename__ = "surveys"
    __table_args__ = (UniqueConstraint("plan_id", "student_id"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"), index=True)
    school_id: Mapped[str] = mapped_column(String(36), index=True)
    student_id: Mapped[str] = mapped_column(String(36))
    guardian_id: Mapped[str] = mapped_column(String(36))
    score: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
