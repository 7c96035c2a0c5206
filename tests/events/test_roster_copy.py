"""Domain services keep their read copy of identity's roster from events (X-01, X-02)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from services.identity import schemas, service
from tests.support import auth, eventually

pytestmark = pytest.mark.asyncio
DOMAIN = ("homework", "afterschool", "institutions", "funds")


async def _row(svc, table_name: str, **where):
    from importlib import import_module

    roster = import_module(f"services.{svc.name}.models").roster
    table = getattr(roster, table_name)
    query = select(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    async with svc.ctx.db.read() as session:
        return (await session.execute(query)).mappings().first()


async def test_x02_roster_changes_reach_every_domain_service_read_copy(start_service):
    identity = await start_service("identity")
    domain = [await start_service(name) for name in DOMAIN]
    db = identity.ctx.db
    await service.upsert_region(
        db, schemas.RegionIn(id="weihai-huancui", name="环翠区", profile_id="weihai-huancui")
    )
    school = await service.create_school(
        db,
        schemas.SchoolIn(
            region_id="weihai-huancui", name="环翠实验中学", school_system="5-4", stage="junior"
        ),
    )
    klass = await service.create_class(db, school.id, schemas.ClassIn(grade=6, name="六(1)班"))
    student = await service.create_student(
        db,
        school.id,
        schemas.StudentIn(class_id=klass.id, student_no="H001", name="刘小华"),
        "pepper",
    )
    guardian = await service.link_guardian(
        db,
        school.id,
        schemas.GuardianIn(
            name="刘强", phone="13700000000", student_id=student.id, relation="father"
        ),
    )

    for svc in domain:
        copy = await eventually(lambda svc=svc: _row(svc, "guardianships", guardian_id=guardian.id))
        assert copy["student_id"] == student.id
        school_copy = await _row(svc, "schools", id=school.id)
        assert school_copy["school_system"] == "5-4"
        class_copy = await _row(svc, "classes", id=klass.id)
        assert class_copy["grade"] == 6
        student_copy = await _row(svc, "students", id=student.id)
        assert student_copy["class_id"] == klass.id

    await service.unlink_guardian(db, school.id, guardian.id, student.id)
    for svc in domain:

        async def gone(svc=svc):
            return await _row(svc, "guardianships", guardian_id=guardian.id) is None

        await eventually(gone)


async def test_x02_consumers_tolerate_replayed_roster_events(start_service):
    """A replay of the whole stream (e.g. a consumer reset) converges to the same copy."""
    identity = await start_service("identity")
    homework = await start_service("homework")
    db = identity.ctx.db
    await service.upsert_region(
        db, schemas.RegionIn(id="jinhua", name="金华市", profile_id="jinhua")
    )
    school = await service.create_school(
        db,
        schemas.SchoolIn(region_id="jinhua", name="站前小学", school_system="6-3", stage="primary"),
    )
    klass = await service.create_class(db, school.id, schemas.ClassIn(grade=2, name="二(1)班"))
    await eventually(lambda: _row(homework, "classes", id=klass.id))

    consumer = homework.ctx.consumers[0]
    js = homework.ctx.bus.js
    psub = await js.pull_subscribe("identity.>", durable="replay-check", stream="IDENTITY")
    msgs = await psub.fetch(10, timeout=5)
    assert len(msgs) == 3  # region, school, class
    for msg in msgs:
        await consumer.handle(msg)  # already handled: inbox says so, nothing changes
    from chassis.messaging import inbox_table

    async with homework.ctx.db.read() as session:
        rows = (await session.execute(select(inbox_table))).all()
    assert len(rows) == 3
    assert (await _row(homework, "classes", id=klass.id))["grade"] == 2


async def test_x05_operator_loaded_holidays_reach_domain_calendars(start_service, mint):
    """A bureau operator loads a year's 调休 arrangement; services' calendars use it."""
    import datetime as dt

    from chassis.roster import load_calendar
    from services.homework.models import roster

    identity = await start_service("identity")
    homework = await start_service("homework")
    bureau = mint("bureau", tenants=["region:jinhua"])
    arrangement = {
        "year": 2031,
        "source": "测试安排",
        "holidays": [
            {"date": "2031-10-01", "name": "国庆节"},
            {"date": "2031-10-02", "name": "国庆节"},
        ],
        "workday_swaps": ["2031-09-28"],
    }
    r = await identity.client.put("/calendar/holidays/2031", headers=auth(bureau), json=arrangement)
    assert r.status_code == 200, r.text
    bad = await identity.client.put(
        "/calendar/holidays/2031",
        headers=auth(bureau),
        json={**arrangement, "workday_swaps": ["2031-09-30"]},
    )  # a Tuesday cannot be a swap
    assert bad.status_code == 422 and bad.json()["errors"]
    teacher = mint("teacher", tenants=["school:x"])
    assert (
        await identity.client.put(
            "/calendar/holidays/2031", headers=auth(teacher), json=arrangement
        )
    ).status_code == 403

    async def loaded():
        async with homework.ctx.db.read() as session:
            calendar = await load_calendar(session, roster)
        return calendar if calendar.has_holiday_data(2031) else None

    calendar = await eventually(loaded)
    assert calendar.is_statutory_holiday(dt.date(2031, 10, 2))
    assert calendar.is_working_day(dt.date(2031, 9, 28))  # a Sunday made a working day
    assert not calendar.is_working_day(dt.date(2031, 10, 1))
