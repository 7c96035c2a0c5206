"""A funds writer process for the crash test (FUND-09).

    python -m tests.funds.posting_process DATABASE_URL

Posts balanced three-leg journal transactions through the service's ledger
in its own transactions, lingering inside each transaction so that a SIGKILL
lands while one is half done. Prints the number committed after each commit.
The database must already be migrated.
"""

from __future__ import annotations

import asyncio
import sys

from chassis.db import Database
from services.funds import ledger
from services.funds.ledger import Leg, Posting


async def main(url: str) -> None:
    db = Database(url, service="funds")
    n = 0
    while True:
        async with db.transaction() as session:
            amount = 100 + n % 900
            await ledger.post(
                session,
                Posting(
                    kind="payment",
                    ref=f"crash-{n}",
                    memo="崩溃测试",
                    legs=[
                        Leg(ledger.PARENT_PAYMENTS, -2 * amount),
                        Leg(ledger.escrow(f"crash-{n % 7}"), amount, "crash", f"crash-{n % 7}"),
                        Leg(ledger.escrow(f"crash-{n % 5}"), amount, "crash", f"crash-{n % 5}"),
                    ],
                ),
            )
            await asyncio.sleep(0.002)  # the kill often lands here, before the commit
        n += 1
        print(n, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
