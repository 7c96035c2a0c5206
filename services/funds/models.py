"""funds's tables, including its read copy of identity's roster.

Money is integer fen (BigInteger). The journal (``journal_transactions`` +
``journal_entries``) is append-only: the code never updates or deletes a row
and the migration installs triggers that refuse it (FUND-09). Balances are
derived from entries; ``ledger_accounts.balance_fen`` is a cache the auditor
endpoint checks against the entries.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from chassis.db import TYPE_ANNOTATION_MAP, new_metadata, utcnow
from chassis.roster import roster_tables

Fen = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = new_metadata()
    type_annotation_map = TYPE_ANNOTATION_MAP


roster = roster_tables(Base.metadata)


# ---------------------------------------------------------------- read copies


class Institution(Base):
    """What institutions' licence and black-list events said last (FUND-01/02/07)."""

    __tablename__ = "institutions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    region_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(20))
    blacklisted: Mapped[bool] = mapped_column(Boolean, default=False)
    reregistration_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    can_charge: Mapped[bool] = mapped_column(Boolean, default=False)
    licence_number: Mapped[str | None] = mapped_column(String(64))
    licence_valid_until: Mapped[date | None] = mapped_column(Date)
    facts_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Course(Base):
    """A filed course (institutions.course.filed): price and lessons (FUND-02)."""

    __tablename__ = "courses"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(64), index=True)
    region_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(String(64))
    price_per_lesson_fen: Mapped[int] = mapped_column(Fen)
    lesson_count: Mapped[int] = mapped_column(Integer)
    lesson_minutes: Mapped[int] = mapped_column(Integer)
    period_start: Mapped[date] = mapped_column(Date)
    period_end: Mapped[date] = mapped_column(Date)
    filed_at: Mapped[datetime] = mapped_column()


# ---------------------------------------------------------------- escrow


class EscrowAccount(Base):
    """FUND-01: one escrow account per licensed institution at a custodian bank."""

    __tablename__ = "escrow_accounts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(64), unique=True)
    bank_id: Mapped[str] = mapped_column(String(64), index=True)
    region_id: Mapped[str] = mapped_column(String(64), index=True)
    account_number: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # active | frozen | closed
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    frozen_at: Mapped[datetime | None] = mapped_column()
    freeze_reason: Mapped[str | None] = mapped_column(Text)
    closed_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Contract(Base):
    """FUND-03: a purchase on the standard template (示范文本)."""

    __tablename__ = "contracts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(64), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("escrow_accounts.id"), index=True)
    region_id: Mapped[str] = mapped_column(String(64), index=True)
    course_id: Mapped[str] = mapped_column(String(64))
    course_name: Mapped[str] = mapped_column(String(200))
    student_id: Mapped[str] = mapped_column(String(36), index=True)
    guardian_id: Mapped[str] = mapped_column(String(36), index=True)
    mode: Mapped[str] = mapped_column(String(16))  # prepaid | train_first
    lessons: Mapped[int] = mapped_column(Integer)
    price_per_lesson_fen: Mapped[int] = mapped_column(Fen)
    total_fen: Mapped[int] = mapped_column(Fen)
    starts_on: Mapped[date] = mapped_column(Date)
    ends_on: Mapped[date] = mapped_column(Date)
    # pending_payment | active | refunding | refunded | completed | cancelled
    status: Mapped[str] = mapped_column(String(20))
    paid_fen: Mapped[int] = mapped_column(Fen, default=0)
    reported_lessons: Mapped[int] = mapped_column(Integer, default=0)  # awaiting an answer
    confirmed_lessons: Mapped[int] = mapped_column(Integer, default=0)
    released_lessons: Mapped[int] = mapped_column(Integer, default=0)
    refunded_lessons: Mapped[int] = mapped_column(Integer, default=0)
    # Gross fen moved out of escrow for delivered lessons (to institution + reserve).
    released_gross_fen: Mapped[int] = mapped_column(Fen, default=0)
    refunded_fen: Mapped[int] = mapped_column(Fen, default=0)
    next_lesson_seq: Mapped[int] = mapped_column(Integer, default=1)
    payer_account: Mapped[str | None] = mapped_column(String(64))
    document: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Payment(Base):
    """A bank-confirmed payment into a contract's escrow (one per bank reference)."""

    __tablename__ = "payments"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    bank_ref: Mapped[str] = mapped_column(String(64), unique=True)
    bank_id: Mapped[str] = mapped_column(String(64))
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    amount_fen: Mapped[int] = mapped_column(Fen)
    payer_account: Mapped[str] = mapped_column(String(64))
    journal_seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Lesson(Base):
    """FUND-04: a delivered lesson reported by the institution."""

    __tablename__ = "lessons"
    __table_args__ = (UniqueConstraint("contract_id", "seq"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    institution_id: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    delivered_on: Mapped[date] = mapped_column(Date)
    reported_at: Mapped[datetime] = mapped_column(default=utcnow)
    auto_confirm_on: Mapped[date] = mapped_column(Date, index=True)
    # reported | confirmed | auto_confirmed | disputed | not_delivered
    # (a dispute resolved as delivered ends as confirmed, resolution "delivered")
    status: Mapped[str] = mapped_column(String(16), index=True)
    answered_at: Mapped[datetime | None] = mapped_column()
    dispute_reason: Mapped[str | None] = mapped_column(Text)
    resolve_by: Mapped[date | None] = mapped_column(Date)
    resolution: Mapped[str | None] = mapped_column(String(16))  # delivered | not_delivered
    resolved_by: Mapped[str | None] = mapped_column(String(16))  # regulator | institution | parent
    resolved_at: Mapped[datetime | None] = mapped_column()
    resolution_note: Mapped[str | None] = mapped_column(Text)
    dispute_overdue_reported: Mapped[bool] = mapped_column(Boolean, default=False)
    released: Mapped[bool] = mapped_column(Boolean, default=False)


class Refund(Base):
    """FUND-06 / FUND-07: a refund of a contract's unconsumed balance."""

    __tablename__ = "refunds"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    institution_id: Mapped[str] = mapped_column(String(64), index=True)
    account_id: Mapped[str] = mapped_column(String(36), index=True)
    region_id: Mapped[str] = mapped_column(String(64), index=True)
    # One open refund per contract: set while open, NULL once paid/withdrawn.
    open_contract_id: Mapped[str | None] = mapped_column(String(36), unique=True)
    origin: Mapped[str] = mapped_column(String(16))  # parent | freeze_plan
    plan_id: Mapped[str | None] = mapped_column(String(36), index=True)
    lessons: Mapped[int] = mapped_column(Integer)
    amount_fen: Mapped[int] = mapped_column(Fen)
    # requested | objected | agreed | deemed_agreed | approved | paid | rejected
    status: Mapped[str] = mapped_column(String(16), index=True)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    requested_on: Mapped[date] = mapped_column(Date)
    respond_by: Mapped[date] = mapped_column(Date)
    due_by: Mapped[date] = mapped_column(Date, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text)
    overdue_reported: Mapped[bool] = mapped_column(Boolean, default=False)
    paid_at: Mapped[datetime | None] = mapped_column()
    paid_fen: Mapped[int | None] = mapped_column(Fen)
    payee_account: Mapped[str | None] = mapped_column(String(64))
    journal_seq: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))


