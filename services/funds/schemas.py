"""funds's request and response models (inputs forbid unknown fields)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class AccountOpen(In):
    institution_id: str = Field(min_length=1, max_length=64)
    bank_id: str = Field(min_length=1, max_length=64, description="开户的监管银行编号")
    account_number: str = Field(min_length=4, max_length=64, description="专户账号")


class AccountOut(Out):
    id: str
    institution_id: str
    bank_id: str
    region_id: str
    account_number: str
    state: str
    opened_at: dt.datetime
    frozen_at: dt.datetime | None
    freeze_reason: str | None
    closed_at: dt.datetime | None = None


class AccountBalance(AccountOut):
    escrow_fen: int = Field(description="各合同未消课时资金合计（分）")
    reserve_fen: int = Field(description="风险保证金（分）")
    releasable_fen: int
    payout_instructed_fen: int
    paid_out_fen: int
    refunds_paid_fen: int


class PurchaseIn(In):
    institution_id: str = Field(min_length=1, max_length=64)
    course_id: str = Field(min_length=1, max_length=64)
    student_id: str = Field(min_length=1, max_length=36)
    lessons: int = Field(gt=0, le=10_000)
    price_per_lesson_fen: int = Field(gt=0, le=100_000_000)
    starts_on: dt.date
    ends_on: dt.date
    mode: Literal["prepaid", "train_first"] = "prepaid"


class ContractOut(Out):
    id: str
    institution_id: str
    account_id: str
    region_id: str
    course_id: str
    course_name: str
    student_id: str
    mode: str
    lessons: int
    price_per_lesson_fen: int
    total_fen: int
    starts_on: dt.date
    ends_on: dt.date
    status: str
    paid_fen: int
    reported_lessons: int
    confirmed_lessons: int
    refunded_lessons: int
    released_gross_fen: int
    refunded_fen: int
    created_at: dt.datetime


class PaymentIn(In):
    contract_id: str = Field(min_length=1, max_length=36)
    amount_fen: int = Field(gt=0, le=100_000_000)
    bank_ref: str = Field(min_length=1, max_length=64, description="银行流水号")
    payer_account: str = Field(min_length=4, max_length=64, description="付款账户（退费原路退回）")


class PaymentOut(Out):
    id: str
    bank_ref: str
    contract_id: str
    amount_fen: int
    journal_seq: int
    received_at: dt.datetime


class LessonReport(In):
    delivered_on: dt.date


class LessonAnswer(In):
    confirm: bool
    reason: str | None = Field(default=None, max_length=500)


class LessonBatch(In):
    lesson_ids: list[str] = Field(min_length=1, max_length=1000)


class LessonOut(Out):
    id: str
    contract_id: str
    seq: int
    delivered_on: dt.date
    auto_confirm_on: dt.date
    status: str
    released: bool
    dispute_reason: str | None = None
    resolve_by: dt.date | None = Field(default=None, description="异议处理期限")
    resolution: str | None = Field(default=None, description="delivered | not_delivered")
    resolved_by: str | None = None


class LessonList(RootModel[list[LessonOut]]):
    pass


class DisputeResolution(In):
    delivered: bool = Field(description="认定已上课（划转给机构）或未上课（留存专户、可退费）")
    note: str | None = Field(default=None, max_length=500)


class RefundIn(In):
    reason: str | None = Field(default=None, max_length=500)


class RefundAnswer(In):
    agree: bool
    answer: str | None = Field(default=None, max_length=500)


class RefundDecision(In):
    approve: bool
    answer: str | None = Field(default=None, max_length=500)


class BankExecution(In):
    bank_ref: str = Field(min_length=1, max_length=64)


class RefundOut(Out):
    id: str
    contract_id: str
    institution_id: str
    origin: str
    plan_id: str | None
    lessons: int
    amount_fen: int
    status: str
    requested_on: dt.date
    respond_by: dt.date
    due_by: dt.date
    paid_at: dt.datetime | None
    paid_fen: int | None
    overdue_reported: bool


class PlanOut(Out):
    id: str
    account_id: str
    institution_id: str
    region_id: str
    reason: str
    trigger: str
    contracts: int
    total_fen: int
    created_at: dt.datetime


class PlanProgress(PlanOut):
    outstanding_fen: int = Field(description="尚未退回的金额（分），须追踪至零")
    paid_fen: int
    refunds: list[RefundOut]


class PayoutOut(Out):
    id: str
    batch_id: str
    institution_id: str
    amount_fen: int
    status: str
    created_at: dt.datetime
    executed_at: dt.datetime | None


class PayoutBatchIn(In):
    bank_id: str = Field(min_length=1, max_length=64)


class SweepIn(In):
    as_of: dt.date | None = Field(default=None, description="按此日期执行（默认今天，北京时间）")


class SweepOut(BaseModel):
    auto_confirmed: int
    deemed_agreed: int
    overdue: int
    disputes_overdue: int = 0
    released_contracts: int
    alerts: int


class AlertOut(Out):
    id: str
    kind: str
    institution_id: str | None
    region_id: str | None
    detail: str
    facts: dict[str, Any]
    created_at: dt.datetime


class ReconciliationOut(Out):
    id: str
    bank_id: str
    statement_date: dt.date
    lines: int
    matched: int
    mismatches: list[dict[str, Any]]


class ChainOut(BaseModel):
    ok: bool
    transactions: int
    head_seq: int
    head_hash: str
    first_broken_seq: int | None
    problem: str | None


class TrialBalanceOut(BaseModel):
    ok: bool
    total_fen: int = Field(description="全部分录合计，必须为零")
    accounts: int
    mismatched: list[dict[str, Any]] = Field(description="缓存余额与分录合计不符的账户")
    negative: list[dict[str, Any]]


class EntryOut(BaseModel):
    account: str
    amount_fen: int


class TransactionOut(BaseModel):
    seq: int
    kind: str
    ref: str
    memo: str
    bank_ref: str | None
    posted_at: dt.datetime
    prev_hash: str
    hash: str
    entries: list[EntryOut]
