"""Refusals with rule ids, idempotency, signed callbacks and object-level
authorization through the HTTP API (FUND-01..03, FUND-07, FUND-09, GW-03, X-03)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

from sqlalchemy import func, select

from contracts import institutions as inst
from services.funds.api import sign
from services.funds.models import Contract, JournalTransaction
from tests.funds.harness import TODAY, Funds, facts
from tests.support import auth, eventually


async def test_fund02_purchase_refusals_carry_rule_ids(funds: Funds) -> None:
    parent = await funds.family("g1", "s1")
    # Unknown institution: not licensed.
    r = await funds.post("/contracts", parent, funds.purchase_body("ix", "cx", "s1"))
    assert r.status_code == 422 and r.json()["rule"] == "FUND-02"
    assert r.headers["content-type"].startswith("application/problem+json")
    # Licensed but without an escrow account (FUND-01).
    await funds.license("i1")
    await funds.file_course("i1", "c1", price=10000)
    r = await funds.post("/contracts", parent, funds.purchase_body("i1", "c1", "s1"))
    assert r.status_code == 422 and r.json()["rule"] == "FUND-01"
    await funds.open_account("i1")
    cases = [
        (funds.purchase_body("i1", "c-unfiled", "s1"), "FUND-02"),
        (funds.purchase_body("i1", "c1", "s1", price=9000), "FUND-02"),
        (funds.purchase_body("i1", "c1", "s1", lessons=51), "FUND-02"),  # 5100 yuan
        (
            funds.purchase_body(
                "i1", "c1", "s1", ends_on=(TODAY + dt.timedelta(days=100)).isoformat()
            ),
            "FUND-02",
        ),
    ]
    for body, rule in cases:
        r = await funds.post("/contracts", parent, body)
        assert r.status_code == 422, r.text
        assert r.json()["rule"] == rule
        assert r.json()["detail"]  # zh-CN reason
    # Nothing was written by the refusals.
    async with funds.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(Contract)) == 0
    # Someone else's child looks missing (GW-03).
    r = await funds.post("/contracts", parent, funds.purchase_body("i1", "c1", "s-other"))
    assert r.status_code == 404
    # Bad input: field errors, no 500.
    r = await funds.post("/contracts", parent, {"institution_id": "i1", "lessons": "many"})
    assert r.status_code == 422 and r.json()["errors"]
    # The valid purchase.
    r = await funds.post("/contracts", parent, funds.purchase_body("i1", "c1", "s1", lessons=50))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "pending_payment" and r.json()["total_fen"] == 500000


async def test_inst02_not_reregistered_institution_cannot_sell(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1")
    parent = await funds.family("g1", "s1")

    async def pending() -> bool:
        row = await funds.institution("i1")
        return row is not None and row.reregistration_pending

    await funds.event_and_wait(
        inst.LicenceTransformed(
            **facts("i1", category="subject", reregistration_pending=True, can_charge=False),
            transformation="to_non_profit",
            previous_category="subject",
            previous_profit_status="for_profit",
        ),
        pending,
    )
    r = await funds.post("/contracts", parent, funds.purchase_body("i1", "c1", "s1"))
    assert r.status_code == 422 and r.json()["rule"] == "INST-02"


async def test_fund03_contract_document_on_the_standard_template(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1")
    parent = await funds.family("g1", "s1")
    contract = await funds.buy(parent, funds.purchase_body("i1", "c1", "s1", lessons=12))
    r = await funds.client.get(f"/contracts/{contract['id']}/document", headers=auth(parent))
    assert r.status_code == 200
    text = r.text
    assert "示范文本" in text and "12 课时" in text and "1200.00 元" in text
    assert "退费金额 = 未消课时数 × 课时单价" in text and contract["id"] in text


async def test_fund02_an_expired_licence_cannot_sell(funds: Funds) -> None:
    parent = await funds.family("g1", "s1")
    await funds.ready_institution("i1", "c1")
    yesterday = TODAY - dt.timedelta(days=1)
    await funds.license("i1", licence_valid_until=yesterday.isoformat())

    async def expiry_seen() -> bool:
        row = await funds.institution("i1")
        return row is not None and row.licence_valid_until == yesterday

    await eventually(expiry_seen)
    r = await funds.post("/contracts", parent, funds.purchase_body("i1", "c1", "s1"))
    assert r.status_code == 422 and r.json()["rule"] == "FUND-02", r.text
    assert r.json()["licence_valid_until"] == yesterday.isoformat()
    # Renewed: the same institution sells again.
    renewed = TODAY + dt.timedelta(days=365)
    await funds.license("i1", licence_valid_until=renewed.isoformat())

    async def renewal_seen() -> bool:
        row = await funds.institution("i1")
        return row is not None and row.licence_valid_until == renewed

    await eventually(renewal_seen)
    r = await funds.post("/contracts", parent, funds.purchase_body("i1", "c1", "s1"))
    assert r.status_code == 201, r.text


async def test_fund02_money_enters_escrow_only_on_signed_bank_confirmation(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1")
    parent = await funds.family("g1", "s1")
    contract = await funds.buy(parent, funds.purchase_body("i1", "c1", "s1", lessons=3))
    body = {
        "contract_id": contract["id"],
        "amount_fen": 30000,
        "bank_ref": "PAY-1",
        "payer_account": "6217000011112222",
    }
    raw = json.dumps(body).encode()
    base = {**auth(funds.bank_token), "Content-Type": "application/json"}
    # Unsigned, badly signed, stale: refused, nothing moves.
    for signature in (
        None,
        "t=1,v1=00",
        sign("wrong-secret", int(time.time()), raw),
        sign("dev-only-bank-callback-secret", int(time.time()) - 3600, raw),
    ):
        headers = {**base, "Idempotency-Key": str(uuid.uuid4())}
        if signature:
            headers["X-Bank-Signature"] = signature
        r = await funds.client.post("/bank/payments", content=raw, headers=headers)
        assert r.status_code == 401 and r.json()["rule"] == "FUND-09"
    async with funds.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(JournalTransaction)) == 0
    # The parent cannot confirm a payment.
    r = await funds.post("/bank/payments", parent, body, signed=True)
    assert r.status_code == 403
    # A different bank does not hold this account.
    other = funds.mint("bank", tenants=["bank:bank-b"])
    r = await funds.post("/bank/payments", other, body, signed=True)
    assert r.status_code == 404
    # Wrong amount.
    r = await funds.post(
        "/bank/payments", funds.bank_token, {**body, "amount_fen": 29999}, signed=True
    )
    assert r.status_code == 422 and r.json()["rule"] == "FUND-02"
    r = await funds.post("/bank/payments", funds.bank_token, body, signed=True)
    assert r.status_code == 201, r.text
    assert (await funds.contract(contract["id"]))["status"] == "active"
    # The same bank reference again (new key) is refused: no double credit.
    r = await funds.post("/bank/payments", funds.bank_token, body, signed=True)
    assert r.status_code == 409
    await funds.check_books()


async def test_fund09_idempotency_key_semantics(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1")
    parent = await funds.family("g1", "s1")
    body = funds.purchase_body("i1", "c1", "s1", lessons=2)
    raw = json.dumps(body).encode()
    headers = {**auth(parent), "Content-Type": "application/json"}
    r = await funds.client.post("/contracts", content=raw, headers=headers)
    assert r.status_code == 400  # missing key
    key = {"Idempotency-Key": "k-1"}
    first = await funds.client.post("/contracts", content=raw, headers={**headers, **key})
    assert first.status_code == 201
    again = await funds.client.post("/contracts", content=raw, headers={**headers, **key})
    assert again.status_code == 201 and again.content == first.content
    assert again.headers.get("idempotent-replayed") == "true"
    other = json.dumps({**body, "lessons": 3}).encode()
    r = await funds.client.post("/contracts", content=other, headers={**headers, **key})
    assert r.status_code == 422
    # Keyed per client: another parent may use the same key value.
    parent2 = await funds.family("g2", "s2")
    body2 = json.dumps(funds.purchase_body("i1", "c1", "s2", lessons=2)).encode()
    r = await funds.client.post(
        "/contracts",
        content=body2,
        headers={**auth(parent2), "Content-Type": "application/json", **key},
    )
    assert r.status_code == 201 and r.json()["id"] != first.json()["id"]
    async with funds.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(Contract)) == 2


async def test_gw03_object_level_authorization(funds: Funds) -> None:
    await funds.ready_institution("i1", "c1")
    await funds.license("i2", region_id="wangcheng")
    await funds.file_course("i2", "c2")
    b = funds.mint("bank", tenants=["bank:bank-b"])
    r = await funds.post(
        "/accounts", b, {"institution_id": "i2", "bank_id": "bank-b", "account_number": "62229999"}
    )
    assert r.status_code == 201
    acc2 = r.json()
    p1 = await funds.family("g1", "s1")
    p2 = await funds.family("g2", "s2")
    c1 = await funds.paid_contract(p1, "i1", "c1", "s1", lessons=2)
    c2 = await funds.buy(p2, funds.purchase_body("i2", "c2", "s2", lessons=2))

    async def ids(token: str, path: str = "/contracts") -> set[str]:
        r = await funds.client.get(path, headers=auth(token))
        assert r.status_code == 200, r.text
        return {x["id"] for x in r.json()}

    assert await ids(p1) == {c1["id"]}
    assert await ids(p2) == {c2["id"]}
    r = await funds.client.get(f"/contracts/{c2['id']}", headers=auth(p1))
    assert r.status_code == 404
    i1 = funds.mint("institution", tenants=["institution:i1"])
    assert await ids(i1) == {c1["id"]}
    assert await ids(i1, "/accounts") == {(await funds.account_row("i1")).id}  # type: ignore[union-attr]
    r = await funds.client.get(f"/accounts/{acc2['id']}", headers=auth(i1))
    assert r.status_code == 404
    assert await ids(funds.bank_token) == {c1["id"]}
    assert await ids(b, "/accounts") == {acc2["id"]}
    reg_jinhua = funds.mint("regulator", tenants=["region:jinhua"])
    assert await ids(reg_jinhua) == {c1["id"]}
    assert await ids(funds.auditor) == {c1["id"], c2["id"]}
    # Auditors change nothing.
    r = await funds.post("/contracts", funds.auditor, funds.purchase_body("i1", "c1", "s1"))
    assert r.status_code == 403
    r = await funds.post(
        "/accounts",
        funds.auditor,
        {"institution_id": "i1", "bank_id": "bank-a", "account_number": "1234"},
    )
    assert r.status_code == 403
    # Another institution cannot report lessons on i1's contract; another parent cannot confirm.
    r = await funds.post(
        f"/contracts/{c1['id']}/lessons",
        funds.mint("institution", tenants=["institution:i2"]),
        {"delivered_on": TODAY.isoformat()},
    )
    assert r.status_code == 404
    lesson = (await funds.report(c1["id"], "i1")).json()
    r = await funds.answer(lesson["id"], p2)
    assert r.status_code == 404
    r = await funds.post(f"/contracts/{c1['id']}/refunds", p2, {})
    assert r.status_code == 404
    # Only auditors verify the chain.
    r = await funds.client.get("/audit/chain", headers=auth(p1))
    assert r.status_code == 403


async def test_openapi_documents_the_funds_routes(funds: Funds) -> None:
    r = await funds.client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in (
        "/accounts",
        "/contracts",
        "/bank/payments",
        "/lessons/confirmations",
        "/audit/chain",
        "/bank/statements",
        "/refund-plans/{plan_id}",
    ):
        assert path in paths
