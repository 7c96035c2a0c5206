"""homework's HTTP routes."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from chassis.app import DB
from chassis.auth import CurrentPrincipal
from chassis.errors import not_found
from services.homework.models import roster

router = APIRouter()


class ClassCopy(BaseModel):
    id: str
    school_id: str
    grade: int
    name: str
    head_teacher_id: str | None
    school_system: str | None


@router.get(
    "/classes/{class_id}",
    response_model=ClassCopy,
    tags=["班级"],
    summary="班级（来自名册事件的只读副本）",
)
async def get_class(class_id: str, principal: CurrentPrincipal, db: DB) -> ClassCopy:
    classes, schools = roster.classes, roster.schools
    async with db.read() as session:
        row = (
            (
                await session.execute(
                    classes.select()
                    .add_columns(schools.c.school_system, schools.c.region_id)
                    .join(schools, schools.c.id == classes.c.school_id, isouter=True)
                    .where(classes.c.id == class_id)
                )
            )
            .mappings()
            .first()
        )
    if row is None:
        raise not_found("班级不存在。")
    allowed = principal.has_tenant("school", row["school_id"]) or (
        principal.has_role("bureau", "regulator", "auditor")
        and row["region_id"] is not None
        and principal.has_tenant("region", row["region_id"])
    )
    if not allowed:
        raise not_found("班级不存在。")
    return ClassCopy(**{k: row[k] for k in ClassCopy.model_fields})
