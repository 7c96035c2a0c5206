"""Closing an escrow account (FUND-01), resolving lesson disputes (FUND-04/05,
FUND-06) and an Idempotency-Key still in flight (FUND-09)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import uuid

from sqlalchemy import func, select

from chassis.messaging import idempotency_table
from services.funds import ledger
from services.funds.models import JournalTransaction
from tests.funds.harness import Funds
from tests.funds.test_operations import _events, _sweep


async def test_fund01_account_closes_only_when_settled_and_zero(funds: Funds) -> None:
    account = await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1", "s2")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=1)
    unpaid = await funds.buy(parent, funds.purchase_body("i1", "c1", "s2", lessons=1))
    close = f"/accounts/{account['id']}/close"

    # A contract still running: refused (FUND-01), naming the count.
    r = await funds.post(close, funds.bank_token, {})
    assert r.status_code == 409 and r.json()["rule"] == "FUND-01", r.text
    assert r.json()["open_contracts"] == 1

    # Completed, but the released money is still in the account: refused.
    lesson = (await funds.report(contract["id"], "i1")).json()
    assert (await funds.answer(lesson["id"], parent)).status_code == 200
    assert (await funds.contract(contract["id"]))["status"] == "completed"
    r = await funds.post(close, funds.bank_token, {})
    assert r.status_code == 409 and r.json()["rule"] == "FUND-01"
    assert r.json()["balances_fen"] == {ledger.releasable("i1"): 10000}

    # Instructed but not executed: still refused.
    payouts = (await funds.post("/payouts/batches", funds.bank_token, {"bank_id": "bank-a"})).json()
    r = await funds.post(close, funds.bank_token, {})
    assert r.status_code == 409 and r.json()["balances_fen"] == {
        ledger.payout_instructed("i1"): 10000
    }
    for p in payouts:
        r = await funds.post(
            f"/bank/payouts/{p['id']}/execute", funds.bank_token, {"bank_ref": "PO-1"}, signed=True
        )
        assert r.status_code == 200, r.text

    # Another bank cannot close it; its own bank can, once.
    other = funds.mint("bank", tenants=["bank:bank-b"])
    assert (await funds.post(close, other, {})).status_code == 404
    r = await funds.post(close, funds.bank_token, {})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "closed" and r.json()["closed_at"]
    again = await funds.post(close, funds.bank_token, {})
    assert again.status_code == 409 and again.json()["rule"] == "FUND-01"

    # A closed account cannot sell (FUND-01) ...
    r = await funds.post("/contracts", parent, funds.purchase_body("i1", "c1", "s2", lessons=1))
    assert r.status_code in (409, 422) and r.json()["rule"] == "FUND-01", r.text
    # ... nor receive money (FUND-01).
    r = await funds.pay(unpaid)
    assert r.status_code == 409 and r.json()["rule"] == "FUND-01", r.text
    events = await _events(funds, "funds.account.closed.v1")
    assert events[0]["account_id"] == account["id"]
    await funds.check_books()


async def test_fund04_dispute_resolved_by_regulator_or_institution(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=3)
    cid = contract["id"]
    inst_token = funds.mint("institution", tenants=["institution:i1"])
    regulator = funds.mint("regulator", tenants=["region:jinhua"])
    elsewhere = funds.mint("regulator", tenants=["region:wangcheng"])

    first = (await funds.report(cid, "i1")).json()
    r = await funds.post(
        f"/lessons/{first['id']}/answer", parent, {"confirm": False, "reason": "当天停课"}
    )
    assert r.status_code == 200 and r.json()["status"] == "disputed", r.text
    assert r.json()["resolve_by"] and r.json()["dispute_reason"] == "当天停课"
    assert (await _events(funds, "funds.lesson.disputed.v1"))[0]["lesson_id"] == first["id"]
    resolve = f"/lessons/{first['id']}/resolution"

    # The institution cannot declare it delivered on its own; the parent's
    # dispute is the "not delivered" claim; a regulator elsewhere sees nothing.
    r = await funds.post(resolve, inst_token, {"delivered": True})
    assert r.status_code == 403 and r.json()["rule"] == "FUND-04"
    r = await funds.post(resolve, parent, {"delivered": False})
    assert r.status_code == 403 and r.json()["rule"] == "FUND-04"
    assert (await funds.post(resolve, elsewhere, {"delivered": True})).status_code == 404
    assert await funds.balance(ledger.escrow(cid)) == 30000

    # The region's regulator rules it delivered: released like a confirmation
    # (FUND-04), less the reserve (FUND-05).
    r = await funds.post(resolve, regulator, {"delivered": True, "note": "签到记录完整"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "confirmed" and r.json()["resolution"] == "delivered"
    assert r.json()["resolved_by"] == "regulator"
    assert await funds.balance(ledger.escrow(cid)) == 20000
    assert await funds.balance(ledger.reserve(cid)) == 1000
    assert await funds.balance(ledger.releasable("i1")) == 9000
    assert (await funds.post(resolve, regulator, {"delivered": False})).status_code == 409
    resolved = await _events(funds, "funds.lesson.dispute.resolved.v1")
    assert resolved[0]["released_fen"] == 10000 and resolved[0]["resolution"] == "delivered"

    # The institution concedes the second one: not delivered, the money stays
    # in escrow and the lesson is refundable (FUND-06).
    second = (await funds.report(cid, "i1")).json()
    await funds.post(f"/lessons/{second['id']}/answer", parent, {"confirm": False})
    r = await funds.post(f"/lessons/{second['id']}/resolution", inst_token, {"delivered": False})
    assert r.status_code == 200 and r.json()["status"] == "not_delivered", r.text
    assert await funds.balance(ledger.escrow(cid)) == 20000
    r = await funds.post(f"/contracts/{cid}/refunds", parent, {})
    assert r.status_code == 201, r.text
    # 2 unconsumed lessons (the undelivered one and the unreported one) + reserve.
    assert r.json()["lessons"] == 2 and r.json()["amount_fen"] == 20000 + 1000
    await funds.check_books()


async def test_fund04_dispute_deadline_overdue_event_and_parent_withdrawal(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=2)
    cid = contract["id"]
    lesson = (await funds.report(cid, "i1")).json()
    r = await funds.post(f"/lessons/{lesson['id']}/answer", parent, {"confirm": False})
    resolve_by = dt.date.fromisoformat(r.json()["resolve_by"])
    # A disputed lesson is never auto-confirmed; overdue is reported once.
    assert (await _sweep(funds, resolve_by))["disputes_overdue"] == 0
    late = await _sweep(funds, resolve_by + dt.timedelta(days=1))
    assert late["disputes_overdue"] == 1 and late["auto_confirmed"] == 0
    assert (await _sweep(funds, resolve_by + dt.timedelta(days=2)))["disputes_overdue"] == 0
    overdue = await _events(funds, "funds.lesson.dispute.overdue.v1")
    assert overdue[0]["lesson_id"] == lesson["id"]
    assert await funds.balance(ledger.escrow(cid)) == 20000
    # The parent withdraws the dispute: delivered with the parent's agreement.
    r = await funds.post(f"/lessons/{lesson['id']}/resolution", parent, {"delivered": True})
    assert r.status_code == 200 and r.json()["resolved_by"] == "parent", r.text
    assert await funds.balance(ledger.escrow(cid)) == 10000
    await funds.check_books()


async def test_fund09_same_key_in_flight_is_409_and_posts_once(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1", "s2")
    contract = await funds.buy(parent, funds.purchase_body("i1", "c1", "s1", lessons=2))
    body = {
        "contract_id": contract["id"],
        "amount_fen": contract["total_fen"],
        "bank_ref": "PAY-SAME",
        "payer_account": "6217000011112222",
    }
    key = str(uuid.uuid4())

    async def count_postings() -> int:
        async with funds.db.read() as s:
            return int(await s.scalar(select(func.count()).select_from(JournalTransaction)) or 0)

    before = await count_postings()
    replies = await asyncio.gather(
        *(
            funds.post("/bank/payments", funds.bank_token, body, key=key, signed=True)
            for _ in range(8)
        )
    )
    done = [r for r in replies if r.status_code != 409]
    busy = [r for r in replies if r.status_code == 409]
    assert done, [r.text for r in replies]
    assert all(r.status_code == 201 for r in done), [r.text for r in replies]
    assert len({r.content for r in done}) == 1  # the same reply, byte for byte
    assert all(r.json()["type"].endswith("idempotency/in-flight") for r in busy)
    assert all(r.headers.get("Retry-After") for r in busy)
    assert await count_postings() == before + 1  # never two postings
    assert await funds.balance(ledger.escrow(contract["id"])) == contract["total_fen"]

    # A claim held by a request still running (deterministically): 409 with
    # Retry-After, nothing posted; once it is gone the same key goes through.
    other = await funds.buy(parent, funds.purchase_body("i1", "c1", "s2", lessons=1))
    clerk = funds.mint("bank", tenants=["bank:bank-a"], subject="clerk-1")
    held = str(uuid.uuid4())
    pay = dict(body, contract_id=other["id"], amount_fen=other["total_fen"], bank_ref="PAY-2")
    raw = json.dumps(pay).encode()
    digest = hashlib.sha256()
    for part in ("POST", "/bank/payments", ""):
        digest.update(part.encode() + b"\0")
    digest.update(raw)
    claim = {"client": "clerk-1", "key": held}
    async with funds.db.transaction() as s:
        await s.execute(
            idempotency_table.insert().values(
                **claim,
                fingerprint=digest.hexdigest(),
                status="in_flight",
                created_at=dt.datetime.now(dt.UTC),
            )
        )
    r = await funds.post("/bank/payments", clerk, pay, key=held, signed=True)
    assert r.status_code == 409 and r.headers["Retry-After"], r.text
    assert await count_postings() == before + 1
    async with funds.db.transaction() as s:
        await s.execute(
            idempotency_table.delete().where(
                idempotency_table.c.client == "clerk-1", idempotency_table.c.key == held
            )
        )
    r = await funds.post("/bank/payments", clerk, pay, key=held, signed=True)
    assert r.status_code == 201, r.text
    assert await count_postings() == before + 2
    await funds.check_books()
