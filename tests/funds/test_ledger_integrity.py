"""FUND-09: append-only, tamper-evident journal; a crash leaves no half transaction."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from services.funds import ledger
from services.funds.ledger import LedgerError, Leg, Posting
from services.funds.models import JournalEntry
from tests.funds.harness import Funds
from tests.support import auth

REPO = Path(__file__).resolve().parents[2]


async def _post_some(funds: Funds, n: int) -> None:
    async with funds.db.transaction() as s:
        for i in range(n):
            await ledger.post(
                s,
                Posting(
                    kind="payment",
                    ref=f"t-{i}",
                    memo="测试",
                    legs=[
                        Leg(ledger.PARENT_PAYMENTS, -(1000 + i)),
                        Leg(ledger.escrow(f"c{i % 3}"), 1000 + i, "i1", f"c{i % 3}"),
                    ],
                ),
            )


async def _chain(funds: Funds) -> dict:  # type: ignore[type-arg]
    r = await funds.client.get("/audit/chain", headers=auth(funds.auditor))
    assert r.status_code == 200
    return r.json()


async def test_fund09_unbalanced_or_fractional_postings_are_refused(funds: Funds) -> None:
    bad = [
        [Leg(ledger.PARENT_PAYMENTS, -100), Leg(ledger.escrow("c"), 99)],
        [Leg(ledger.PARENT_PAYMENTS, -100)],
        [Leg(ledger.PARENT_PAYMENTS, -1.5), Leg(ledger.escrow("c"), 1.5)],  # type: ignore[arg-type]
        [Leg(ledger.PARENT_PAYMENTS, 0), Leg(ledger.escrow("c"), 0)],
        # An escrow balance may never go negative.
        [Leg(ledger.escrow("c"), -100), Leg(ledger.releasable("i"), 100)],
    ]
    for legs in bad:
        with pytest.raises(LedgerError):
            async with funds.db.transaction() as s:
                await ledger.post(s, Posting(kind="x", ref="r", memo="m", legs=legs))
    chain = await _chain(funds)
    assert chain["ok"] and chain["transactions"] == 0


async def test_fund09_journal_rows_cannot_be_updated_or_deleted(funds: Funds) -> None:
    await _post_some(funds, 3)
    for statement in (
        "UPDATE journal_entries SET amount_fen = amount_fen + 1 WHERE seq = 2",
        "DELETE FROM journal_entries WHERE seq = 3",
        "UPDATE journal_transactions SET memo = 'x' WHERE seq = 1",
        "DELETE FROM journal_transactions WHERE seq = 3",
    ):
        with pytest.raises((DBAPIError, IntegrityError)):
            async with funds.db.transaction() as s:
                await s.execute(text(statement))
    assert (await _chain(funds))["ok"]


async def _drop_guards(funds: Funds) -> None:
    """What someone with owner rights on the database could do."""
    async with funds.db.transaction() as s:
        if funds.db.is_sqlite:
            for t in ("journal_transactions", "journal_entries"):
                await s.execute(text(f"DROP TRIGGER {t}_no_update"))
                await s.execute(text(f"DROP TRIGGER {t}_no_delete"))
        else:
            for t in ("journal_transactions", "journal_entries"):
                await s.execute(text(f"DROP TRIGGER {t}_append_only ON {t}"))


async def test_fund09_editing_one_row_by_hand_is_named_by_the_verifier(funds: Funds) -> None:
    await _post_some(funds, 6)
    chain = await _chain(funds)
    assert chain == {**chain, "ok": True, "transactions": 6, "head_seq": 6}
    await _drop_guards(funds)
    # A balanced edit of transaction 4 (both legs changed): still sums to zero.
    async with funds.db.transaction() as s:
        await s.execute(
            text("UPDATE journal_entries SET amount_fen = amount_fen * 2 WHERE seq = 4")
        )
    chain = await _chain(funds)
    assert not chain["ok"] and chain["first_broken_seq"] == 4
    assert "哈希" in chain["problem"]
    # Restore and edit a transaction's header instead.
    async with funds.db.transaction() as s:
        await s.execute(
            text("UPDATE journal_entries SET amount_fen = amount_fen / 2 WHERE seq = 4")
        )
    assert (await _chain(funds))["ok"]
    async with funds.db.transaction() as s:
        await s.execute(text("UPDATE journal_transactions SET ref = 'forged' WHERE seq = 2"))
    chain = await _chain(funds)
    assert chain["first_broken_seq"] == 2
    async with funds.db.transaction() as s:
        await s.execute(text("UPDATE journal_transactions SET ref = 't-1' WHERE seq = 2"))
    # An unbalanced edit is named too, and the trial balance sees the cache mismatch.
    async with funds.db.transaction() as s:
        await s.execute(text("UPDATE journal_entries SET amount_fen = 1 WHERE seq = 5 AND leg = 1"))
    chain = await _chain(funds)
    assert chain["first_broken_seq"] == 5 and "不平" in chain["problem"]
    r = await funds.client.get("/audit/trial-balance", headers=auth(funds.auditor))
    tb = r.json()
    assert not tb["ok"] and tb["total_fen"] != 0 and tb["mismatched"]


async def test_fund09_deleted_transaction_breaks_the_sequence(funds: Funds) -> None:
    await _post_some(funds, 5)
    await _drop_guards(funds)
    async with funds.db.transaction() as s:
        await s.execute(text("DELETE FROM journal_entries WHERE seq = 3"))
        await s.execute(text("DELETE FROM journal_transactions WHERE seq = 3"))
    chain = await _chain(funds)
    assert not chain["ok"] and chain["first_broken_seq"] == 3


async def test_fund09_killed_writer_leaves_no_half_transaction(funds: Funds) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _round in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.funds.posting_process", funds.db.url],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        committed = 0
        while committed < 40 and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                break
            if line.strip().isdigit():
                committed = int(line)
        assert committed >= 40, f"writer did not get going (last: {line!r})"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    chain = await _chain(funds)
    assert chain["ok"], chain
    assert chain["transactions"] >= 120
    r = await funds.client.get("/audit/trial-balance", headers=auth(funds.auditor))
    assert r.json()["ok"], r.json()
    async with funds.db.read() as s:
        legs = (await s.execute(select(JournalEntry.seq))).scalars().all()
    # Every transaction has all three legs; none has a part.
    counts: dict[int, int] = {}
    for seq in legs:
        counts[seq] = counts.get(seq, 0) + 1
    assert set(counts.values()) == {3} and len(counts) == chain["transactions"]


_text = st.text(max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(min_value=1, max_value=2**62),
    prev=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    kind=_text,
    ref=_text,
    memo=_text,
    bank_ref=st.none() | _text,
    bank_id=st.none() | _text,
    offset_minutes=st.integers(min_value=-720, max_value=840),
    micros=st.integers(min_value=0, max_value=10**15),
    legs=st.lists(
        st.tuples(st.text(max_size=20), st.integers(min_value=-(2**62), max_value=2**62)),
        min_size=2,
        max_size=5,
    ),
)
def test_fund09_fast_canonical_hash_equals_the_reference_encoding(
    seq: int,
    prev: str,
    kind: str,
    ref: str,
    memo: str,
    bank_ref: str | None,
    bank_id: str | None,
    offset_minutes: int,
    micros: int,
    legs: list[tuple[str, int]],
) -> None:
    """FUND-09: the posting path's hand-written canonical JSON hashes to exactly
    what ``transaction_hash`` (json.dumps of the sorted dict, which the
    verifier uses) gives, for any text (quotes, escapes, CJK, control
    characters), so chains written by either verify with both."""
    zone = dt.timezone(dt.timedelta(minutes=offset_minutes))
    at = dt.datetime(2020, 1, 1, tzinfo=dt.UTC).astimezone(zone) + dt.timedelta(microseconds=micros)
    numbered = [(i, account, amount) for i, (account, amount) in enumerate(reversed(legs))]
    reference = ledger.transaction_hash(
        seq=seq,
        prev_hash=prev,
        kind=kind,
        ref=ref,
        memo=memo,
        bank_ref=bank_ref,
        bank_id=bank_id,
        posted_at=at,
        legs=numbered,
    )
    fast = ledger.canonical_hash(seq, prev, kind, ref, memo, bank_ref, bank_id, at, numbered)
    assert fast == reference
