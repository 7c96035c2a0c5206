"""Object-level authorization (GW-03) for institutions.

- an institution (role ``institution``, tenant ``institution:<id>``) sees and
  edits only its own records;
- a regulator (role ``regulator``, tenants ``region:<id>`` and
  ``department:<education|sports|culture|science>``) sees and acts on the
  categories its departments supervise, in its regions;
- the bureau (role ``bureau``, tenant ``region:<id>``) and auditors oversee
  their regions (read).

Whatever a caller may not see answers 404 exactly like a missing object.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, false, or_

from chassis.auth import Principal
from chassis.errors import Problem, not_found
from services.institutions.rules import categories_of

OVERSIGHT_ROLES = ("bureau", "auditor")


def can_view(principal: Principal, *, institution_id: str, region_id: str, category: str) -> bool:
    if principal.has_role("institution") and principal.has_tenant("institution", institution_id):
        return True
    if principal.has_role(*OVERSIGHT_ROLES) and principal.has_tenant("region", region_id):
        return True
    return can_regulate(principal, region_id=region_id, category=category)


def can_regulate(principal: Principal, *, region_id: str, category: str) -> bool:
    return (
        principal.has_role("regulator")
        and principal.has_tenant("region", region_id)
        and category in categories_of(principal.tenant_ids("department"))
    )


def is_owner(principal: Principal, institution_id: str) -> bool:
    return principal.has_role("institution") and principal.has_tenant("institution", institution_id)


def ensure_view(principal: Principal, inst: Any, what: str = "机构不存在。") -> None:
    if inst is None or not can_view(
        principal, institution_id=inst.id, region_id=inst.region_id, category=inst.category
    ):
        raise not_found(what)


def ensure_regulator(principal: Principal, inst: Any) -> None:
    """Act as the competent regulator; visible-but-not-competent is 403."""
    ensure_view(principal, inst)
    if not can_regulate(principal, region_id=inst.region_id, category=inst.category):
        raise Problem(403, "只有该机构的主管部门（本区域）可以执行此操作。")


def ensure_owner_or_regulator(principal: Principal, inst: Any) -> None:
    ensure_view(principal, inst)
    if not (
        is_owner(principal, inst.id)
        or can_regulate(principal, region_id=inst.region_id, category=inst.category)
    ):
        raise Problem(403, "只有机构本身或其主管部门可以执行此操作。")


def institution_scope(principal: Principal, model: Any) -> ColumnElement[bool]:
    """SQL condition: the institutions a caller may list."""
    conditions: list[ColumnElement[bool]] = []
    if principal.has_role("institution"):
        conditions.append(model.id.in_(principal.tenant_ids("institution")))
    regions = principal.tenant_ids("region")
    if principal.has_role(*OVERSIGHT_ROLES) and regions:
        conditions.append(model.region_id.in_(regions))
    if principal.has_role("regulator") and regions:
        categories = categories_of(principal.tenant_ids("department"))
        if categories:
            conditions.append(model.region_id.in_(regions) & model.category.in_(categories))
    return or_(*conditions) if conditions else false()


def complaint_visible(principal: Principal, complaint: Any) -> bool:
    if principal.has_role(*OVERSIGHT_ROLES) and principal.has_tenant("region", complaint.region_id):
        return True
    return can_handle_complaint(principal, complaint)


def can_handle_complaint(principal: Principal, complaint: Any) -> bool:
    return (
        principal.has_role("regulator")
        and principal.has_tenant("region", complaint.region_id)
        and principal.has_tenant("department", complaint.department)
    )


def complaint_scope(principal: Principal, model: Any) -> ColumnElement[bool]:
    conditions: list[ColumnElement[bool]] = []
    regions = principal.tenant_ids("region")
    if principal.has_role(*OVERSIGHT_ROLES) and regions:
        conditions.append(model.region_id.in_(regions))
    departments = principal.tenant_ids("department")
    if principal.has_role("regulator") and regions and departments:
        conditions.append(model.region_id.in_(regions) & model.department.in_(departments))
    return or_(*conditions) if conditions else false()
