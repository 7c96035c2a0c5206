"""identity's tables: the roster, accounts, clients and tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from chassis.db import TYPE_ANNOTATION_MAP, new_metadata, utcnow


class Base(DeclarativeBase):
    metadata = new_metadata()
    type_annotation_map = TYPE_ANNOTATION_MAP


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Region(Timestamps, Base):
    __tablename__ = "regions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    profile_id: Mapped[str] = mapped_column(String(64))


class School(Timestamps, Base):
    __tablename__ = "schools"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    region_id: Mapped[str] = mapped_column(ForeignKey("regions.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    school_system: Mapped[str] = mapped_column(String(3))
    stage: Mapped[str] = mapped_column(String(16))


class SchoolClass(Timestamps, Base):
    __tablename__ = "classes"
    __table_args__ = (UniqueConstraint("school_id", "grade", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    school_id: Mapped[str] = mapped_column(ForeignKey("schools.id"), index=True)
    grade: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    head_teacher_id: Mapped[str | None] = mapped_column(ForeignKey("teachers.id"))
    # [{"teacher_id": ..., "subject": ...}]
    subject_teachers: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)


class Teacher(Timestamps, Base):
    __tablename__ = "teachers"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    school_id: Mapped[str] = mapped_column(ForeignKey("schools.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    id_number_hash: Mapped[str] = mapped_column(String(64), unique=True)
    id_number_masked: Mapped[str] = mapped_column(String(18))
    phone: Mapped[str | None] = mapped_column(String(20))
    subjects: Mapped[list[str]] = mapped_column(JSON, default=list)
    in_service: Mapped[bool] = mapped_column(Boolean, default=True)


class Student(Timestamps, Base):
    __tablename__ = "students"
    __table_args__ = (UniqueConstraint("school_id", "student_no"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    school_id: Mapped[str] = mapped_column(ForeignKey("schools.id"), index=True)
    class_id: Mapped[str] = mapped_column(ForeignKey("classes.id"), index=True)
    student_no: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(100))
    id_number_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    id_number_masked: Mapped[str | None] = mapped_column(String(18))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Guardian(Timestamps, Base):
    __tablename__ = "guardians"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    phone: Mapped[str] = mapped_column(String(20), unique=True)
    user_id: Mapped[str | None] = mapped_column(String(36))


class Guardianship(Base):
    __tablename__ = "guardianships"
    guardian_id: Mapped[str] = mapped_column(ForeignKey("guardians.id"), primary_key=True)
    student_id: Mapped[str] = mapped_column(ForeignKey("students.id"), primary_key=True)
    relation: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(Timestamps, Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    display_name: Mapped[str] = mapped_column(String(100))
    roles: Mapped[list[str]] = mapped_column(JSON)
    tenants: Mapped[list[str]] = mapped_column(JSON)
    person_id: Mapped[str | None] = mapped_column(String(36))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class OAuthClient(Timestamps, Base):
    __tablename__ = "oauth_clients"
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[str] = mapped_column(String(200))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    tenants: Mapped[list[str]] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class RefreshToken(Base):
    __tablename__ = "refresh_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    expires_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AccessAudit(Base):
    """X-06: every read of a child's record by staff."""

    __tablename__ = "access_audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    actor_id: Mapped[str] = mapped_column(String(64), index=True)
    actor_roles: Mapped[list[str]] = mapped_column(JSON)
    action: Mapped[str] = mapped_column(String(64))
    student_id: Mapped[str] = mapped_column(String(36), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    request_id: Mapped[str | None] = mapped_column(String(128))


class HolidayArrangementRecord(Base):
    __tablename__ = "holiday_arrangements"
    year: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    note: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
