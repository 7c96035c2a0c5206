"""End-to-end money flow through the HTTP API (FUND-01..FUND-07, FUND-09)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from contracts import institutions as inst
from services.funds import ledger
from services.funds.models import Lesson
from tests.funds.harness import Funds, facts
from tests.support import auth, eventually


async def test_fund01_account_opened_after_licence_and_one_per_institution(funds: Funds) -> None:
    # Before the licence event the bank cannot open it (FUND-01).
    r = await funds.post(
        "/accounts",
        funds.bank_token,
        {"institution_id": "i1", "bank_id": "bank-a", "account_number": "62220001"},
    )
    assert r.status_code == 422 and r.json()["rule"] == "FUND-01"
    await funds.license("i1")
    account = await funds.open_account("i1")
    assert account["state"] == "active"
    r = await funds.post(
        "/accounts",
        funds.bank_token,
        {"institution_id": "i1", "bank_id": "bank-a", "account_number": "62220002"},
    )
    assert r.status_code == 409 and r.json()["rule"] == "FUND-01"
    # A bank cannot open an account at another bank.
    r = await funds.post(
        "/accounts",
        funds.bank_token,
        {"institution_id": "i1", "bank_id": "bank-b", "account_number": "62220003"},
    )
    assert r.status_code == 404


async def test_fund04_release_per_lesson_keeps_reserve_until_complete(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=2)
    cid = contract["id"]
    assert await funds.balance(ledger.escrow(cid)) == 20000

    r = await funds.report(cid, "i1")
    assert r.status_code == 201, r.text
    lesson = r.json()
    r = await funds.answer(lesson["id"], parent)
    assert r.status_code == 200, r.text
    # 10 % reserve (national default) stays in escrow (FUND-05).
    assert await funds.balance(ledger.escrow(cid)) == 10000
    assert await funds.balance(ledger.reserve(cid)) == 1000
    assert await funds.balance(ledger.releasable("i1")) == 9000

    lesson2 = (await funds.report(cid, "i1")).json()
    assert (await funds.answer(lesson2["id"], parent)).status_code == 200
    # Contract complete: the reserve is released too.
    assert await funds.balance(ledger.escrow(cid)) == 0
    assert await funds.balance(ledger.reserve(cid)) == 0
    assert await funds.balance(ledger.releasable("i1")) == 20000
    assert (await funds.contract(cid))["status"] == "completed"
    await funds.check_books()


async def test_fund06_refund_computed_and_paid_back(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=5)
    cid = contract["id"]
    lesson = (await funds.report(cid, "i1")).json()
    await funds.answer(lesson["id"], parent)
    # The body cannot carry an amount: refunds are computed (FUND-06).
    r = await funds.post(f"/contracts/{cid}/refunds", parent, {"amount_fen": 1})
    assert r.status_code == 422
    r = await funds.post(f"/contracts/{cid}/refunds", parent, {"reason": "搬家"})
    assert r.status_code == 201, r.text
    refund = r.json()
    # 4 unconsumed lessons × 100 yuan + 10 yuan unreleased reserve.
    assert refund["lessons"] == 4 and refund["amount_fen"] == 40000 + 1000
    # Not yet answered → the bank cannot execute.
    r = await funds.post(
        f"/bank/refunds/{refund['id']}/execute", funds.bank_token, {"bank_ref": "RF-1"}, signed=True
    )
    assert r.status_code == 409 and r.json()["rule"] == "FUND-06"
    inst_token = funds.mint("institution", tenants=["institution:i1"])
    r = await funds.client.post(
        f"/refunds/{refund['id']}/answer", json={"agree": True}, headers=auth(inst_token)
    )
    assert r.status_code == 200, r.text
    r = await funds.post(
        f"/bank/refunds/{refund['id']}/execute", funds.bank_token, {"bank_ref": "RF-1"}, signed=True
    )
    assert r.status_code == 200, r.text
    assert r.json()["paid_fen"] == 41000
    assert await funds.balance(ledger.escrow(cid)) == 0
    assert await funds.balance(ledger.reserve(cid)) == 0
    assert await funds.balance(ledger.refunds_paid("i1")) == 41000
    assert await funds.balance(ledger.releasable("i1")) == 9000
    assert (await funds.contract(cid))["status"] == "refunded"
    await funds.check_books()


async def test_fund07_freeze_on_suspension_plans_refunds_bank_executes(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1", "s2")
    c1 = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=3)
    c2 = await funds.paid_contract(parent, "i1", "c1", "s2", lessons=2)
    lesson = (await funds.report(c1["id"], "i1")).json()
    pending = (await funds.report(c2["id"], "i1")).json()

    async def frozen() -> bool:
        acc = await funds.account_row("i1")
        return acc is not None and acc.state == "frozen"

    await funds.event_and_wait(
        inst.LicenceSuspended(
            **facts(
                "i1",
                status="suspended",
                can_charge=False,
                can_enroll=False,
                reason="违规培训，责令整改",
            )
        ),
        frozen,
    )
    # Releases stop: a confirmation is recorded, nothing moves (FUND-07).
    r = await funds.answer(lesson["id"], parent)
    assert r.status_code == 200 and r.json()["released"] is False
    assert await funds.balance(ledger.releasable("i1")) == 0
    # No new sales.
    r = await funds.post("/contracts", parent, funds.purchase_body("i1", "c1", "s1", 1))
    assert r.status_code == 422 and r.json()["rule"] == "FUND-02"

    regulator = funds.mint("regulator", tenants=["region:jinhua"])
    plans = (await funds.client.get("/refund-plans", headers=auth(regulator))).json()
    assert len(plans) == 1
    plan = (
        await funds.client.get(f"/refund-plans/{plans[0]['id']}", headers=auth(regulator))
    ).json()
    # Lessons reported before the freeze count as delivered: c1 2 of 3 → 20000,
    # c2 1 of 2 → 10000 (no reserve held yet: nothing was released).
    assert plan["contracts"] == 2 and plan["total_fen"] == 30000
    for item in plan["refunds"]:
        r = await funds.post(
            f"/bank/refunds/{item['id']}/execute",
            funds.bank_token,
            {"bank_ref": f"RF-{item['id'][:8]}"},
            signed=True,
        )
        assert r.status_code == 200, r.text
    plan = (
        await funds.client.get(f"/refund-plans/{plans[0]['id']}", headers=auth(regulator))
    ).json()
    assert plan["outstanding_fen"] == 0
    # c1's confirmed lesson is now consumed: refunded 2 lessons, the confirmed one stays in escrow.
    assert await funds.balance(ledger.escrow(c1["id"])) == 10000
    assert await funds.balance(ledger.escrow(c2["id"])) == 10000  # the pending report
    _ = pending
    await funds.check_books()


async def test_fund04_auto_confirm_after_working_days(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=3)
    lesson = (await funds.report(contract["id"], "i1")).json()
    due = dt.date.fromisoformat(lesson["auto_confirm_on"])
    cal = None
    async with funds.db.read() as s:
        from services.funds.service import calendar

        cal = await calendar(s)
    # Counted from the day the service recorded (China's date, not the test's).
    delivered = dt.date.fromisoformat(lesson["delivered_on"])
    assert cal.working_days_between(delivered, due) == 7
    bureau = funds.mint("bureau", tenants=["region:jinhua"])
    r = await funds.client.post(
        "/ops/sweep", json={"as_of": (due - dt.timedelta(days=1)).isoformat()}, headers=auth(bureau)
    )
    assert r.json()["auto_confirmed"] == 0
    r = await funds.client.post("/ops/sweep", json={"as_of": due.isoformat()}, headers=auth(bureau))
    assert r.json()["auto_confirmed"] == 1
    async with funds.db.read() as s:
        row = await s.scalar(select(Lesson).where(Lesson.id == lesson["id"]))
        assert row is not None and row.status == "auto_confirmed" and row.released
    assert await funds.balance(ledger.releasable("i1")) == 9000
    await funds.check_books()
    _ = eventually


async def test_fund04_batched_confirmation_one_posting_per_lesson(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=8000)
    parent = await funds.family("g1", "s1", "s2")
    c1 = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=60, price=8000)
    c2 = await funds.paid_contract(parent, "i1", "c1", "s2", lessons=60, price=8000)
    ids = []
    for c in (c1, c2):
        for _ in range(60):
            ids.append((await funds.report(c["id"], "i1")).json()["id"])
    async with funds.db.read() as s:
        before = (await ledger.verify_chain(s)).head_seq
    r = await funds.post("/lessons/confirmations", parent, {"lesson_ids": ids})
    assert r.status_code == 200, r.text
    assert len(r.json()) == 120 and all(x["released"] for x in r.json())
    async with funds.db.read() as s:
        after = (await ledger.verify_chain(s)).head_seq
    # 120 lesson releases + 2 reserve releases at completion.
    assert after - before == 122
    assert await funds.balance(ledger.releasable("i1")) == 2 * 480000
    # Someone else's lessons in the batch: the whole batch is refused, nothing moves.
    other = await funds.family("g2", "s3")
    c3 = await funds.paid_contract(other, "i1", "c1", "s3", lessons=2, price=8000)
    mine = (await funds.report(c3["id"], "i1")).json()["id"]
    r = await funds.post("/lessons/confirmations", parent, {"lesson_ids": [mine]})
    assert r.status_code == 404
    await funds.check_books()
