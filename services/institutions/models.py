"""institutions's tables, including its read copy of identity's roster."""

from __future__ import annotations

from datetime import date, datetime
from datetime import time as dtime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Time,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from chassis.db import TYPE_ANNOTATION_MAP, new_metadata, utcnow
from chassis.roster import roster_tables


class Base(DeclarativeBase):
    metadata = new_metadata()
    type_annotation_map = TYPE_ANNOTATION_MAP


roster = roster_tables(Base.metadata)


class Institution(Base):
    """INST-01: a registered institution and its licence (INST-03)."""

    __tablename__ = "institutions"
    __table_args__ = (
        # The public white list: status filter, keyset on id (INST-04).
        Index("ix_institutions_public", "status", "blacklisted", "id"),
        Index("ix_institutions_region_category", "region_id", "category"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    credit_code: Mapped[str] = mapped_column(String(18), unique=True)
    region_id: Mapped[str] = mapped_column(String(64))
    #: The region's policy profile (from the roster copy, else the region id).
    profile_id: Mapped[str] = mapped_column(String(64))
    district: Mapped[str | None] = mapped_column(String(100))
    category: Mapped[str] = mapped_column(String(16))
    department: Mapped[str] = mapped_column(String(16))
    legal_representative: Mapped[str] = mapped_column(String(100))
    contact_phone: Mapped[str | None] = mapped_column(String(20))
    registered_address: Mapped[str] = mapped_column(String(300))
    training_addresses: Mapped[list[str]] = mapped_column(JSON)
    target_groups: Mapped[list[str]] = mapped_column(JSON)
    profit_status: Mapped[str] = mapped_column(String(16))
    modes: Mapped[list[str]] = mapped_column(JSON)
    existing_permit_number: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    licence_number: Mapped[str | None] = mapped_column(String(40), unique=True)
    licence_valid_from: Mapped[date | None] = mapped_column(Date)
    licence_valid_until: Mapped[date | None] = mapped_column(Date)
    reregistration_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    blacklisted: Mapped[bool] = mapped_column(Boolean, default=False)
    can_enroll: Mapped[bool] = mapped_column(Boolean, default=False)
    can_charge: Mapped[bool] = mapped_column(Boolean, default=False)
    credit_score: Mapped[int] = mapped_column(Integer, default=100)
    created_by: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class LicenceTransition(Base):
    """INST-03: every transition with actor, reason and time."""

    __tablename__ = "licence_transitions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    action: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(80))
    actor_roles: Mapped[list[str]] = mapped_column(JSON)
    event_type: Mapped[str | None] = mapped_column(String(120))
    at: Mapped[datetime] = mapped_column(default=utcnow)


class BlacklistEntry(Base):
    """INST-04/INST-08: black-list entries (an institution has at most one open)."""

    __tablename__ = "blacklist_entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(32))  # revocation | penalty | regulator
    listed_on: Mapped[date] = mapped_column(Date)
    listed_by: Mapped[str] = mapped_column(String(80))
    delisted_on: Mapped[date | None] = mapped_column(Date)
    delist_reason: Mapped[str | None] = mapped_column(Text)
    delisted_by: Mapped[str | None] = mapped_column(String(80))


class Trainer(Base):
    """INST-05: real-name registry; identity numbers only hashed and masked (X-06)."""

    __tablename__ = "trainers"
    __table_args__ = (UniqueConstraint("institution_id", "id_number_hash"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    id_type: Mapped[str] = mapped_column(String(24))
    id_number_hash: Mapped[str] = mapped_column(String(64), index=True)
    id_number_masked: Mapped[str] = mapped_column(String(40))
    nationality: Mapped[str] = mapped_column(String(2))
    located_abroad: Mapped[bool] = mapped_column(Boolean, default=False)
    teacher_certificate_number: Mapped[str | None] = mapped_column(String(40))
    subjects: Mapped[list[str]] = mapped_column(JSON)
    consent_at: Mapped[datetime] = mapped_column()
    background_check: Mapped[str] = mapped_column(String(16))
    background_checked_on: Mapped[date] = mapped_column(Date)
    background_check_authority: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(24))  # active | pending_check | flagged | left
    flag_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Course(Base):
    """INST-06: a filed course with its schedule."""

    __tablename__ = "courses"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(String(40))
    subject_category: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(8))
    target_grades: Mapped[list[int]] = mapped_column(JSON)
    min_age_years: Mapped[int | None] = mapped_column(Integer)
    lesson_minutes: Mapped[int] = mapped_column(Integer)
    price_per_lesson_fen: Mapped[int] = mapped_column(Integer)
    lesson_count: Mapped[int] = mapped_column(Integer)
    max_class_size: Mapped[int] = mapped_column(Integer)
    class_size_band: Mapped[str] = mapped_column(String(8))
    price_group: Mapped[str | None] = mapped_column(String(40))
    period_start: Mapped[date] = mapped_column(Date)
    period_end: Mapped[date] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16), default="filed")
    filed_by: Mapped[str] = mapped_column(String(80))
    filed_at: Mapped[datetime] = mapped_column(default=utcnow)


