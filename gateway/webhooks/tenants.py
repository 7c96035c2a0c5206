"""Which tenants an event belongs to (GW-05 tenant isolation).

Tokens carry tenants as `kind:id` (region:jinhua, school:..., institution:...).
An event's tenants are read from its `data`:

| field in `data`                      | tenant                 |
|--------------------------------------|------------------------|
| `region_id`                          | `region:<id>`          |
| `school_id`                          | `school:<id>`          |
| `class_id`                           | `class:<id>`           |
| `institution_id`                     | `institution:<id>`     |
| `id` of a `<producer>.region.*` event | `region:<id>`          |
| `id` of a `<producer>.school.*` event | `school:<id>`          |
| `id` of a `<producer>.class.*` event  | `class:<id>`           |
| `id` of a `<producer>.institution.*` event | `institution:<id>` |

and then widened upwards along links learned from earlier events: an event
that names a class and its school links `class -> school`, one that names a
school (or institution) and its region links it to the region (identity's
`school.upserted` and `class.upserted` events teach the roster). So a
platform authorized for `region:jinhua` receives the events of every school
and class in Jinhua, and one authorized for a single school only that
school's. An event with none of these fields belongs to no tenant and is
delivered to nobody, unless its type is listed as public
(`GATEWAY_WEBHOOK_PUBLIC_EVENT_TYPES`, e.g. the holiday calendar).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import Database, utcnow
from chassis.roster import upsert
from contracts.base import Envelope
from gateway.webhooks.models import tenant_links

FIELD_KINDS = {
    "region_id": "region",
    "school_id": "school",
    "class_id": "class",
    "institution_id": "institution",
}
AGGREGATE_KINDS = frozenset(FIELD_KINDS.values())
# child kind -> parent kind
CONTAINERS = (("class", "school"), ("school", "region"), ("institution", "region"))
# Kinds whose parent always arrives from identity's roster events: worth waiting for.
ROSTER_KINDS = frozenset({"class", "school"})


def _named(envelope: Envelope) -> dict[str, str]:
    data: dict[str, Any] = envelope.data
    named: dict[str, str] = {}
    for field, kind in FIELD_KINDS.items():
        value = data.get(field)
        if isinstance(value, str | int) and str(value):
            named[kind] = str(value)
    parts = envelope.type.split(".")
    if len(parts) >= 3 and parts[1] in AGGREGATE_KINDS:
        value = data.get("id")
        if isinstance(value, str | int) and str(value):
            named[parts[1]] = str(value)
    return named


def direct_tenants(envelope: Envelope) -> set[str]:
    return {f"{kind}:{value}" for kind, value in _named(envelope).items()}


def links_of(envelope: Envelope) -> list[tuple[str, str]]:
    named = _named(envelope)
    return [
        (f"{child}:{named[child]}", f"{parent}:{named[parent]}")
        for child, parent in CONTAINERS
        if child in named and parent in named
    ]


class TenantGraph:
    """child -> parent links, in memory and in the gateway's database."""

    def __init__(self) -> None:
        self.parents: dict[str, str] = {}

    async def load(self, db: Database) -> None:
        async with db.read() as session:
            rows = (
                await session.execute(select(tenant_links.c.child, tenant_links.c.parent))
            ).all()
        self.parents = {r.child: r.parent for r in rows}

    async def learn(self, session: AsyncSession, pairs: Iterable[tuple[str, str]]) -> None:
        # Always written, not only when new to memory: the memory is updated
        # before the transaction commits, and a batch that rolls back must not
        # leave a link known here but missing from the database.
        for child, parent in pairs:
            await upsert(
                session,
                tenant_links,
                {"child": child, "parent": parent, "updated_at": utcnow()},
            )
            self.parents[child] = parent

    def expand(self, tenants: Iterable[str]) -> set[str]:
        out = set(tenants)
        frontier = list(out)
        for _ in range(4):  # class -> school -> region: depth is small
            nxt = []
            for t in frontier:
                parent = self.parents.get(t)
                if parent and parent not in out:
                    out.add(parent)
                    nxt.append(parent)
            if not nxt:
                break
            frontier = nxt
        return out

    def unresolved(self, tenants: Iterable[str]) -> set[str]:
        """Roster tenants whose parent is not known yet."""
        return {t for t in tenants if t.split(":", 1)[0] in ROSTER_KINDS and t not in self.parents}
