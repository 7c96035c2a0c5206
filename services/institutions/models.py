"""institutions's tables, including its read copy of identity's roster."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase

from chassis.db import TYPE_ANNOTATION_MAP, new_metadata
from chassis.roster import roster_tables


class Base(DeclarativeBase):
    metadata = new_metadata()
    type_annotation_map = TYPE_ANNOTATION_MAP


roster = roster_tables(Base.metadata)
