"""FUND-08: the sweep's risk scan finds money that left escrow without a confirmed lesson."""

from __future__ import annotations

from services.funds import ledger
from services.funds.ledger import Leg, Posting
from services.funds.service import today_in_china
from tests.funds.harness import Funds
from tests.support import auth


async def test_fund08_release_without_confirmed_lesson_and_liabilities_alerts(
    funds: Funds,
) -> None:
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1")
    contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=3)
    cid = contract["id"]
    bureau = funds.mint("bureau", tenants=["region:jinhua"])
    r = await funds.client.post(
        "/ops/sweep", json={"as_of": today_in_china().isoformat()}, headers=auth(bureau)
    )
    assert r.json()["alerts"] == 0
    # A balanced release posted behind the rules' back (no lesson confirmed).
    async with funds.db.transaction() as s:
        await ledger.post(
            s,
            Posting(
                kind="release",
                ref=cid,
                memo="违规划转",
                legs=[
                    Leg(ledger.escrow(cid), -15000, "i1", cid),
                    Leg(ledger.releasable("i1"), 15000, "i1"),
                ],
            ),
        )
    r = await funds.client.post(
        "/ops/sweep", json={"as_of": today_in_china().isoformat()}, headers=auth(bureau)
    )
    assert r.json()["alerts"] == 2
    alerts = (await funds.client.get("/alerts", headers=auth(bureau))).json()
    kinds = sorted(a["kind"] for a in alerts)
    assert kinds == ["liabilities_exceed_balance", "release_without_confirmed_lesson"]
    by_kind = {a["kind"]: a for a in alerts}
    assert by_kind["liabilities_exceed_balance"]["facts"] == {
        "liabilities_fen": 30000,
        "held_fen": 15000,
    }
    # Raised once per day, not on every sweep.
    r = await funds.client.post(
        "/ops/sweep", json={"as_of": today_in_china().isoformat()}, headers=auth(bureau)
    )
    assert r.json()["alerts"] == 0
    # The books still balance: the journal itself is consistent, the rules were not.
    await funds.check_books()


async def test_fund08_sweep_runs_on_its_own_schedule(
    start_service,
    mint,
    nats_server,
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    from tests.funds.harness import Funds as Harness
    from tests.support import eventually

    monkeypatch.setenv("FUNDS_JOB_INTERVALS", '{"sweep": 0.3}')
    funds = Harness(await start_service("funds"), mint, nats_server.url)
    try:
        await funds.ready_institution("i1", "c1", price=10000)
        parent = await funds.family("g1", "s1")
        contract = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=2)
        async with funds.db.transaction() as s:
            await ledger.post(
                s,
                Posting(
                    kind="release",
                    ref=contract["id"],
                    memo="违规划转",
                    legs=[
                        Leg(ledger.escrow(contract["id"]), -5000, "i1", contract["id"]),
                        Leg(ledger.releasable("i1"), 5000, "i1"),
                    ],
                ),
            )

        async def alerted() -> bool:
            r = await funds.client.get("/alerts", headers=auth(funds.auditor))
            return len(r.json()) == 2

        await eventually(alerted)
    finally:
        await funds.close()
