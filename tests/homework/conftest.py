"""Fixtures of the homework tests: a running homework service with a small
roster written straight into its read copy (`chassis.roster.upsert`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from chassis.db import utcnow
from chassis.roster import upsert
from services.homework import service as hw_service
from services.homework.models import roster
from tests.support import auth, eventually

#: A Tuesday in a year no holiday package covers (computed fallback calendar).
SCHOOL_DAY = dt.date(2150, 3, 10)


@dataclass
class Roster:
    """Writes roster rows into a service's read copy, as identity's events would."""

    ctx: Any

    async def _put(self, table: Any, values: dict[str, Any]) -> None:
        async with self.ctx.db.transaction() as session:
            await upsert(session, table, {**values, "synced_at": utcnow()})

    async def region(self, region_id: str, profile_id: str | None = None) -> None:
        await self._put(
            roster.regions,
            {"id": region_id, "name": region_id, "profile_id": profile_id or region_id},
        )

    async def school(
        self, school_id: str, region_id: str, system: str = "6-3", stage: str = "nine_year"
    ) -> None:
        await self._put(
            roster.schools,
            {
                "id": school_id,
                "region_id": region_id,
                "name": f"{school_id}学校",
                "school_system": system,
                "stage": stage,
            },
        )

    async def teacher(self, teacher_id: str, school_id: str) -> None:
        await self._put(
            roster.teachers,
            {
                "id": teacher_id,
                "school_id": school_id,
                "name": f"{teacher_id}老师",
                "id_number_hash": f"hash-{teacher_id}",
                "in_service": True,
                "subjects": [],
            },
        )

    async def klass(
        self,
        class_id: str,
        school_id: str,
        grade: int,
        head_teacher_id: str | None,
        subject_teachers: list[tuple[str, str]],
    ) -> None:
        await self._put(
            roster.classes,
            {
                "id": class_id,
                "school_id": school_id,
                "grade": grade,
                "name": f"{grade}年级{class_id}班",
                "head_teacher_id": head_teacher_id,
                "subject_teachers": [{"teacher_id": t, "subject": s} for t, s in subject_teachers],
            },
        )

    async def student(self, student_id: str, class_id: str, school_id: str, grade: int) -> None:
        await self._put(
            roster.students,
            {
                "id": student_id,
                "school_id": school_id,
                "class_id": class_id,
                "grade": grade,
                "name": f"学生{student_id}",
                "active": True,
            },
        )

    async def guardian(self, guardian_id: str, student_id: str) -> None:
        await self._put(
            roster.guardianships,
            {"guardian_id": guardian_id, "student_id": student_id, "relation": "mother"},
        )


@dataclass
class World:
    """One region, one school (6-3, jinhua), a grade-4 class C1 with a head
    teacher (HT, chinese) and subject teachers (TM math, TE english), two
    students with guardians, and a grade-4 class C2 taught by TX."""

    svc: Any
    client: httpx.AsyncClient
    roster: Roster
    mint: Callable[..., str]
    region: str = "jinhua"
    school: str = "S1"
    tokens: dict[str, str] = field(default_factory=dict)

    def teacher(self, teacher_id: str, *, head: bool = False, school: str | None = None) -> dict:
        roles = ("head_teacher", "teacher") if head else ("teacher",)
        token = self.mint(*roles, tenants=[f"school:{school or self.school}"], person_id=teacher_id)
        return auth(token)

    def parent(self, guardian_id: str) -> dict:
        return auth(self.mint("parent", person_id=guardian_id))

    def student(self, student_id: str) -> dict:
        return auth(self.mint("student", person_id=student_id))

    def school_admin(self, school: str | None = None) -> dict:
        return auth(self.mint("school_admin", tenants=[f"school:{school or self.school}"]))

    def bureau(self, region: str | None = None) -> dict:
        return auth(self.mint("bureau", tenants=[f"region:{region or self.region}"]))

    async def publish(
        self, class_id: str, headers: dict, *, expect: int | None = 201, **fields: Any
    ) -> httpx.Response:
        body = {
            "date": SCHOOL_DAY.isoformat(),
            "subject": "math",
            "content": "练习册第12页",
            "kind": "written",
            "layer": "basic",
            "location": "at_home",
            "estimated_minutes": 20,
        }
        body.update(fields)
        for key, value in list(body.items()):
            if isinstance(value, dt.date):
                body[key] = value.isoformat()
        response = await self.client.post(
            f"/classes/{class_id}/assignments", json=body, headers=headers
        )
        if expect is not None:
            assert response.status_code == expect, response.text
        return response


async def build_world(svc: Any, mint: Callable[..., str]) -> World:
    r = Roster(svc.ctx)
    world = World(svc=svc, client=svc.client, roster=r, mint=mint)
    await r.region("jinhua")
    await r.school("S1", "jinhua", "6-3", "primary")
    for t in ("HT", "TM", "TE", "TX"):
        await r.teacher(t, "S1")
    await r.klass("C1", "S1", 4, "HT", [("HT", "chinese"), ("TM", "math"), ("TE", "english")])
    await r.klass("C2", "S1", 4, "TX", [("TX", "math")])
    await r.student("P1", "C1", "S1", 4)
    await r.student("P2", "C1", "S1", 4)
    await r.student("Q1", "C2", "S1", 4)
    await r.guardian("G1", "P1")
    await r.guardian("G2", "P2")
    await r.guardian("GQ", "Q1")
    return world


async def startup_jobs_done(svc: Any) -> None:
    """Wait for the start-up run of the periodic jobs (HW-06 burden re-check),
    so it cannot interleave with a test's writes and dates."""
    runners = list(svc.ctx.jobs.values())

    async def done() -> bool:
        return all(r.runs + r.failures >= 1 for r in runners)

    await eventually(done)


@pytest.fixture
async def world(start_service, mint) -> World:
    svc = await start_service("homework")
    await startup_jobs_done(svc)
    return await build_world(svc, mint)


@pytest.fixture
def fixed_today(monkeypatch: pytest.MonkeyPatch) -> Callable[[dt.date], None]:
    """Set the service's local date (Asia/Shanghai) for a test."""

    def set_today(day: dt.date) -> None:
        monkeypatch.setattr(hw_service, "local_today", lambda: day)

    return set_today
