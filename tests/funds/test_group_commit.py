"""Group commit of money-moving requests (FUND-09): requests waiting together
share one transaction; a failed group leaves no partial posting and every
waiting request gets a clear answer."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import utcnow
from chassis.idempotency import IdempotentRequest
from chassis.messaging import idempotency_table
from services.funds import ledger
from services.funds.ledger import Leg, Posting
from services.funds.models import JournalTransaction
from services.funds.writer import PostingWriter
from tests.funds.harness import Funds


def _claim(key: str) -> IdempotentRequest:
    return IdempotentRequest("group-test", key, uuid.uuid4().hex * 2, utcnow())


def _posting(ref: str) -> Posting:
    return Posting(
        kind="payment",
        ref=ref,
        memo="group commit test",
        legs=[Leg(ledger.PARENT_PAYMENTS, -100), Leg(ledger.escrow(ref), 100, None, None)],
    )


async def _journal_refs(funds: Funds) -> list[str]:
    async with funds.db.read() as s:
        return list((await s.execute(select(JournalTransaction.ref))).scalars())


async def test_fund09_waiting_requests_share_one_commit(funds: Funds) -> None:
    writer: PostingWriter = funds.svc.ctx.extras["posting_writer"]
    before = writer.stats.groups

    def work(ref: str) -> Any:
        async def run(session: AsyncSession) -> dict[str, Any]:
            posted = await ledger.post(session, _posting(ref))
            return {"ref": ref, "seq": posted.seq}

        return run

    refs = [f"g-{i}" for i in range(20)]
    replies = await asyncio.gather(*(writer.submit(_claim(r), work(r)) for r in refs))
    assert [json.loads(r.body)["ref"] for r in replies] == refs
    seqs = [json.loads(r.body)["seq"] for r in replies]
    assert seqs == list(range(seqs[0], seqs[0] + 20))  # chained in arrival order
    assert writer.stats.groups - before < 20  # grouped, not one commit each
    async with funds.db.read() as s:
        assert (await ledger.verify_chain(s)).ok
        assert (await ledger.trial_balance(s)).ok


async def test_fund09_failed_group_leaves_no_partial_posting(funds: Funds) -> None:
    writer: PostingWriter = funds.svc.ctx.extras["posting_writer"]
    failed_before = writer.stats.failed_groups

    def good(ref: str) -> Any:
        async def run(session: AsyncSession) -> dict[str, Any]:
            await ledger.post(session, _posting(ref))
            return {"ref": ref}

        return run

    async def saboteur(session: AsyncSession) -> dict[str, Any]:
        """Posts, then makes its whole transaction fail (a real failure: the
        connection dies on PostgreSQL; a deferred foreign key fails the commit
        on SQLite)."""
        await ledger.post(session, _posting("bad"))
        if funds.db.is_sqlite:
            await session.execute(text("PRAGMA defer_foreign_keys = ON"))
            await session.execute(
                text(
                    "INSERT INTO lessons (id, contract_id, institution_id, seq, delivered_on,"
                    " reported_at, auto_confirm_on, status, released, dispute_overdue_reported)"
                    " VALUES ('x', 'no-such-contract', 'i', 1, '2026-01-01',"
                    " '2026-01-01 00:00:00', '2026-01-01', 'reported', 0, 0)"
                )
            )
        else:
            await session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return {"ref": "bad"}

    refs = ["ok-1", "ok-2", "ok-3", "ok-4"]
    submissions = [writer.submit(_claim(r), good(r)) for r in refs[:2]]
    submissions.append(writer.submit(_claim("bad"), saboteur))
    submissions += [writer.submit(_claim(r), good(r)) for r in refs[2:]]
    replies = await asyncio.gather(*submissions, return_exceptions=True)

    # Every request has an answer: the good ones done (each re-run alone
    # after the group failed), the saboteur a 503 asking for a retry.
    assert writer.stats.failed_groups > failed_before
    ok = [replies[i] for i in (0, 1, 3, 4)]
    assert all(getattr(r, "status_code", None) == 200 for r in ok), replies
    assert [json.loads(r.body)["ref"] for r in ok] == refs  # type: ignore[union-attr]
    bad = replies[2]
    assert getattr(bad, "status_code", None) == 503, bad
    assert bad.headers["Retry-After"]  # type: ignore[union-attr]
    # No partial posting: exactly the good ones are in the journal, once each.
    journal = await _journal_refs(funds)
    assert sorted(r for r in journal if r.startswith(("ok-", "bad"))) == refs
    async with funds.db.read() as s:
        assert (await ledger.verify_chain(s)).ok
        assert (await ledger.trial_balance(s)).ok
        stored = dict(
            (
                await s.execute(
                    select(idempotency_table.c.key, idempotency_table.c.status).where(
                        idempotency_table.c.client == "group-test"
                    )
                )
            ).all()
        )
        assert stored == {r: "done" for r in refs}  # the saboteur's key is free for a retry
        lessons = await s.scalar(text("SELECT count(*) FROM lessons WHERE id = 'x'"))
        assert lessons == 0
        assert (await s.scalar(select(func.count()).select_from(JournalTransaction))) == len(
            journal
        )


async def test_fund04_fund09_concurrent_confirmations_answered_setwise(funds: Funds) -> None:
    """Parents' single confirmations waiting together are answered set-wise:
    each gets its own reply (its lesson, a refusal, or the replay of its key),
    every lesson is released exactly once (FUND-04), the books balance."""
    writer: PostingWriter = funds.svc.ctx.extras["posting_writer"]
    before = writer.stats.setwise
    await funds.ready_institution("i1", "c1", price=10000)
    parent = await funds.family("g1", "s1", "s2")
    stranger = await funds.family("g2", "s9")
    c1 = await funds.paid_contract(parent, "i1", "c1", "s1", lessons=10)
    c2 = await funds.paid_contract(parent, "i1", "c1", "s2", lessons=10)
    lessons = [(await funds.report(c["id"], "i1")).json() for c in (c1, c2) for _ in range(8)]
    calls = [
        funds.post(f"/lessons/{x['id']}/answer", parent, {"confirm": True}, key=x["id"])
        for x in lessons
    ]
    # The same key twice (a retry), a second tap with a new key, a stranger.
    calls.append(
        funds.post(
            f"/lessons/{lessons[0]['id']}/answer", parent, {"confirm": True}, key=lessons[0]["id"]
        )
    )
    calls.append(funds.post(f"/lessons/{lessons[1]['id']}/answer", parent, {"confirm": True}))
    calls.append(funds.post(f"/lessons/{lessons[2]['id']}/answer", stranger, {"confirm": True}))
    replies = await asyncio.gather(*calls)
    assert [r.status_code for r in replies[:16]] == [200] * 16, [r.text for r in replies]
    assert all(r.json()["status"] == "confirmed" and r.json()["released"] for r in replies[:16])
    assert replies[16].status_code == 200 and replies[16].content == replies[0].content
    assert replies[17].status_code == 409 and replies[17].json()["rule"] == "FUND-04"
    assert replies[18].status_code == 404
    assert writer.stats.setwise > before  # the set-wise path answered some of them
    # 8 lessons × 100 yuan released per contract, 10 % kept in the reserve.
    for c in (c1, c2):
        assert await funds.balance(ledger.escrow(c["id"])) == 20000
        assert await funds.balance(ledger.reserve(c["id"])) == 8000
    assert await funds.balance(ledger.releasable("i1")) == 2 * 72000
    # A repeat later replays the stored reply byte for byte.
    again = await funds.post(
        f"/lessons/{lessons[5]['id']}/answer", parent, {"confirm": True}, key=lessons[5]["id"]
    )
    assert again.content == replies[5].content
    await funds.check_books()


async def test_fund09_plain_work_through_the_writer_answers_or_raises(funds: Funds) -> None:
    """The periodic sweep's way in (no key): its result once committed; its
    own failure is raised to it and leaves nothing behind (FUND-09)."""
    writer: PostingWriter = funds.svc.ctx.extras["posting_writer"]

    async def posts(session: AsyncSession) -> int:
        return (await ledger.post(session, _posting("plain-ok"))).seq

    async def fails(session: AsyncSession) -> int:
        await ledger.post(session, _posting("plain-bad"))
        raise RuntimeError("boom")

    ok, bad = await asyncio.gather(writer.run(posts), writer.run(fails), return_exceptions=True)
    assert isinstance(ok, int) and ok > 0
    assert isinstance(bad, RuntimeError)
    journal = await _journal_refs(funds)
    assert "plain-ok" in journal and "plain-bad" not in journal
    async with funds.db.read() as s:
        assert (await ledger.verify_chain(s)).ok
