"""Two replicas of funds on one database (FUND-04, FUND-06, FUND-09): each has
its own group-commit writer and connection pool, so their groups race for the
same ledger heads in the database — PostgreSQL may abort one group as a
deadlock, which must then be decided again without losing or doubling money.
Every lesson is confirmed through both replicas (a double tap landing on
each), refunds are asked through both. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from tests.funds.harness import Funds

FAMILIES = 4
LESSONS = 10


async def test_fund04_fund06_fund09_two_replicas_race_for_the_same_ledger(
    funds: Funds, start_service, mint, nats_server
) -> None:
    second = Funds(await start_service("funds"), mint, nats_server.url)
    assert second.db is not funds.db  # its own engine and pool, the same database
    try:
        await funds.ready_institution("i1", "c1", price=10000)
        contracts = []
        for n in range(FAMILIES):
            parent = await funds.family(f"g{n}", f"s{n}")
            contract = await funds.paid_contract(parent, "i1", "c1", f"s{n}", lessons=2 * LESSONS)
            lessons = [(await funds.report(contract["id"], "i1")).json() for _ in range(LESSONS)]
            contracts.append((parent, contract, lessons))
        calls = []
        for parent, contract, lessons in contracts:
            for replica in (funds, second):
                calls += [replica.answer(lesson["id"], parent) for lesson in lessons]
                calls += [
                    replica.post(f"/contracts/{contract['id']}/refunds", parent, {})
                    for _ in range(3)
                ]
        random.Random(11).shuffle(calls)
        results = await asyncio.gather(*calls)
        # Both writers committed groups of their own: the race was real.
        writers = [h.svc.ctx.extras["posting_writer"].stats for h in (funds, second)]
        assert all(stats.groups > 0 for stats in writers)

        assert all(r.status_code in (200, 201, 409) for r in results), [
            r.text for r in results if r.status_code not in (200, 201, 409)
        ]
        refunds = Counter(r.json()["contract_id"] for r in results if r.status_code == 201)
        # Exactly one refund per contract, whichever replica took it.
        assert refunds == {contract["id"]: 1 for _, contract, _ in contracts}
        confirmed = [r.json() for r in results if r.status_code == 200]
        # Each lesson confirmed exactly once across both replicas.
        assert len(confirmed) == FAMILIES * LESSONS
        assert len({c["id"] for c in confirmed}) == FAMILIES * LESSONS
        # Every refusal names its rule: nothing failed for want of a retry.
        assert all(r.json().get("rule") for r in results if r.status_code == 409)
        # The journal sums to zero, caches match entries, the chain verifies —
        # read through either replica.
        await funds.check_books()
        await second.check_books()
    finally:
        await second.close()