class RefundPlan(Base):
    """FUND-07: every contract with an unconsumed balance when an account froze."""

    __tablename__ = "refund_plans"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(36), index=True)
    institution_id: Mapped[str] = mapped_column(String(64), index=True)
    region_id: Mapped[str] = mapped_column(String(64), index=True)
    bank_id: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str] = mapped_column(Text)
    trigger: Mapped[str] = mapped_column(String(120))
    contracts: Mapped[int] = mapped_column(Integer)
    total_fen: Mapped[int] = mapped_column(Fen)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Payout(Base):
    """FUND-04: a batched payout instruction of an institution's releasable balance."""

    __tablename__ = "payouts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(36), index=True)
    institution_id: Mapped[str] = mapped_column(String(64), index=True)
    account_id: Mapped[str] = mapped_column(String(36), index=True)
    bank_id: Mapped[str] = mapped_column(String(64), index=True)
    amount_fen: Mapped[int] = mapped_column(Fen)
    status: Mapped[str] = mapped_column(String(16))  # instructed | executed
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    executed_at: Mapped[datetime | None] = mapped_column()
    journal_seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))


class RiskAlert(Base):
    """FUND-08: a risk alert (also published as funds.risk.alert.v1)."""

    __tablename__ = "risk_alerts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40), index=True)
    institution_id: Mapped[str | None] = mapped_column(String(64), index=True)
    region_id: Mapped[str | None] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(Text)
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Reconciliation(Base):
    """FUND-08: one uploaded bank statement and what did not match."""

    __tablename__ = "reconciliations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    bank_id: Mapped[str] = mapped_column(String(64), index=True)
    statement_date: Mapped[date] = mapped_column(Date)
    lines: Mapped[int] = mapped_column(Integer)
    matched: Mapped[int] = mapped_column(Integer)
    mismatches: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# ---------------------------------------------------------------- ledger (FUND-09)


class LedgerAccount(Base):
    """A ledger account; ``balance_fen`` caches the sum of its entries."""

    __tablename__ = "ledger_accounts"
    code: Mapped[str] = mapped_column(String(120), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    institution_id: Mapped[str | None] = mapped_column(String(64), index=True)
    contract_id: Mapped[str | None] = mapped_column(String(36), index=True)
    balance_fen: Mapped[int] = mapped_column(Fen, default=0)


class LedgerHead(Base):
    """The chain head: one row, locked by every posting (serializes the chain)."""

    __tablename__ = "ledger_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    hash: Mapped[str] = mapped_column(String(64))


class JournalTransaction(Base):
    """An immutable journal transaction; ``hash`` covers it and ``prev_hash``."""

    __tablename__ = "journal_transactions"
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False
    )
    kind: Mapped[str] = mapped_column(String(40), index=True)
    ref: Mapped[str] = mapped_column(String(64), index=True)
    memo: Mapped[str] = mapped_column(String(200))
    bank_ref: Mapped[str | None] = mapped_column(String(64), index=True)
    bank_id: Mapped[str | None] = mapped_column(String(64), index=True)
    posted_at: Mapped[datetime] = mapped_column()
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class JournalEntry(Base):
    """One leg: ``amount_fen`` > 0 arrives in the account, < 0 leaves it."""

    __tablename__ = "journal_entries"
    __table_args__ = (UniqueConstraint("seq", "leg"),)
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    seq: Mapped[int] = mapped_column(ForeignKey("journal_transactions.seq"), index=True)
    leg: Mapped[int] = mapped_column(Integer)
    account: Mapped[str] = mapped_column(ForeignKey("ledger_accounts.code"), index=True)
    amount_fen: Mapped[int] = mapped_column(Fen)