class CourseLesson(Base):
    __tablename__ = "course_lessons"
    course_id: Mapped[str] = mapped_column(ForeignKey("courses.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[date] = mapped_column(Date)
    start: Mapped[dtime] = mapped_column(Time)
    end: Mapped[dtime] = mapped_column(Time)


class Complaint(Base):
    """INST-07: a report (anonymous allowed) and its workflow."""

    __tablename__ = "complaints"
    __table_args__ = (
        Index("ix_complaints_scope", "region_id", "department", "status"),
        # INST-07 rate limit: recent reports from one (hashed) client address.
        Index("ix_complaints_source", "source_hash", "received_at"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: Keyed hash of the submitting client's address (never the address itself).
    source_hash: Mapped[str | None] = mapped_column(String(64))
    tracking_code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    institution_id: Mapped[str | None] = mapped_column(ForeignKey("institutions.id"), index=True)
    institution_name: Mapped[str] = mapped_column(String(200))
    region_id: Mapped[str] = mapped_column(String(64))
    department: Mapped[str] = mapped_column(String(16))
    category: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text)
    anonymous: Mapped[bool] = mapped_column(Boolean)
    contact_name: Mapped[str | None] = mapped_column(String(100))
    contact_phone: Mapped[str | None] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column()
    received_on: Mapped[date] = mapped_column(Date)
    deadline: Mapped[date] = mapped_column(Date, index=True)
    assignee: Mapped[str | None] = mapped_column(String(80))
    outcome: Mapped[str | None] = mapped_column(Text)
    substantiated: Mapped[bool | None] = mapped_column(Boolean)
    closed_at: Mapped[datetime | None] = mapped_column()


class ComplaintStep(Base):
    __tablename__ = "complaint_steps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    complaint_id: Mapped[str] = mapped_column(ForeignKey("complaints.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(80))
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Inspection(Base):
    """INST-08: an inspection and its result."""

    __tablename__ = "inspections"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    inspected_on: Mapped[date] = mapped_column(Date)
    result: Mapped[str] = mapped_column(String(24))
    findings: Mapped[str] = mapped_column(Text)
    inspector: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Penalty(Base):
    """INST-08: a penalty decision."""

    __tablename__ = "penalties"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(24))
    severity: Mapped[str] = mapped_column(String(8))
    fine_fen: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    decided_on: Mapped[date] = mapped_column(Date)
    inspection_id: Mapped[str | None] = mapped_column(ForeignKey("inspections.id"))
    complaint_id: Mapped[str | None] = mapped_column(ForeignKey("complaints.id"))
    decided_by: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CreditRecord(Base):
    """INST-04: one line of the credit record; (source, source_ref) is the
    natural key, so a redelivered or replayed fact is counted once."""

    __tablename__ = "credit_records"
    __table_args__ = (UniqueConstraint("source", "source_ref"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), index=True)
    source: Mapped[str] = mapped_column(String(40))
    source_ref: Mapped[str] = mapped_column(String(120))
    delta: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
