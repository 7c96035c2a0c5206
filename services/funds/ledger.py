"""The double-entry journal (FUND-09).

Every movement of money is one journal transaction: two or more legs in
integer fen that sum to zero. A positive leg means money arrives in the
account, a negative one that it leaves. Rows are only ever inserted (the code
has no UPDATE or DELETE of journal rows; the migration adds triggers refusing
both). Transactions are numbered without gaps and chained: each carries the
hash of the previous one, so editing, deleting or reordering any row breaks
the chain at that row, and ``verify_chain`` names it.

Posting locks the single ``ledger_head`` row, so the chain has exactly one
writer at a time on PostgreSQL too (SQLite serializes writers anyway). Use
cases lock their own rows (contract, account) first and post last, so the
head is always the last lock taken and no lock cycle can form.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.db import utcnow
from services.funds.models import JournalEntry, JournalTransaction, LedgerAccount, LedgerHead

GENESIS_HASH = "0" * 64

# Account kinds. Balances: money held in that bucket (external clearing
# accounts are the mirror image and go negative).
PARENT_PAYMENTS = "parent_payments"  # 家长缴费（在途/清算）: −(all money paid in)
ESCROW = "escrow"  # per contract: the student's unconsumed prepaid fees (liability)
RESERVE = "reserve"  # per contract: 风险保证金 withheld from releases (FUND-05)
RELEASABLE = "releasable"  # per institution: released, not yet instructed for payout
PAYOUT_INSTRUCTED = "payout_instructed"  # per institution: payout sent to the bank
PAID_OUT = "paid_out"  # per institution: executed payouts
REFUNDS_PAID = "refunds_paid"  # per institution: refunds executed back to parents

NON_NEGATIVE = frozenset({ESCROW, RESERVE, RELEASABLE, PAYOUT_INSTRUCTED, PAID_OUT, REFUNDS_PAID})


class LedgerError(RuntimeError):
    """A posting that would break an invariant (a bug, never user input)."""


def escrow(contract_id: str) -> str:
    return f"{ESCROW}:{contract_id}"


def reserve(contract_id: str) -> str:
    return f"{RESERVE}:{contract_id}"


def releasable(institution_id: str) -> str:
    return f"{RELEASABLE}:{institution_id}"


def payout_instructed(institution_id: str) -> str:
    return f"{PAYOUT_INSTRUCTED}:{institution_id}"


def paid_out(institution_id: str) -> str:
    return f"{PAID_OUT}:{institution_id}"


def refunds_paid(institution_id: str) -> str:
    return f"{REFUNDS_PAID}:{institution_id}"


def kind_of(code: str) -> str:
    return code.split(":", 1)[0]


class Leg(NamedTuple):
    """One leg of a posting (immutable; a tuple: cheap to make by the hundred)."""

    account: str
    amount_fen: int
    institution_id: str | None = None
    contract_id: str | None = None


@dataclass
class Posting:
    kind: str
    ref: str
    memo: str
    legs: list[Leg]
    bank_ref: str | None = None
    bank_id: str | None = None
    seq: int = 0
    hash: str = ""
    posted_at: datetime = field(default_factory=utcnow)


def canonical_time(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def transaction_hash(
    *,
    seq: int,
    prev_hash: str,
    kind: str,
    ref: str,
    memo: str,
    bank_ref: str | None,
    bank_id: str | None,
    posted_at: datetime,
    legs: Sequence[tuple[int, str, int]],
) -> str:
    """SHA-256 over a canonical JSON of the transaction and the previous hash."""
    body = {
        "seq": seq,
        "prev": prev_hash,
        "kind": kind,
        "ref": ref,
        "memo": memo,
        "bank_ref": bank_ref,
        "bank_id": bank_id,
        "at": canonical_time(posted_at),
        "legs": [[leg, account, amount] for leg, account, amount in sorted(legs)],
    }
    raw = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


# The C string encoder ``json.dumps(..., ensure_ascii=False)`` uses.
_str = json.encoder.encode_basestring


def _opt(value: str | None) -> str:
    return "null" if value is None else _str(value)


def canonical_hash(
    seq: int,
    prev_hash: str,
    kind: str,
    ref: str,
    memo: str,
    bank_ref: str | None,
    bank_id: str | None,
    posted_at: datetime,
    legs: Sequence[tuple[int, str, int]],
) -> str:
    """``transaction_hash``, byte for byte the same canonical JSON (keys in
    sorted order, no spaces, non-ASCII kept), written out directly instead
    of through ``json.dumps`` of a dict: the posting hot path hashes every
    transaction. tests/funds/test_ledger_integrity.py checks the two agree."""
    raw = (
        f'{{"at":{_str(canonical_time(posted_at))},"bank_id":{_opt(bank_id)},'
        f'"bank_ref":{_opt(bank_ref)},"kind":{_str(kind)},"legs":['
        + ",".join(
            f"[{leg},{_str(account)},{int(amount)}]" for leg, account, amount in sorted(legs)
        )
        + f'],"memo":{_str(memo)},"prev":{_str(prev_hash)},"ref":{_str(ref)},"seq":{int(seq)}}}'
    )
    return hashlib.sha256(raw.encode()).hexdigest()


def _check_legs(legs: Sequence[Leg]) -> None:
    if len(legs) < 2:
        raise LedgerError("a journal transaction needs at least two legs")
    for leg in legs:
        if isinstance(leg.amount_fen, bool) or not isinstance(leg.amount_fen, int):
            raise LedgerError("amounts are integer fen")
        if leg.amount_fen == 0:
            raise LedgerError("a leg of zero fen")
    if sum(leg.amount_fen for leg in legs) != 0:
        raise LedgerError("legs do not sum to zero")


_TXN_COLUMNS = (
    "seq",
    "kind",
    "ref",
    "memo",
    "bank_ref",
    "bank_id",
    "posted_at",
    "prev_hash",
    "hash",
)
_ENTRY_COLUMNS = ("seq", "leg", "account", "amount_fen")
_APPEND_PG = text(
    """
    WITH t AS (
        INSERT INTO journal_transactions
            (seq, kind, ref, memo, bank_ref, bank_id, posted_at, prev_hash, hash)
        SELECT * FROM unnest(
            CAST(:t_seq AS BIGINT[]), CAST(:t_kind AS TEXT[]), CAST(:t_ref AS TEXT[]),
            CAST(:t_memo AS TEXT[]), CAST(:t_bank_ref AS TEXT[]), CAST(:t_bank_id AS TEXT[]),
            CAST(:t_posted_at AS TIMESTAMPTZ[]), CAST(:t_prev AS TEXT[]),
            CAST(:t_hash AS TEXT[]))
    ), e AS (
        INSERT INTO journal_entries (seq, leg, account, amount_fen)
        SELECT * FROM unnest(
            CAST(:e_seq AS BIGINT[]), CAST(:e_leg AS INTEGER[]), CAST(:e_account AS TEXT[]),
            CAST(:e_amount AS BIGINT[]))
    )
    UPDATE ledger_head SET seq = :head_seq, hash = :head_hash WHERE id = 1
    """
)


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise LedgerError("naive datetime given; store aware UTC times")
    return at


def _columns(
    txn_rows: list[tuple[Any, ...]],
    entry_rows: list[tuple[int, int, str, int]],
    head_seq: int,
    head_hash: str,
) -> dict[str, Any]:
    t = list(zip(*txn_rows, strict=True))
    e = list(zip(*entry_rows, strict=True))
    return {
        "t_seq": list(t[0]),
        "t_kind": list(t[1]),
        "t_ref": list(t[2]),
        "t_memo": list(t[3]),
        "t_bank_ref": list(t[4]),
        "t_bank_id": list(t[5]),
        "t_posted_at": [_aware(at).astimezone(UTC) for at in t[6]],
        "t_prev": list(t[7]),
        "t_hash": list(t[8]),
        "e_seq": list(e[0]),
        "e_leg": list(e[1]),
        "e_account": list(e[2]),
        "e_amount": list(e[3]),
        "head_seq": head_seq,
        "head_hash": head_hash,
    }


async def post(session: AsyncSession, posting: Posting) -> Posting:
    """Append one balanced transaction to the journal (inside the caller's transaction)."""
    return (await post_many(session, [posting]))[0]


async def post_many(session: AsyncSession, postings: Sequence[Posting]) -> list[Posting]:
    """Append several balanced transactions, chained, under one head lock."""
    if not postings:
        return []
    for p in postings:
        _check_legs(p.legs)
    head_seq, head_hash = (
        await session.execute(
            select(LedgerHead.seq, LedgerHead.hash).where(LedgerHead.id == 1).with_for_update()
        )
    ).one()

    # Accounts: create missing ones, then check non-negative balances.
    meta: dict[str, Leg] = {}
    delta: dict[str, int] = defaultdict(int)
    for p in postings:
        for leg in p.legs:
            meta.setdefault(leg.account, leg)
            delta[leg.account] += leg.amount_fen
    # One statement creates missing accounts, moves every cached balance by
    # its delta and returns the new balances (start = new − delta).
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = sqlite_insert if dialect == "sqlite" else pg_insert
    table = LedgerAccount.__table__
    stmt = insert(table).values(
        [
            {
                "code": code,
                "kind": kind_of(code),
                "institution_id": meta[code].institution_id,
                "contract_id": meta[code].contract_id,
                "balance_fen": delta[code],
            }
            for code in sorted(delta)
        ]
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["code"],
        set_={"balance_fen": table.c.balance_fen + stmt.excluded.balance_fen},
    ).returning(table.c.code, table.c.balance_fen)
    after = {code: int(v) for code, v in (await session.execute(stmt)).all()}
    # Check every intermediate state, not just the end of the batch.
    running = {code: after[code] - delta[code] for code in delta}
    for p in postings:
        for leg in p.legs:
            running[leg.account] += leg.amount_fen
        for leg in p.legs:
            if kind_of(leg.account) in NON_NEGATIVE and running[leg.account] < 0:
                raise LedgerError(f"{leg.account} would go negative ({running[leg.account]})")

    seq, prev = head_seq, head_hash
    txn_rows: list[tuple[Any, ...]] = []
    entry_rows: list[tuple[int, int, str, int]] = []
    for p in postings:
        seq += 1
        legs = [(i, leg.account, leg.amount_fen) for i, leg in enumerate(p.legs)]
        p.seq = seq
        p.hash = canonical_hash(
            seq, prev, p.kind, p.ref, p.memo, p.bank_ref, p.bank_id, p.posted_at, legs
        )
        txn_rows.append(
            (seq, p.kind, p.ref, p.memo, p.bank_ref, p.bank_id, p.posted_at, prev, p.hash)
        )
        entry_rows += [(seq, i, account, amount) for i, account, amount in legs]
        prev = p.hash
    if dialect == "postgresql":
        # One statement, one round trip: the headers, their legs (each column
        # one array parameter) and the new chain head.
        await session.execute(_APPEND_PG, _columns(txn_rows, entry_rows, seq, prev))
        return list(postings)
    await session.execute(
        JournalTransaction.__table__.insert(),
        [dict(zip(_TXN_COLUMNS, r, strict=True)) for r in txn_rows],
    )
    await session.execute(
        JournalEntry.__table__.insert(),
        [dict(zip(_ENTRY_COLUMNS, r, strict=True)) for r in entry_rows],
    )
    await session.execute(update(LedgerHead).where(LedgerHead.id == 1).values(seq=seq, hash=prev))
    return list(postings)


async def balance(session: AsyncSession, code: str) -> int:
    """Balance derived from the entries (not the cache)."""
    value = await session.scalar(
        select(func.coalesce(func.sum(JournalEntry.amount_fen), 0)).where(
            JournalEntry.account == code
        )
    )
    return int(value or 0)


async def balances(session: AsyncSession, codes: Sequence[str]) -> dict[str, int]:
    rows = await session.execute(
        select(JournalEntry.account, func.sum(JournalEntry.amount_fen))
        .where(JournalEntry.account.in_(list(codes)))
        .group_by(JournalEntry.account)
    )
    found = {code: int(total) for code, total in rows.all()}
    return {code: found.get(code, 0) for code in codes}


async def cached_balances(session: AsyncSession, codes: Sequence[str]) -> dict[str, int]:
    """Cached balances (kept in step with the entries in the posting transaction;
    ``trial_balance`` checks them). Use under a lock that covers the accounts."""
    rows = await session.execute(
        select(LedgerAccount.code, LedgerAccount.balance_fen).where(
            LedgerAccount.code.in_(list(codes))
        )
    )
    found = {code: int(v) for code, v in rows.all()}
    return {code: found.get(code, 0) for code in codes}


@dataclass
class ChainReport:
    ok: bool
    transactions: int
    head_seq: int
    head_hash: str
    first_broken_seq: int | None = None
    problem: str | None = None


async def verify_chain(session: AsyncSession, *, chunk: int = 2000) -> ChainReport:
    """Recompute every hash in order; name the first transaction that does not fit."""
    prev = GENESIS_HASH
    expected = 1
    count = 0
    last = 0
    while True:
        txns = (
            (
                await session.execute(
                    select(JournalTransaction)
                    .where(JournalTransaction.seq >= expected)
                    .order_by(JournalTransaction.seq)
                    .limit(chunk)
                )
            )
            .scalars()
            .all()
        )
        if not txns:
            break
        seqs = [t.seq for t in txns]
        legs_by_seq: dict[int, list[tuple[int, str, int]]] = defaultdict(list)
        rows = await session.execute(
            select(
                JournalEntry.seq, JournalEntry.leg, JournalEntry.account, JournalEntry.amount_fen
            ).where(JournalEntry.seq >= seqs[0], JournalEntry.seq <= seqs[-1])
        )
        for s, leg, account, amount in rows.all():
            legs_by_seq[s].append((leg, account, int(amount)))
        for t in txns:
            if t.seq != expected:
                return ChainReport(
                    False, count, last, prev, expected, f"缺失第 {expected} 笔交易（序号不连续）"
                )
            legs = legs_by_seq.get(t.seq, [])
            recomputed = transaction_hash(
                seq=t.seq,
                prev_hash=t.prev_hash,
                kind=t.kind,
                ref=t.ref,
                memo=t.memo,
                bank_ref=t.bank_ref,
                bank_id=t.bank_id,
                posted_at=t.posted_at,
                legs=legs,
            )
            problem = None
            if t.prev_hash != prev:
                problem = "前序哈希与上一笔交易不符（链条断裂）"
            elif len(legs) < 2:
                problem = "分录少于两条"
            elif sum(a for _, _, a in legs) != 0:
                problem = "借贷不平（分录合计不为零）"
            elif recomputed != t.hash:
                problem = "交易内容与其哈希不符（记录被改动）"
            if problem is not None:
                return ChainReport(False, count, last, prev, t.seq, problem)
            prev = t.hash
            last = t.seq
            expected += 1
            count += 1
    head = (await session.execute(select(LedgerHead).where(LedgerHead.id == 1))).scalar_one()
    if head.seq != last or head.hash != prev:
        return ChainReport(
            False,
            count,
            last,
            prev,
            last + 1 if head.seq > last else head.seq,
            "链头与日记账末笔交易不符（末尾交易缺失或被改动）",
        )
    return ChainReport(True, count, last, prev)


@dataclass
class TrialBalance:
    total_fen: int
    accounts: int
    mismatched: list[dict[str, Any]]
    negative: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return self.total_fen == 0 and not self.mismatched and not self.negative


async def trial_balance(session: AsyncSession) -> TrialBalance:
    """Sum of all entries (must be zero); cached balances vs their entries."""
    derived = dict(
        (
            await session.execute(
                select(JournalEntry.account, func.sum(JournalEntry.amount_fen)).group_by(
                    JournalEntry.account
                )
            )
        ).all()
    )
    cached = dict(
        (await session.execute(select(LedgerAccount.code, LedgerAccount.balance_fen))).all()
    )
    mismatched = []
    negative = []
    for code in sorted(set(derived) | set(cached)):
        d = int(derived.get(code, 0) or 0)
        c = int(cached.get(code, 0) or 0)
        if d != c:
            mismatched.append({"account": code, "entries_fen": d, "cached_fen": c})
        if kind_of(code) in NON_NEGATIVE and d < 0:
            negative.append({"account": code, "balance_fen": d})
    total = sum(int(v or 0) for v in derived.values())
    return TrialBalance(total, len(cached), mismatched, negative)
