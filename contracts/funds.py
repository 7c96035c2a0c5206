"""Events published by funds (FUND-01, FUND-03, FUND-06, FUND-07, FUND-08).

Small versioned records without personal data (X-06): contracts are named by
id, never by the child's name. institutions consumes ``funds.refund.overdue``
and ``funds.risk.alert`` for its credit records (INST-04).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import Field

from contracts.base import IntegrationEvent, event


@event("funds.account.opened.v1", "资金监管专户已开设（FUND-01）")
class AccountOpened(IntegrationEvent):
    account_id: str
    institution_id: str
    bank_id: str
    region_id: str
    opened_at: datetime

    def subject_id(self) -> str:
        return self.account_id


@event("funds.account.frozen.v1", "资金监管专户已冻结，生成退费计划（FUND-07）")
class AccountFrozen(IntegrationEvent):
    account_id: str
    institution_id: str
    region_id: str
    reason: str
    trigger: str = Field(description="触发冻结的事件类型")
    plan_id: str
    contracts: int = Field(description="退费计划涉及的合同数")
    total_fen: int = Field(description="退费计划总额（分）")
    frozen_at: datetime

    def subject_id(self) -> str:
        return self.account_id


@event("funds.account.unfrozen.v1", "资金监管专户解除冻结")
class AccountUnfrozen(IntegrationEvent):
    account_id: str
    institution_id: str
    region_id: str
    reason: str
    at: datetime

    def subject_id(self) -> str:
        return self.account_id


@event("funds.account.closed.v1", "资金监管专户已销户（合同均已结清、余额为零，FUND-01）")
class AccountClosed(IntegrationEvent):
    account_id: str
    institution_id: str
    bank_id: str
    region_id: str
    closed_at: datetime

    def subject_id(self) -> str:
        return self.account_id


@event("funds.lesson.disputed.v1", "家长对机构上报的课次提出异议，待处理（FUND-04）")
class LessonDisputed(IntegrationEvent):
    lesson_id: str
    contract_id: str
    institution_id: str
    region_id: str
    resolve_by: date = Field(description="异议处理期限（工作日计算）")

    def subject_id(self) -> str:
        return self.lesson_id


@event("funds.lesson.dispute.resolved.v1", "课次异议已处理：认定已上课（划转）或未上课（留存专户）")
class LessonDisputeResolved(IntegrationEvent):
    lesson_id: str
    contract_id: str
    institution_id: str
    region_id: str
    resolution: Literal["delivered", "not_delivered"]
    resolved_by: str = Field(description="处理方：regulator | institution | parent")
    released_fen: int = Field(description="因认定已上课而划转的金额（分）")

    def subject_id(self) -> str:
        return self.lesson_id


@event("funds.lesson.dispute.overdue.v1", "课次异议逾期未处理（FUND-04）")
class LessonDisputeOverdue(IntegrationEvent):
    lesson_id: str
    contract_id: str
    institution_id: str
    region_id: str
    resolve_by: date

    def subject_id(self) -> str:
        return self.lesson_id


@event("funds.contract.paid.v1", "合同款项已由监管银行确认进入专户（FUND-02/03）")
class ContractPaid(IntegrationEvent):
    contract_id: str
    institution_id: str
    region_id: str
    course_id: str
    amount_fen: int
    lessons: int
    paid_at: datetime

    def subject_id(self) -> str:
        return self.contract_id


@event("funds.refund.requested.v1", "家长申请退费（FUND-06）")
class RefundRequested(IntegrationEvent):
    refund_id: str
    contract_id: str
    institution_id: str
    region_id: str
    amount_fen: int
    lessons: int
    respond_by: date
    due_by: date

    def subject_id(self) -> str:
        return self.refund_id


@event("funds.refund.paid.v1", "退费已由监管银行退回原支付账户（FUND-06）")
class RefundPaid(IntegrationEvent):
    refund_id: str
    contract_id: str
    institution_id: str
    region_id: str
    amount_fen: int
    origin: Literal["parent", "freeze_plan"]
    paid_at: datetime
    late: bool

    def subject_id(self) -> str:
        return self.refund_id


@event("funds.refund.overdue.v1", "退费逾期未办结（FUND-06，计入机构信用记录）")
class RefundOverdue(IntegrationEvent):
    refund_id: str
    contract_id: str
    institution_id: str
    region_id: str
    amount_fen: int
    due_by: date
    status: str

    def subject_id(self) -> str:
        return self.refund_id


@event("funds.payout.executed.v1", "机构结算款已由监管银行划付（FUND-04）")
class PayoutExecuted(IntegrationEvent):
    payout_id: str
    institution_id: str
    amount_fen: int
    executed_at: datetime

    def subject_id(self) -> str:
        return self.payout_id


@event("funds.risk.alert.v1", "资金风险预警（FUND-08）")
class RiskAlertRaised(IntegrationEvent):
    alert_id: str
    kind: Literal[
        "refund_spike",
        "liabilities_exceed_balance",
        "large_movement",
        "release_without_confirmed_lesson",
        "reconciliation_mismatch",
    ]
    institution_id: str | None = None
    region_id: str | None = None
    detail: str
    raised_at: datetime

    def subject_id(self) -> str:
        return self.alert_id
