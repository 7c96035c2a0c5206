"""institutions' events: one per licence transition, through the outbox to
JetStream; consuming identity's roster and funds' alerts is idempotent (X-02)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy import func, select

from chassis.messaging import inbox_table, outbox_table
from chassis.privacy import hash_identity_number, resident_id_check_digit
from contracts.base import STREAMS, Envelope
from services.identity import schemas as id_schemas
from services.identity import service as id_service
from services.institutions.models import Trainer, roster
from tests.conftest import PEPPER
from tests.institutions.conftest import act, licensed, register
from tests.support import auth, eventually

pytestmark = pytest.mark.asyncio


async def outbox_counts(svc) -> dict[str, int]:
    async with svc.ctx.db.read() as session:
        rows = await session.execute(
            select(outbox_table.c.type, func.count()).group_by(outbox_table.c.type)
        )
        return {t: n for t, n in rows.all()}


def diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = set(before) | set(after)
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)
    }


async def test_inst03_each_licence_transition_publishes_exactly_one_event(inst, tokens):
    c = inst.client
    reg = tokens.regulator("sports")
    before = await outbox_counts(inst)
    await register(c, tokens, "org-e")
    assert diff(before, await outbox_counts(inst)) == {}  # an application is not a transition

    steps = [
        ("start_review", {}, "institutions.licence.review_started.v1"),
        ("grant", {}, "institutions.licence.granted.v1"),
        ("suspend", {}, "institutions.licence.suspended.v1"),
        ("reinstate", {}, "institutions.licence.reinstated.v1"),
        ("transform", {"transformation": "to_non_profit"}, "institutions.licence.transformed.v1"),
        ("terminate", {}, "institutions.licence.terminated.v1"),
    ]
    for action, extra, event_type in steps:
        before = await outbox_counts(inst)
        r = await act(c, reg, "org-e", action, **extra)
        assert r.status_code == 200, r.text
        assert diff(before, await outbox_counts(inst)) == {event_type: 1}, action
        # A refused transition publishes nothing.
        before = await outbox_counts(inst)
        assert (await act(c, reg, "org-e", "start_review")).status_code == 409
        assert diff(before, await outbox_counts(inst)) == {}

    await register(c, tokens, "org-rej")
    await act(c, reg, "org-rej", "start_review")
    before = await outbox_counts(inst)
    assert (await act(c, reg, "org-rej", "reject")).status_code == 200
    assert diff(before, await outbox_counts(inst)) == {"institutions.licence.rejected.v1": 1}

    await licensed(c, tokens, "org-bl")
    for path, event_type in (
        ("blacklist", "institutions.blacklisted.v1"),
        ("delist", "institutions.delisted.v1"),
    ):
        before = await outbox_counts(inst)
        r = await c.post(
            f"/institutions/org-bl/{path}", json={"reason": "依法处理"}, headers=auth(reg)
        )
        assert r.status_code == 200
        assert diff(before, await outbox_counts(inst)) == {event_type: 1}
    r = await c.post("/institutions/org-bl/delist", json={"reason": "重复"}, headers=auth(reg))
    assert r.status_code == 409

    # Revocation is two transitions (licence revoked, black-listed): one event each.
    before = await outbox_counts(inst)
    assert (await act(c, reg, "org-bl", "revoke")).status_code == 200
    assert diff(before, await outbox_counts(inst)) == {
        "institutions.licence.revoked.v1": 1,
        "institutions.blacklisted.v1": 1,
    }


async def test_x02_licence_events_reach_jetstream_with_the_facts_consumers_need(inst, tokens):
    c = inst.client
    reg = tokens.regulator("sports")
    await licensed(c, tokens, "org-js", name="流式体育")
    await act(c, reg, "org-js", "suspend", reason="消防整改")

    async def published() -> list[dict]:
        try:
            js = inst.ctx.bus.js  # raises until the bus has connected
            sub = await js.pull_subscribe(
                "institutions.>",
                stream=STREAMS["institutions"].name,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            )
            msgs = await sub.fetch(10, timeout=1)
            await sub.unsubscribe()
        except Exception:
            return []
        return [json.loads(m.data) for m in msgs] if len(msgs) >= 3 else []

    envelopes = await eventually(published)
    assert [e["type"] for e in envelopes] == [
        "institutions.licence.review_started.v1",
        "institutions.licence.granted.v1",
        "institutions.licence.suspended.v1",
    ]
    suspended = envelopes[-1]
    assert suspended["subject"] == "org-js" and suspended["source"] == "institutions"
    data = suspended["data"]
    assert data["institution_id"] == "org-js" and data["region_id"] == "jinhua"
    assert data["category"] == "sports" and data["status"] == "suspended"
    assert data["previous_status"] == "licensed" and data["reason"] == "消防整改"
    assert data["can_enroll"] is False and data["can_charge"] is False
    assert data["licence_number"] == envelopes[1]["data"]["licence_number"]
    assert data["credit_code"] and data["occurred_at"]
    assert envelopes[1]["data"]["can_charge"] is True


async def _publish(svc, producer: str, envelope: dict, msg_id: str | None = None) -> None:
    bus = svc.ctx.bus
    await bus.wait_connected(10)
    await bus.ensure_stream(STREAMS[producer])
    await bus.js.publish(
        envelope["type"],
        json.dumps(envelope).encode(),
        headers={"Nats-Msg-Id": msg_id or str(uuid.uuid4())},
    )


def funds_envelope(type_name: str, data: dict, event_id: str | None = None) -> dict:
    return {
        "id": event_id or str(uuid.uuid4()),
        "type": type_name,
        "source": "funds",
        "time": datetime.now(UTC).isoformat(),
        "subject": str(data.get("institution_id", "x")),
        "data": data,
    }


async def handled(svc, consumer: str) -> int:
    async with svc.ctx.db.read() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(inbox_table)
                .where(inbox_table.c.consumer == consumer)
            )
        )


async def test_inst04_funds_alerts_enter_credit_once_even_when_redelivered(inst, tokens):
    c = inst.client
    await licensed(c, tokens, "org-f")
    reg = tokens.regulator("sports")
    consumer = "institutions-funds-alerts"

    async def score() -> int:
        return (await c.get("/institutions/org-f/credit", headers=auth(reg))).json()["score"]

    overdue = funds_envelope(
        "funds.refund.overdue.v1",
        {"institution_id": "org-f", "refund_id": "rf-1", "overdue_days": 3, "amount_fen": 120000},
    )
    await _publish(inst, "funds", overdue)
    await eventually(lambda: _eq(handled(inst, consumer), 1))
    assert await score() == 95
    # The same event again (a redelivery past the server's de-duplication).
    await _publish(inst, "funds", overdue)
    # The same refund under a new event id (a replay by funds): counted once.
    await _publish(inst, "funds", {**overdue, "id": str(uuid.uuid4())})
    # Unknown shapes and institutions are acknowledged and change nothing.
    await _publish(inst, "funds", funds_envelope("funds.risk.alert.v1", {"unexpected": [1, 2]}))
    await _publish(
        inst, "funds", funds_envelope("funds.risk.alert.v1", {"institution_id": "nobody"})
    )
    await eventually(lambda: _eq(handled(inst, consumer), 4))
    assert await score() == 95
    await _publish(
        inst,
        "funds",
        funds_envelope(
            "funds.risk.alert.v1",
            {"institution_id": "org-f", "alert_id": "al-9", "kind": "refund_spike"},
        ),
    )
    await eventually(lambda: _eq(handled(inst, consumer), 5))
    credit = (await c.get("/institutions/org-f/credit", headers=auth(reg))).json()
    assert credit["score"] == 92
    assert [r["source"] for r in credit["records"]] == ["funds.refund.overdue", "funds.risk.alert"]
    assert "refund_spike" in credit["records"][1]["reason"]


async def _eq(awaitable, expected) -> bool:
    return (await awaitable) == expected


async def test_inst05_roster_copy_is_idempotent_and_flags_a_trainer_who_is_in_service(
    start_service, tokens
):
    identity = await start_service("identity")
    inst = await start_service("institutions")
    c = inst.client
    await register(c, tokens, "org-ro")
    first17 = "33070219850505123"
    person = first17 + resident_id_check_digit(first17)
    r = await c.post(
        "/institutions/org-ro/trainers",
        json={
            "name": "周老师",
            "id_number": person,
            "consent_given": True,
            "background_check": {
                "result": "clear",
                "checked_on": "2026-11-01",
                "authority": "公安",
            },
        },
        headers=auth(tokens.institution("org-ro")),
    )
    assert r.status_code == 201

    # identity registers the same person as an in-service school teacher.
    db = identity.ctx.db
    await id_service.upsert_region(
        db, id_schemas.RegionIn(id="jinhua", name="金华市", profile_id="jinhua")
    )
    school = await id_service.create_school(
        db,
        id_schemas.SchoolIn(
            region_id="jinhua", name="站前小学", school_system="6-3", stage="primary"
        ),
    )
    teacher = await id_service.create_teacher(
        db, school.id, id_schemas.TeacherIn(name="周老师", id_number=person), PEPPER
    )

    async def trainer_status() -> str | None:
        async with inst.ctx.db.read() as session:
            t = (await session.scalars(select(Trainer))).one()
            return t.status if t.status == "flagged" else None

    await eventually(trainer_status)

    async def teachers() -> int:
        async with inst.ctx.db.read() as session:
            return int(await session.scalar(select(func.count()).select_from(roster.teachers)))

    # The roster copy is its own consumer: it may land after the screening.
    await eventually(lambda: _eq(teachers(), 1))
    # Redeliver identity's teacher event (new message id, same event id): nothing changes.
    async with identity.ctx.db.read() as session:
        payload = (
            await session.execute(
                select(outbox_table.c.payload).where(
                    outbox_table.c.type == "identity.teacher.upserted.v1"
                )
            )
        ).scalar_one()
    envelope = Envelope.model_validate_json(payload).model_dump(mode="json")
    await _publish(inst, "identity", envelope)
    await _publish(inst, "identity", envelope)
    # A later event as a sentinel: consumers handle a stream in order.
    sentinel = {
        **envelope,
        "id": str(uuid.uuid4()),
        "subject": "t-sentinel",
        "data": {**envelope["data"], "id": "t-sentinel", "id_number_hash": "0" * 64},
    }
    await _publish(inst, "identity", sentinel)
    await eventually(lambda: _eq(teachers(), 2))
    assert await _inbox_dupes(inst, envelope["id"]) == 2  # roster + screening, once each
    async with inst.ctx.db.read() as session:
        row = (
            (
                await session.execute(
                    select(roster.teachers).where(roster.teachers.c.id == teacher.id)
                )
            )
            .mappings()
            .one()
        )
    assert row["id"] == teacher.id and row["in_service"] is True
    assert row["id_number_hash"] == hash_identity_number(person, PEPPER)

    # And a new registration of that person is refused (INST-05).
    await register(c, tokens, "org-ro2")
    r = await c.post(
        "/institutions/org-ro2/trainers",
        json={
            "name": "周老师",
            "id_number": person,
            "consent_given": True,
            "background_check": {
                "result": "clear",
                "checked_on": "2026-11-01",
                "authority": "公安",
            },
        },
        headers=auth(tokens.institution("org-ro2")),
    )
    assert r.status_code == 422 and r.json()["violations"][0]["code"] == "in_service_teacher"


async def _inbox_dupes(svc, event_id: str) -> int:
    async with svc.ctx.db.read() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(inbox_table)
                .where(inbox_table.c.event_id == event_id)
            )
        )
