"""Shared set-up for afterschool tests: roster rows, plans, courses, windows."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

from chassis.db import Database, utcnow
from chassis.roster import upsert
from services.afterschool.models import roster
from tests.support import auth

TERM = "2026-2027学年第一学期"  # jinhua: 2026-09-01 .. 2027-01-29
PRIMARY_SESSIONS = [
    {"kind": "regular", "start": "15:30", "end": "17:30"},
    {"kind": "delayed_care", "start": "17:30", "end": "18:30"},
]


def uid() -> str:
    return str(uuid.uuid4())


@dataclass
class School:
    id: str
    region_id: str
    class_id: str
    teacher_id: str
    students: list[str] = field(default_factory=list)
    guardians: list[str] = field(default_factory=list)  # guardians[i] is students[i]'s


async def seed_school(
    db: Database,
    *,
    region_id: str = "jinhua",
    stage: str = "primary",
    students: int = 3,
    grade: int = 3,
) -> School:
    """Roster rows written directly into afterschool's read copy (fast path)."""
    school = School(id=uid(), region_id=region_id, class_id=uid(), teacher_id=uid())
    now = utcnow()
    async with db.transaction() as session:
        await upsert(
            session,
            roster.regions,
            {"id": region_id, "name": region_id, "profile_id": region_id, "synced_at": now},
        )
        await upsert(
            session,
            roster.schools,
            {
                "id": school.id,
                "region_id": region_id,
                "name": "实验小学",
                "school_system": "6-3",
                "stage": stage,
                "synced_at": now,
            },
        )
        await upsert(
            session,
            roster.classes,
            {
                "id": school.class_id,
                "school_id": school.id,
                "grade": grade,
                "name": f"{grade}(1)班",
                "head_teacher_id": school.teacher_id,
                "subject_teachers": [],
                "synced_at": now,
            },
        )
        await upsert(
            session,
            roster.teachers,
            {
                "id": school.teacher_id,
                "school_id": school.id,
                "name": "李老师",
                "id_number_hash": uid().replace("-", ""),
                "in_service": True,
                "subjects": ["数学"],
                "synced_at": now,
            },
        )
        student_rows = []
        guardian_rows = []
        for i in range(students):
            sid, gid = uid(), uid()
            school.students.append(sid)
            school.guardians.append(gid)
            student_rows.append(
                {
                    "id": sid,
                    "school_id": school.id,
                    "class_id": school.class_id,
                    "grade": grade,
                    "name": f"张小{i}",
                    "active": True,
                    "synced_at": now,
                }
            )
            guardian_rows.append(
                {"guardian_id": gid, "student_id": sid, "relation": "mother", "synced_at": now}
            )
        if student_rows:
            await session.execute(roster.students.insert(), student_rows)
            await session.execute(roster.guardianships.insert(), guardian_rows)
    return school


def admin_token(mint: Any, school: School) -> str:
    return mint("school_admin", tenants=[f"school:{school.id}", f"region:{school.region_id}"])


def parent_token(mint: Any, school: School, i: int) -> str:
    return mint("parent", person_id=school.guardians[i])


async def make_plan(client: Any, token: str, school: School, **overrides: Any) -> dict[str, Any]:
    body = {
        "term": TERM,
        "sessions": PRIMARY_SESSIONS,
        "fee_standard_fen": 20000,
        "fee_unit": "month",
        **overrides,
    }
    r = await client.post(f"/schools/{school.id}/plans", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    return r.json()


def course_body(school: School, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "篮球",
        "kind": "sport",
        "weekdays": [1, 2, 3, 4, 5],
        "start": "15:30",
        "end": "16:30",
        "capacity": 30,
        "provider_type": "own_teacher",
        "provider_name": "李老师",
        "teacher_id": school.teacher_id,
        "fee_fen": 15000,
        "fee_unit": "month",
        **overrides,
    }


async def add_course(client: Any, token: str, plan_id: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(f"/plans/{plan_id}/courses", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    return r.json()


async def open_window(
    client: Any, token: str, plan_id: str, mode: str = "first_come", **extra: Any
) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    body = {
        "opens_at": (now - dt.timedelta(minutes=1)).isoformat(),
        "closes_at": (now + dt.timedelta(hours=1)).isoformat(),
        "mode": mode,
        **extra,
    }
    r = await client.put(f"/plans/{plan_id}/window", json=body, headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()


async def enroll(
    client: Any,
    token: str,
    student_id: str,
    course_id: str,
    *,
    key: str | None = None,
    consent: bool = True,
    waitlist: bool = True,
) -> Any:
    headers = {**auth(token), "Idempotency-Key": key or uid()}
    return await client.post(
        "/enrollments" + ("" if waitlist else "?waitlist=false"),
        json={"student_id": student_id, "course_id": course_id, "consent": consent},
        headers=headers,
    )
