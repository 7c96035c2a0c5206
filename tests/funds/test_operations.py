"""Payouts, deadlines, overdue refunds, risk alerts, reconciliation, unfreeze,
train-first and staged release (FUND-04..FUND-08)."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

from chassis.policy import PolicyRegistry
from contracts import institutions as inst
from contracts.base import Envelope
from services.funds import ledger
from services.funds.service import today_in_china
from tests.funds.harness import Funds, facts
from tests.support import auth, eventually

POLICY_DIR = Path(__file__).resolve().parents[2] / "policy"


async def _sweep(funds: Funds, day: dt.date) -> dict:  # type: ignore[type-arg]
    bureau = funds.mint("bureau", tenants=["region:jinhua"])
    r = await funds.client.post("/ops/sweep", json={"as_of": day.isoformat()}, headers=auth(bureau))
    assert r.status_code == 200, r.text
    return r.json()


async def _events(funds: Funds, subject: str, n: int = 1) -> list[dict]:  # type: ignore[type-arg]
    await funds.publish(inst.LicenceGranted(**facts("noop")))  # connects the test bus
    assert funds.bus is not None
    psub = await funds.bus.js.pull_subscribe(subject, stream="FUNDS")
    got: list[dict] = []  # type: ignore[type-arg]

    async def fetched() -> bool:
        try:
            msgs = await psub.fetch(n, timeout=0.5)
        except Exception:
            return False
        for m in msgs:
            await m.ack()
            got.append(Envelope.model_validate_json(m.data).data)
        return len(got) >= n

    await eventually(fetched)
    return got


async def test_fund04_payouts_batched_and_executed_by_the_bank(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    await funds.ready_institution("i2", "c2", price=10000)
    parent = await funds.family("g1", "s1", "s2")
    for i, c, s in (("i1", "c1", "s1"), ("i2", "c2", "s2")):
        contract = await funds.paid_contract(parent, i, c, s, lessons=2)
        lesson = (await funds.report(contract["id"], i)).json()
        assert (await funds.answer(lesson["id"], parent)).status_code == 200
    r = await funds.post("/payouts/batches", funds.bank_token, {"bank_id": "bank-a"})
    assert r.status_code == 201, r.text
    payouts = r.json()
    assert sorted(p["amount_fen"] for p in payouts) == [9000, 9000]
    assert len({p["batch_id"] for p in payouts}) == 1
    assert await funds.balance(ledger.releasable("i1")) == 0
    assert await funds.balance(ledger.payout_instructed("i1")) == 9000
    # Nothing left to batch.
    r = await funds.post("/payouts/batches", funds.bank_token, {"bank_id": "bank-a"})
    assert r.json() == []
    for p in payouts:
        r = await funds.post(
            f"/bank/payouts/{p['id']}/execute",
            funds.bank_token,
            {"bank_ref": f"PO-{p['id'][:8]}"},
            signed=True,
        )
        assert r.status_code == 200 and r.json()["status"] == "executed"
        again = await funds.post(
            f"/bank/payouts/{p['id']}/execute", funds.bank_token, {"bank_ref": "PO-x"}, signed=True
        )
        assert again.status_code == 409
    assert await funds.balance(ledger.paid_out("i1")) == 9000
    i1 = funds.mint("institution", tenants=["institution:i1"])
    r = await funds.client.get("/payouts", headers=auth(i1))
    assert [p["institution_id"] for p in r.json()] == ["i1"]
    await funds.check_books()


async def test_fund06_deemed_agreed_then_overdue_event(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=4)
    refund = (await funds.post(f"/contracts/{contract['id']}/refunds", parent, {})).json()
    respond_by = dt.date.fromisoformat(refund["respond_by"])
    due_by = dt.date.fromisoformat(refund["due_by"])
    assert (await _sweep(funds, respond_by))["deemed_agreed"] == 0
    assert (await _sweep(funds, respond_by + dt.timedelta(days=1)))["deemed_agreed"] == 1
    r = await funds.client.get("/refunds", headers=auth(parent))
    assert r.json()[0]["status"] == "deemed_agreed"
    assert (await _sweep(funds, due_by))["overdue"] == 0
    assert (await _sweep(funds, due_by + dt.timedelta(days=1)))["overdue"] == 1
    assert (await _sweep(funds, due_by + dt.timedelta(days=2)))["overdue"] == 0  # once
    events = await _events(funds, "funds.refund.overdue.v1")
    assert events[0]["refund_id"] == refund["id"] and events[0]["amount_fen"] == 40000
    # The bank can execute a deemed-agreed refund.
    r = await funds.post(
        f"/bank/refunds/{refund['id']}/execute", funds.bank_token, {"bank_ref": "RF-9"}, signed=True
    )
    assert r.status_code == 200 and r.json()["paid_fen"] == 40000


async def test_fund06_objection_goes_to_the_regulator(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=4)
    refund = (await funds.post(f"/contracts/{contract['id']}/refunds", parent, {})).json()
    i1 = funds.mint("institution", tenants=["institution:i1"])
    r = await funds.client.post(
        f"/refunds/{refund['id']}/answer",
        json={"agree": False, "answer": "已排课"},
        headers=auth(i1),
    )
    assert r.json()["status"] == "objected"
    other_region = funds.mint("regulator", tenants=["region:wangcheng"])
    r = await funds.client.post(
        f"/refunds/{refund['id']}/decision", json={"approve": True}, headers=auth(other_region)
    )
    assert r.status_code == 404
    regulator = funds.mint("regulator", tenants=["region:jinhua"])
    r = await funds.client.post(
        f"/refunds/{refund['id']}/decision", json={"approve": True}, headers=auth(regulator)
    )
    assert r.status_code == 200 and r.json()["status"] == "approved"


async def test_fund07_unfreeze_resumes_releases(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=3)
    lesson = (await funds.report(contract["id"], "i1")).json()

    async def state(want: str) -> bool:
        acc = await funds.account_row("i1")
        return acc is not None and acc.state == want

    await funds.event_and_wait(
        inst.Blacklisted(
            **facts("i1", status="licensed", blacklisted=True, can_charge=False, reason="严重违规"),
            listed_on=today_in_china(),
        ),
        lambda: state("frozen"),
    )
    assert (await funds.answer(lesson["id"], parent)).json()["released"] is False
    r = await funds.pay({"id": contract["id"], "total_fen": 30000})
    assert r.status_code in (409, 422)  # already paid / frozen
    await funds.event_and_wait(
        inst.Delisted(**facts("i1", reason="移出黑名单"), delisted_on=today_in_china()),
        lambda: state("active"),
    )
    # The plan's refund stays approved: cancel nothing; catch-up releases the confirmed lesson.
    result = await _sweep(funds, today_in_china())
    assert result["released_contracts"] == 1
    assert await funds.balance(ledger.releasable("i1")) == 9000
    await funds.check_books()


async def test_fund04_train_first_pay_later(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.buy(
        parent, funds.purchase_body("i1", "c1", "s1", lessons=3, mode="train_first")
    )
    assert contract["status"] == "active"  # no prepayment
    lesson = (await funds.report(contract["id"], "i1")).json()
    assert (await funds.answer(lesson["id"], parent)).status_code == 200
    assert await funds.balance(ledger.releasable("i1")) == 0  # nothing paid yet
    r = await funds.pay(contract, amount=10000)  # the parent pays for the lesson taken
    assert r.status_code == 201, r.text
    assert await funds.balance(ledger.releasable("i1")) == 9000
    assert await funds.balance(ledger.reserve(contract["id"])) == 1000
    r = await funds.pay(contract, amount=30000)  # more than is left to pay
    assert r.status_code == 422 and r.json()["rule"] == "FUND-04"
    await funds.check_books()


async def test_fund04_staged_release_profile(funds: Funds, tmp_path: Path) -> None:
    # A region profile with 30 % / 30 % / 40 % staged release.
    for f in POLICY_DIR.glob("*.toml"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "jinhua.toml").write_text(
        (tmp_path / "jinhua.toml").read_text()
        + '\n[[amendments]]\neffective_from = 2025-01-01\nsource = "test"\n'
        + '[amendments.funds]\nrelease_mode = "staged"\nrelease_stages = [0.3, 0.3, 0.4]\n'
    )
    funds.svc.ctx.policies = PolicyRegistry.load(tmp_path)
    assert funds.svc.ctx.policies.profile("jinhua").funds.release_stages == (
        Decimal("0.3"),
        Decimal("0.3"),
        Decimal("0.4"),
    )
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=6)
    released = []
    for _ in range(6):
        lesson = (await funds.report(contract["id"], "i1")).json()
        assert (await funds.answer(lesson["id"], parent)).status_code == 200
        released.append(await funds.balance(ledger.releasable("i1")))
    # 18000 at 2 lessons (less 10 % reserve), 36000 at 4, all 60000 at the end.
    assert released == [0, 16200, 16200, 32400, 32400, 60000]
    await funds.check_books()


async def test_fund08_refund_spike_and_large_movement_alerts(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", *(f"s{i}" for i in range(4)))
    contracts = [
        await funds.paid_contract(parent, "i1", "c1", f"s{i}", lessons=2) for i in range(4)
    ]
    for c in contracts[:2]:
        assert (await funds.post(f"/contracts/{c['id']}/refunds", parent, {})).status_code == 201
    regulator = funds.mint("regulator", tenants=["region:jinhua"])
    alerts = (await funds.client.get("/alerts", headers=auth(regulator))).json()
    assert [a["kind"] for a in alerts] == ["refund_spike"]  # 2 of 4 contracts ≥ 20 %
    other = funds.mint("regulator", tenants=["region:wangcheng"])
    assert (await funds.client.get("/alerts", headers=auth(other))).json() == []
    events = await _events(funds, "funds.risk.alert.v1")
    assert events[0]["kind"] == "refund_spike"


async def test_fund08_reconciliation_reports_every_mismatch(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1", "s2", "s3")
    c1 = await funds.buy(parent, funds.purchase_body("i1", "c1", "s1", lessons=2))
    c2 = await funds.buy(parent, funds.purchase_body("i1", "c1", "s2", lessons=3))
    c3 = await funds.buy(parent, funds.purchase_body("i1", "c1", "s3", lessons=1))
    refs = {}
    for c in (c1, c2, c3):
        body = {
            "contract_id": c["id"],
            "amount_fen": c["total_fen"],
            "bank_ref": f"B-{c['id'][:6]}",
            "payer_account": "6217000011112222",
        }
        r = await funds.post("/bank/payments", funds.bank_token, body, signed=True)
        assert r.status_code == 201
        refs[c["id"]] = body["bank_ref"]
    from services.funds.service import today_in_china

    day = today_in_china()
    csv_text = "bank_ref,kind,amount_fen\n"
    csv_text += f"{refs[c1['id']]},payment,20000\n"  # matches
    csv_text += f"{refs[c2['id']]},payment,29999\n"  # amount differs
    csv_text += "B-unknown,payment,5000\n"  # not in the journal
    # c3's payment is missing from the statement.
    headers = {**auth(funds.bank_token), "Idempotency-Key": "stmt-1", "Content-Type": "text/csv"}
    r = await funds.client.post(
        f"/bank/statements?statement_date={day.isoformat()}",
        content=csv_text.encode(),
        headers=headers,
    )
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["lines"] == 3 and rec["matched"] == 1
    problems = sorted((m["problem"], m["bank_ref"]) for m in rec["mismatches"])
    assert problems == sorted(
        [
            ("amount_differs", refs[c2["id"]]),
            ("missing_in_journal", "B-unknown"),
            ("missing_in_statement", refs[c3["id"]]),
        ]
    )
    # A replay of the upload answers the same, byte for byte.
    again = await funds.client.post(
        f"/bank/statements?statement_date={day.isoformat()}",
        content=csv_text.encode(),
        headers=headers,
    )
    assert again.content == r.content
    # A malformed statement is a 422 with field errors, nothing stored.
    r = await funds.client.post(
        f"/bank/statements?statement_date={day.isoformat()}",
        content=b"ref;amount\nx;1\n",
        headers={**headers, "Idempotency-Key": "stmt-2"},
    )
    assert r.status_code == 422 and r.json()["errors"]
    _ = json


async def test_fund08_large_movement_alert_from_profile(funds: Funds, tmp_path: Path) -> None:
    for f in POLICY_DIR.glob("*.toml"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "jinhua.toml").write_text(
        (tmp_path / "jinhua.toml").read_text()
        + '\n[[amendments]]\neffective_from = 2025-01-01\nsource = "test"\n'
        + "[amendments.funds.risk_alerts]\nlarge_movement_fen = 15000\n"
    )
    funds.svc.ctx.policies = PolicyRegistry.load(tmp_path)
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=2)
    for _ in range(2):
        lesson = (await funds.report(contract["id"], "i1")).json()
        assert (await funds.answer(lesson["id"], parent)).status_code == 200
    r = await funds.post("/payouts/batches", funds.bank_token, {"bank_id": "bank-a"})
    assert r.status_code == 201 and r.json()[0]["amount_fen"] == 20000
    alerts = (await funds.client.get("/alerts", headers=auth(funds.auditor))).json()
    assert [a["kind"] for a in alerts] == ["large_movement"]
    assert alerts[0]["facts"]["amount_fen"] == 20000
