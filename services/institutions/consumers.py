"""Events institutions listens to (besides the roster copy).

- funds' overdue refunds and risk alerts enter the credit record (INST-04).
  Their contracts do not exist yet, so handlers read the envelope's ``data``
  dict defensively, by type name; the natural key (refund / alert id) makes a
  replay under a new event id count once too.
- identity's teacher roster: a registered trainer who turns out to be an
  in-service school teacher is flagged (INST-05).
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import utcnow
from chassis.messaging import Subscription
from contracts import funds as funds_events
from contracts import identity as identity_events
from contracts.base import Envelope
from services.institutions.models import Institution, Trainer
from services.institutions.service import add_credit_record

log = structlog.get_logger("institutions.consumers")

REFUND_OVERDUE = funds_events.RefundOverdue.TYPE
RISK_ALERT = funds_events.RiskAlertRaised.TYPE


def _text(data: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


async def _credit_from_funds(
    session: AsyncSession, envelope: Envelope, *, kind: str, ref_keys: tuple[str, ...]
) -> None:
    data = envelope.data if isinstance(envelope.data, dict) else {}
    institution_id = _text(data, "institution_id")
    if institution_id is None:
        log.warning("funds_event_without_institution", type=envelope.type, event_id=envelope.id)
        return
    inst = (
        await session.scalars(
            select(Institution).where(Institution.id == institution_id).with_for_update()
        )
    ).first()
    if inst is None:
        log.warning("funds_event_unknown_institution", type=envelope.type, id=institution_id)
        return
    ref = _text(data, *ref_keys) or envelope.subject or envelope.id
    if kind == "refund_overdue":
        reason = "退费逾期"
        days = _text(data, "overdue_days", "days_overdue")
        if days:
            reason += f"（逾期 {days} 天）"
    else:
        reason = "资金风险预警"
        alert = _text(data, "kind", "alert_type", "reason", "rule")
        if alert:
            reason += f"（{alert}）"
    await add_credit_record(
        session,
        inst,
        source=envelope.type.removesuffix(".v1"),
        source_ref=ref,
        kind=kind,
        reason=reason,
    )


async def on_refund_overdue(session: AsyncSession, envelope: Envelope) -> None:
    await _credit_from_funds(
        session, envelope, kind="refund_overdue", ref_keys=("refund_id", "id", "request_id")
    )


async def on_risk_alert(session: AsyncSession, envelope: Envelope) -> None:
    await _credit_from_funds(session, envelope, kind="risk_alert", ref_keys=("alert_id", "id"))


def funds_subscription() -> Subscription:
    return Subscription(
        name="funds-alerts",
        producer="funds",
        handlers={REFUND_OVERDUE: on_refund_overdue, RISK_ALERT: on_risk_alert},
    )


async def on_teacher(session: AsyncSession, envelope: Envelope) -> None:
    e = identity_events.TeacherUpserted.model_validate(envelope.data)
    if not e.in_service:
        return
    await session.execute(
        update(Trainer)
        .where(
            Trainer.id_number_hash == e.id_number_hash,
            Trainer.status.in_(("active", "pending_check")),
        )
        .values(
            status="flagged",
            flag_reason="与在职中小学教师名册相符（INST-05），待主管部门核查",
            updated_at=utcnow(),
        )
    )


def trainer_screening_subscription() -> Subscription:
    return Subscription(
        name="trainer-screening",
        producer="identity",
        handlers={identity_events.TeacherUpserted.TYPE: on_teacher},
    )
