"""The read copy of identity's roster that domain services keep (X-01).

Each service calls `roster_tables(Base.metadata)` so the tables live in its
own database and migrations, and subscribes `roster_subscription(tables)`.
Handlers are upserts keyed by id, so replays and redeliveries converge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    delete,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.calendar import Calendar, HolidayArrangement, SchoolTerms
from chassis.db import UTCDateTime, utcnow
from chassis.messaging import Subscription
from contracts import identity as ev
from contracts.base import Envelope


@dataclass(frozen=True)
class RosterTables:
    regions: Table
    schools: Table
    classes: Table
    teachers: Table
    students: Table
    guardianships: Table
    holidays: Table


def roster_tables(metadata: MetaData) -> RosterTables:
    def stamp() -> Column[Any]:
        return Column("synced_at", UTCDateTime(), nullable=False)

    return RosterTables(
        regions=Table(
            "roster_regions",
            metadata,
            Column("id", String(64), primary_key=True),
            Column("name", String(100), nullable=False),
            Column("profile_id", String(64), nullable=False),
            stamp(),
        ),
        schools=Table(
            "roster_schools",
            metadata,
            Column("id", String(36), primary_key=True),
            Column("region_id", String(64), nullable=False, index=True),
            Column("name", String(200), nullable=False),
            Column("school_system", String(3), nullable=False),
            Column("stage", String(16), nullable=False),
            stamp(),
        ),
        classes=Table(
            "roster_classes",
            metadata,
            Column("id", String(36), primary_key=True),
            Column("school_id", String(36), nullable=False, index=True),
            Column("grade", Integer, nullable=False),
            Column("name", String(100), nullable=False),
            Column("head_teacher_id", String(36), nullable=True),
            Column("subject_teachers", JSON, nullable=False),
            stamp(),
        ),
        teachers=Table(
            "roster_teachers",
            metadata,
            Column("id", String(36), primary_key=True),
            Column("school_id", String(36), nullable=False, index=True),
            Column("name", String(100), nullable=False),
            Column("id_number_hash", String(64), nullable=False, index=True),
            Column("in_service", Boolean, nullable=False),
            Column("subjects", JSON, nullable=False),
            stamp(),
        ),
        students=Table(
            "roster_students",
            metadata,
            Column("id", String(36), primary_key=True),
            Column("school_id", String(36), nullable=False, index=True),
            Column("class_id", String(36), nullable=False, index=True),
            Column("grade", Integer, nullable=False),
            Column("name", String(100), nullable=False),
            Column("active", Boolean, nullable=False),
            stamp(),
        ),
        guardianships=Table(
            "roster_guardianships",
            metadata,
            Column("guardian_id", String(36), nullable=False),
            Column("student_id", String(36), nullable=False, index=True),
            Column("relation", String(32), nullable=False),
            stamp(),
            PrimaryKeyConstraint("guardian_id", "student_id"),
        ),
        holidays=Table(
            "roster_holidays",
            metadata,
            # A year's arrangement may list a day of the neighbouring year.
            Column("year", Integer, primary_key=True),
            Column("day", Date, primary_key=True),
            Column("name", String(50), nullable=True),
            Column("is_workday_swap", Boolean, nullable=False),
            stamp(),
        ),
    )


async def upsert(session: AsyncSession, table: Table, values: dict[str, Any]) -> None:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    keys = [c.name for c in table.primary_key.columns]
    statement = insert(table).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=keys, set_={k: v for k, v in values.items() if k not in keys}
    )
    await session.execute(statement)


def roster_subscription(tables: RosterTables, *, name: str = "roster") -> Subscription:
    async def region(session: AsyncSession, envelope: Envelope) -> None:
        e = ev.RegionUpserted.model_validate(envelope.data)
        await upsert(session, tables.regions, {**e.model_dump(), "synced_at": utcnow()})

    async def school(session: AsyncSession, envelope: Envelope) -> None:
        e = ev.SchoolUpserted.model_validate(envelope.data)
        await upsert(session, tables.schools, {**e.model_dump(), "synced_at": utcnow()})

    async def klass(session: AsyncSession, envelope: Envelope) -> None:
        e = ev.ClassUpserted.model_validate(envelope.data)
        await upsert(session, tables.classes, {**e.model_dump(mode="json"), "synced_at": utcnow()})

    async def teacher(session: AsyncSession, envelope: Envelope) -> None:
        e = ev.TeacherUpserted.model_validate(envelope.data)
        await upsert(session, tables.teachers, {**e.model_dump(), "synced_at": utcnow()})

    async def student(session: AsyncSession, envelope: Envelope) -> None:
        e = ev.StudentUpserted.model_validate(envelope.data)
        await upsert(session, tables.students, {**e.model_dump(), "synced_at": utcnow()})

    async def linked(session: AsyncSession, envelope: Envelope) -> None:
        e = ev.GuardianLinked.model_validate(envelope.data)
        await upsert(session, tables.guardianships, {**e.model_dump(), "synced_at": utcnow()})

    async def unlinked(session: AsyncSession, envelope: Envelope) -> None:
        e = ev.GuardianUnlinked.model_validate(envelope.data)
        await session.execute(
            delete(tables.guardianships).where(
                tables.guardianships.c.guardian_id == e.guardian_id,
                tables.guardianships.c.student_id == e.student_id,
            )
        )

    async def holidays(session: AsyncSession, envelope: Envelope) -> None:
        e = ev.HolidaysPublished.model_validate(envelope.data)
        await session.execute(delete(tables.holidays).where(tables.holidays.c.year == e.year))
        rows = [
            {
                "day": h.date,
                "year": e.year,
                "name": h.name,
                "is_workday_swap": False,
                "synced_at": utcnow(),
            }
            for h in e.holidays
        ] + [
            {"day": d, "year": e.year, "name": None, "is_workday_swap": True, "synced_at": utcnow()}
            for d in e.workday_swaps
        ]
        if rows:
            await session.execute(tables.holidays.insert(), rows)

    return Subscription(
        name=name,
        producer="identity",
        handlers={
            ev.RegionUpserted.TYPE: region,
            ev.SchoolUpserted.TYPE: school,
            ev.ClassUpserted.TYPE: klass,
            ev.TeacherUpserted.TYPE: teacher,
            ev.StudentUpserted.TYPE: student,
            ev.GuardianLinked.TYPE: linked,
            ev.GuardianUnlinked.TYPE: unlinked,
            ev.HolidaysPublished.TYPE: holidays,
        },
    )


async def load_calendar(
    session: AsyncSession, tables: RosterTables, terms: SchoolTerms | None = None
) -> Calendar:
    """The calendar from the holiday arrangements operators loaded into identity;
    years without one fall back to the computed statutory days (X-05)."""
    rows = (await session.execute(select(tables.holidays))).mappings().all()
    by_year: dict[int, dict[str, list[Any]]] = {}
    for row in rows:
        entry = by_year.setdefault(row["year"], {"holidays": [], "workday_swaps": []})
        if row["is_workday_swap"]:
            entry["workday_swaps"].append(row["day"])
        else:
            entry["holidays"].append({"date": row["day"], "name": row["name"] or ""})
    arrangements = [
        HolidayArrangement.model_validate({"year": year, **entry})
        for year, entry in sorted(by_year.items())
    ]
    return Calendar(arrangements, terms)


async def guardian_student_ids(
    session: AsyncSession, tables: RosterTables, guardian_id: str
) -> set[str]:
    """GW-03: the children a guardian may see."""
    rows = await session.execute(
        select(tables.guardianships.c.student_id).where(
            tables.guardianships.c.guardian_id == guardian_id
        )
    )
    return set(rows.scalars())
