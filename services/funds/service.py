"""funds's use cases: each runs in the caller's transaction, writes its rows,
its journal postings and its outbox events together (all or nothing).

Locking (PostgreSQL; SQLite serializes writers): a use case locks its
contract row (``FOR UPDATE``) and reads the escrow account ``FOR SHARE``
(a freeze updates the account, so it waits for running releases and they
wait for it); posting to the journal locks the ledger head last.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import String, any_, bindparam, func, literal, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.util import identity_key

from chassis.auth import Principal
from chassis.calendar import Calendar, today_in_china
from chassis.db import utcnow
from chassis.errors import FieldError, Problem, conflict, not_found, rule_violation
from chassis.messaging import emit
from chassis.policy import FundsPolicy, PolicyRegistry, UnknownRegionError
from chassis.roster import guardian_student_ids, load_calendar
from contracts import funds as ev
from contracts.base import Envelope
from contracts.institutions import CourseFiled, InstitutionFacts
from services.funds import ledger, rules
from services.funds.ledger import Leg, Posting
from services.funds.models import (
    Contract,
    Course,
    EscrowAccount,
    Institution,
    JournalEntry,
    JournalTransaction,
    Lesson,
    Payment,
    Payout,
    Reconciliation,
    Refund,
    RefundPlan,
    RiskAlert,
    roster,
)

CHINA = ZoneInfo("Asia/Shanghai")
FREEZING_EVENTS = {
    "institutions.licence.suspended.v1",
    "institutions.licence.revoked.v1",
    "institutions.licence.terminated.v1",
    "institutions.blacklisted.v1",
}
OPEN_REFUND = ("requested", "objected", "agreed", "deemed_agreed", "approved")


def _id() -> str:
    return str(uuid.uuid4())


def _insert(session: AsyncSession) -> Any:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return sqlite_insert if dialect == "sqlite" else pg_insert


async def funds_policy(
    session: AsyncSession, policies: PolicyRegistry, region_id: str, on: dt.date
) -> FundsPolicy:
    """The region's profile (via the roster's region → profile mapping)."""
    profile_id = await session.scalar(
        select(roster.regions.c.profile_id).where(roster.regions.c.id == region_id)
    )
    for candidate in (profile_id, region_id, "national"):
        if candidate:
            try:
                return policies.profile(candidate, on=on).funds
            except UnknownRegionError:
                continue
    raise Problem(500, "缺少全国基准政策配置。")


async def calendar(session: AsyncSession) -> Calendar:
    return await load_calendar(session, roster)


# ---------------------------------------------------------------- locking helpers


async def _lock_contract(session: AsyncSession, contract_id: str) -> Contract | None:
    return (
        await session.execute(
            select(Contract)
            .where(Contract.id == contract_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def _account_shared(session: AsyncSession, account_id: str) -> EscrowAccount:
    return (
        await session.execute(
            select(EscrowAccount)
            .where(EscrowAccount.id == account_id)
            .with_for_update(read=True)
            .execution_options(populate_existing=True)
        )
    ).scalar_one()


# ---------------------------------------------------------------- events in


async def on_institution_facts(session: AsyncSession, envelope: Envelope) -> None:
    """Licence / black-list events: keep the facts; freeze on suspension,
    revocation, termination or black-listing (FUND-07); unfreeze on
    reinstatement / delisting when the institution may charge again."""
    facts = envelope.parse()
    assert isinstance(facts, InstitutionFacts)
    existing = await session.get(
        Institution, facts.institution_id, with_for_update=True, populate_existing=True
    )
    if existing is not None and existing.facts_at > facts.occurred_at:
        return  # an older fact arriving late changes nothing
    values = {
        "name": facts.name,
        "region_id": facts.region_id,
        "status": facts.status,
        "blacklisted": facts.blacklisted,
        "reregistration_pending": facts.reregistration_pending,
        "can_charge": facts.can_charge,
        "licence_number": facts.licence_number,
        "licence_valid_until": facts.licence_valid_until,
        "facts_at": facts.occurred_at,
    }
    if existing is None:
        session.add(Institution(id=facts.institution_id, **values))
        await session.flush()
    else:
        for key, value in values.items():
            setattr(existing, key, value)
    account = (
        await session.execute(
            select(EscrowAccount)
            .where(EscrowAccount.institution_id == facts.institution_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if account is None or account.state == "closed":
        return
    if envelope.type in FREEZING_EVENTS or (facts.blacklisted and account.state == "active"):
        if account.state == "active":
            await freeze_account(session, account, reason=facts.reason, trigger=envelope.type)
    elif (
        account.state == "frozen"
        and facts.can_charge
        and facts.status == "licensed"
        and not facts.blacklisted
    ):
        account.state = "active"
        account.frozen_at = None
        account.freeze_reason = None
        await emit(
            session,
            ev.AccountUnfrozen(
                account_id=account.id,
                institution_id=account.institution_id,
                region_id=account.region_id,
                reason=facts.reason,
                at=utcnow(),
            ),
        )


async def on_course_filed(session: AsyncSession, envelope: Envelope) -> None:
    course = envelope.parse()
    assert isinstance(course, CourseFiled)
    values = {
        "institution_id": course.institution_id,
        "region_id": course.region_id,
        "name": course.name,
        "subject": course.subject,
        "price_per_lesson_fen": course.price_per_lesson_fen,
        "lesson_count": course.lesson_count,
        "lesson_minutes": course.lesson_minutes,
        "period_start": course.period_start,
        "period_end": course.period_end,
        "filed_at": course.filed_at,
    }
    await session.execute(
        _insert(session)(Course)
        .values(id=course.course_id, **values)
        .on_conflict_do_update(index_elements=["id"], set_=values)
    )


# ---------------------------------------------------------------- accounts (FUND-01/07)


async def open_account(
    session: AsyncSession, principal: Principal, bank_id: str, institution_id: str, number: str
) -> EscrowAccount:
    """FUND-01: the bank opens the account of a licensed institution."""
    if not principal.has_tenant("bank", bank_id):
        raise not_found("监管银行不存在。")
    inst = await session.get(Institution, institution_id)
    if inst is None or inst.status != "licensed" or inst.blacklisted:
        raise rule_violation(
            "FUND-01",
            "只能为已取得办学许可（且未列入黑名单）的机构开设资金监管专户。",
            licence_status=None if inst is None else inst.status,
        )
    existing = await session.scalar(
        select(EscrowAccount).where(EscrowAccount.institution_id == institution_id)
    )
    if existing is not None:
        raise conflict("该机构已开设资金监管专户（每个机构一个专户）。", rule="FUND-01")
    account = EscrowAccount(
        id=_id(),
        institution_id=institution_id,
        bank_id=bank_id,
        region_id=inst.region_id,
        account_number=number,
        state="active",
        opened_at=utcnow(),
    )
    session.add(account)
    await session.flush()
    await emit(
        session,
        ev.AccountOpened(
            account_id=account.id,
            institution_id=institution_id,
            bank_id=bank_id,
            region_id=inst.region_id,
            opened_at=account.opened_at,
        ),
    )
    return account


UNSETTLED_CONTRACT = ("active", "refunding")


async def close_account(
    session: AsyncSession, principal: Principal, account_id: str
) -> EscrowAccount:
    """FUND-01: the custodian bank closes an account (active or frozen) once
    every contract on it is settled (none active or refunding) and every
    balance it holds is zero: each contract's escrow and reserve, the
    institution's releasable and payout-instructed money. A closed account
    sells nothing and receives nothing (``check_account``, ``confirm_payment``)."""
    account = (
        await session.execute(
            select(EscrowAccount)
            .where(EscrowAccount.id == account_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if account is None or not principal.has_tenant("bank", account.bank_id):
        raise not_found("专户不存在。")
    if account.state == "closed":
        raise conflict("该专户已销户。", rule="FUND-01", current_status="closed")
    open_contracts = int(
        await session.scalar(
            select(func.count())
            .select_from(Contract)
            .where(Contract.account_id == account.id, Contract.status.in_(UNSETTLED_CONTRACT))
        )
        or 0
    )
    if open_contracts:
        raise rule_violation(
            "FUND-01",
            f"专户下仍有 {open_contracts} 份合同未结清（履约中或退费中），不得销户。",
            status=409,
            open_contracts=open_contracts,
        )
    ids = list(
        (await session.execute(select(Contract.id).where(Contract.account_id == account.id)))
        .scalars()
        .all()
    )
    codes = [ledger.escrow(c) for c in ids] + [ledger.reserve(c) for c in ids]
    codes += [
        ledger.releasable(account.institution_id),
        ledger.payout_instructed(account.institution_id),
    ]
    nonzero = {code: v for code, v in (await ledger.balances(session, codes)).items() if v}
    if nonzero:
        raise rule_violation(
            "FUND-01",
            "专户余额未清零（托管资金、风险保证金、待结算或已指令未划付款项），不得销户。",
            status=409,
            balances_fen=dict(sorted(nonzero.items())),
        )
    account.state = "closed"
    account.closed_at = utcnow()
    await session.flush()
    await emit(
        session,
        ev.AccountClosed(
            account_id=account.id,
            institution_id=account.institution_id,
            bank_id=account.bank_id,
            region_id=account.region_id,
            closed_at=account.closed_at,
        ),
    )
    return account


async def freeze_account(
    session: AsyncSession, account: EscrowAccount, *, reason: str, trigger: str
) -> RefundPlan:
    """FUND-07: freeze at once and plan a refund for every unconsumed balance."""
    account.state = "frozen"
    account.frozen_at = utcnow()
    account.freeze_reason = reason
    plan = RefundPlan(
        id=_id(),
        account_id=account.id,
        institution_id=account.institution_id,
        region_id=account.region_id,
        bank_id=account.bank_id,
        reason=reason,
        trigger=trigger,
        contracts=0,
        total_fen=0,
    )
    session.add(plan)
    await session.flush()
    today = today_in_china()
    contracts = (
        (
            await session.execute(
                select(Contract)
                .where(
                    Contract.account_id == account.id,
                    Contract.status.in_(("active", "refunding")),
                )
                .order_by(Contract.id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        )
        .scalars()
        .all()
    )
    for contract in contracts:
        quote = await _quote(session, contract)
        if quote.amount_fen <= 0:
            continue
        open_refund = await session.scalar(
            select(Refund)
            .where(Refund.open_contract_id == contract.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        if open_refund is not None:
            # The parent's own request is taken over by the plan, approved.
            open_refund.plan_id = plan.id
            open_refund.status = "approved"
            open_refund.lessons = quote.lessons
            open_refund.amount_fen = quote.amount_fen
        else:
            session.add(
                Refund(
                    id=_id(),
                    contract_id=contract.id,
                    institution_id=contract.institution_id,
                    account_id=account.id,
                    region_id=contract.region_id,
                    open_contract_id=contract.id,
                    origin="freeze_plan",
                    plan_id=plan.id,
                    lessons=quote.lessons,
                    amount_fen=quote.amount_fen,
                    status="approved",
                    requested_on=today,
                    respond_by=today,
                    due_by=today,
                    reason=f"账户冻结：{reason}",
                )
            )
            contract.status = "refunding"
        plan.contracts += 1
        plan.total_fen += quote.amount_fen
    await session.flush()
    await emit(
        session,
        ev.AccountFrozen(
            account_id=account.id,
            institution_id=account.institution_id,
            region_id=account.region_id,
            reason=reason,
            trigger=trigger,
            plan_id=plan.id,
            contracts=plan.contracts,
            total_fen=plan.total_fen,
            frozen_at=account.frozen_at or utcnow(),
        ),
    )
    return plan


# ---------------------------------------------------------------- purchase (FUND-02/03)


@dataclass(frozen=True)
class PurchaseInput:
    institution_id: str
    course_id: str
    student_id: str
    lessons: int
    price_per_lesson_fen: int
    starts_on: dt.date
    ends_on: dt.date
    mode: str


CONTRACT_TEMPLATE = """校外培训服务合同（示范文本）

合同编号：{id}
甲方（学员监护人）编号：{guardian_id}
乙方（培训机构）：{institution_name}（编号 {institution_id}，办学许可证 {licence}）
学员编号：{student_id}

第一条 培训项目：{course_name}（备案课程编号 {course_id}）
第二条 课时与价格：共 {lessons} 课时，每课时 {price} 元，合计 {total} 元；
        上课期间 {starts_on} 至 {ends_on}
        （一次收费不超过 {months} 个月、{max_lessons} 课时、{max_yuan} 元）。
第三条 收费方式：{mode}。培训费用全额进入乙方在监管银行开设的资金监管专户，
        按“一课一消”原则，每课次经甲方确认
        （或 {auto_days} 个工作日内未提出异议视为确认）后划转，
        其中 {reserve_pct} 作为风险保证金留存至课程结束。
第四条 退费：甲方可申请退还未消课时费用，退费金额 = 未消课时数 × 课时单价 + 未释放的风险保证金，
        由系统计算；乙方应在 {respond_days} 个工作日内答复，逾期视为同意；
        退费应在申请之日起 {deadline_days} 个工作日内退回原支付账户。
第五条 乙方办学许可被暂停、吊销或列入黑名单时，专户立即冻结，停止划转，按退费计划退费。
第六条 争议解决：双方协商不成的，可向所在地教育行政部门投诉，或依法提起诉讼。
"""


def _yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


async def purchase(
    session: AsyncSession,
    policies: PolicyRegistry,
    principal: Principal,
    data: PurchaseInput,
    today: dt.date,
) -> Contract:
    """FUND-02/03: a parent buys lessons of a filed course for their own child."""
    if principal.person_id is None:
        raise not_found("学生不存在。")
    children = await guardian_student_ids(session, roster, principal.person_id)
    if data.student_id not in children:
        raise not_found("学生不存在。")  # GW-03: someone else's child looks missing
    inst = await session.get(Institution, data.institution_id)
    account = await session.scalar(
        select(EscrowAccount)
        .where(EscrowAccount.institution_id == data.institution_id)
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    )
    course = await session.get(Course, data.course_id)
    region_id = inst.region_id if inst is not None else (course.region_id if course else "")
    policy = await funds_policy(session, policies, region_id, today)
    remaining = None
    if policy.min_remaining_lessons_before_renewal is not None:
        rows = (
            await session.execute(
                select(Contract).where(
                    Contract.student_id == data.student_id,
                    Contract.course_id == data.course_id,
                    Contract.status.in_(("active", "pending_payment")),
                )
            )
        ).scalars()
        remaining = sum(
            c.lessons - c.refunded_lessons - c.confirmed_lessons - c.reported_lessons for c in rows
        )
    refusal = rules.check_purchase(
        None
        if inst is None
        else rules.InstitutionFacts(
            inst.status,
            inst.can_charge,
            inst.blacklisted,
            inst.reregistration_pending,
            inst.licence_valid_until,
        ),
        None if account is None else account.state,
        None
        if course is None
        else rules.CourseFacts(
            course.institution_id,
            course.price_per_lesson_fen,
            course.lesson_count,
            course.period_start,
            course.period_end,
        ),
        rules.PurchaseRequest(
            institution_id=data.institution_id,
            lessons=data.lessons,
            price_per_lesson_fen=data.price_per_lesson_fen,
            starts_on=data.starts_on,
            ends_on=data.ends_on,
            mode=data.mode,
            today=today,
            remaining_lessons_on_course=remaining,
        ),
        policy,
    )
    if refusal is not None:
        raise rule_violation(refusal.rule, refusal.detail, **refusal.facts)
    assert inst is not None and account is not None and course is not None
    total = data.lessons * data.price_per_lesson_fen
    contract_id = _id()
    document = CONTRACT_TEMPLATE.format(
        id=contract_id,
        guardian_id=principal.person_id,
        institution_name=inst.name,
        institution_id=inst.id,
        licence=inst.licence_number or "—",
        student_id=data.student_id,
        course_name=course.name,
        course_id=course.id,
        lessons=data.lessons,
        price=_yuan(data.price_per_lesson_fen),
        total=_yuan(total),
        starts_on=data.starts_on.isoformat(),
        ends_on=data.ends_on.isoformat(),
        months=policy.max_charge_months,
        max_lessons=policy.max_charge_lessons,
        max_yuan=_yuan(policy.max_charge_fen),
        mode="先学后付（每课次确认后支付）"
        if data.mode == "train_first"
        else "预付费，全额进入监管专户",
        auto_days=policy.auto_confirm_working_days,
        reserve_pct=f"{policy.risk_reserve_share * 100:g}%",
        respond_days=policy.refund_response_working_days,
        deadline_days=policy.refund_deadline_working_days,
    )
    contract = Contract(
        id=contract_id,
        institution_id=inst.id,
        account_id=account.id,
        region_id=inst.region_id,
        course_id=course.id,
        course_name=course.name,
        student_id=data.student_id,
        guardian_id=principal.person_id,
        mode=data.mode,
        lessons=data.lessons,
        price_per_lesson_fen=data.price_per_lesson_fen,
        total_fen=total,
        starts_on=data.starts_on,
        ends_on=data.ends_on,
        status="active" if data.mode == "train_first" else "pending_payment",
        paid_fen=0,
        reported_lessons=0,
        confirmed_lessons=0,
        released_lessons=0,
        refunded_lessons=0,
        released_gross_fen=0,
        refunded_fen=0,
        next_lesson_seq=1,
        document=document,
    )
    session.add(contract)
    await session.flush()
    return contract


# ---------------------------------------------------------------- payments (bank)


@dataclass(frozen=True)
class PaymentInput:
    contract_id: str
    amount_fen: int
    bank_ref: str
    payer_account: str


async def confirm_payment(
    session: AsyncSession,
    policies: PolicyRegistry,
    bank_id: str,
    data: PaymentInput,
) -> Payment:
    """The custodian bank confirms money received into escrow (signed callback)."""
    contract = await _lock_contract(session, data.contract_id)
    if contract is None:
        raise not_found("合同不存在。")
    account = await _account_shared(session, contract.account_id)
    if account.bank_id != bank_id:
        raise not_found("合同不存在。")
    seen = await session.scalar(select(Payment).where(Payment.bank_ref == data.bank_ref))
    if seen is not None:
        raise conflict("该银行流水号已入账。", rule="FUND-09", payment_id=seen.id)
    if account.state == "closed":
        raise rule_violation("FUND-01", "专户已销户，不再接收缴费，请原路退回。", status=409)
    if account.state != "active":
        raise rule_violation("FUND-07", "专户已冻结，不再接收新的缴费，请原路退回。", status=409)
    if contract.mode == "prepaid":
        if contract.status != "pending_payment":
            raise conflict("该合同已缴费或已关闭。", rule="FUND-02")
        if data.amount_fen != contract.total_fen:
            raise rule_violation(
                "FUND-02",
                "到账金额与合同金额不一致。",
                expected_fen=contract.total_fen,
                amount_fen=data.amount_fen,
            )
    else:
        outstanding = contract.total_fen - contract.paid_fen - contract.refunded_fen
        if contract.status != "active" or data.amount_fen > outstanding:
            raise rule_violation(
                "FUND-04", "先学后付合同的缴费超过应付余额。", outstanding_fen=outstanding
            )
    posting = await ledger.post(
        session,
        Posting(
            kind="payment",
            ref=contract.id,
            memo="家长缴费进入监管专户",
            bank_ref=data.bank_ref,
            bank_id=bank_id,
            legs=[
                Leg(ledger.PARENT_PAYMENTS, -data.amount_fen),
                Leg(
                    ledger.escrow(contract.id),
                    data.amount_fen,
                    contract.institution_id,
                    contract.id,
                ),
            ],
        ),
    )
    payment = Payment(
        id=_id(),
        bank_ref=data.bank_ref,
        bank_id=bank_id,
        contract_id=contract.id,
        amount_fen=data.amount_fen,
        payer_account=data.payer_account,
        journal_seq=posting.seq,
    )
    session.add(payment)
    contract.paid_fen += data.amount_fen
    contract.payer_account = data.payer_account
    if contract.status == "pending_payment":
        contract.status = "active"
    await session.flush()
    await emit(
        session,
        ev.ContractPaid(
            contract_id=contract.id,
            institution_id=contract.institution_id,
            region_id=contract.region_id,
            course_id=contract.course_id,
            amount_fen=data.amount_fen,
            lessons=contract.lessons,
            paid_at=payment.received_at,
        ),
    )
    if contract.mode == "train_first":
        policy = await funds_policy(session, policies, contract.region_id, today_in_china())
        await settle(session, contract, account, policy)
    return payment


# ---------------------------------------------------------------- lessons (FUND-04/05)


async def report_lesson(
    session: AsyncSession,
    policies: PolicyRegistry,
    principal: Principal,
    contract_id: str,
    delivered_on: dt.date,
    today: dt.date,
) -> Lesson:
    contract = await _lock_contract(session, contract_id)
    if contract is None or not principal.has_tenant("institution", contract.institution_id):
        raise not_found("合同不存在。")
    if contract.status not in ("active",):
        raise conflict(
            "合同未生效或已关闭，不能上报课次。", rule="FUND-04", current_status=contract.status
        )
    if delivered_on > today:
        raise Problem(
            422,
            "上课日期不能晚于今天。",
            errors=[FieldError(field="body.delivered_on", message="不能是将来的日期")],
        )
    open_lessons = (
        contract.lessons
        - contract.refunded_lessons
        - contract.confirmed_lessons
        - contract.reported_lessons
    )
    if open_lessons <= 0:
        raise conflict("合同课时已全部上报或消课。", rule="FUND-04")
    policy = await funds_policy(session, policies, contract.region_id, today)
    cal = await calendar(session)
    lesson = Lesson(
        id=_id(),
        contract_id=contract.id,
        institution_id=contract.institution_id,
        seq=contract.next_lesson_seq,
        delivered_on=delivered_on,
        auto_confirm_on=rules.auto_confirm_on(max(today, delivered_on), cal, policy),
        status="reported",
        released=False,
    )
    session.add(lesson)
    contract.next_lesson_seq += 1
    contract.reported_lessons += 1
    await session.flush()
    return lesson


async def answer_lesson(
    session: AsyncSession,
    policies: PolicyRegistry,
    principal: Principal | None,
    lesson_id: str,
    *,
    confirm: bool,
    reason: str | None,
    today: dt.date,
) -> Lesson:
    """The parent confirms or disputes a reported lesson (principal None: auto-confirm)."""
    found = await session.get(Lesson, lesson_id)
    if found is None:
        raise not_found("课次不存在。")
    contract = await _lock_contract(session, found.contract_id)
    assert contract is not None
    if principal is not None and principal.person_id != contract.guardian_id:
        raise not_found("课次不存在。")
    lesson = (
        await session.execute(
            select(Lesson)
            .where(Lesson.id == lesson_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    if lesson.status != "reported":
        raise conflict("该课次已确认或已提出异议。", rule="FUND-04", current_status=lesson.status)
    lesson.answered_at = utcnow()
    contract.reported_lessons -= 1
    if not confirm:
        policy = await funds_policy(session, policies, contract.region_id, today)
        lesson.status = "disputed"
        lesson.dispute_reason = reason
        lesson.resolve_by = rules.dispute_resolve_by(today, await calendar(session), policy)
        await session.flush()
        await emit(
            session,
            ev.LessonDisputed(
                lesson_id=lesson.id,
                contract_id=contract.id,
                institution_id=contract.institution_id,
                region_id=contract.region_id,
                resolve_by=lesson.resolve_by,
            ),
        )
        return lesson
    lesson.status = "confirmed" if principal is not None else "auto_confirmed"
    contract.confirmed_lessons += 1
    account = await _account_shared(session, contract.account_id)
    policy = await funds_policy(session, policies, contract.region_id, today)
    await settle(session, contract, account, policy)
    await session.refresh(lesson)
    return lesson


async def resolve_dispute(
    session: AsyncSession,
    policies: PolicyRegistry,
    principal: Principal,
    lesson_id: str,
    *,
    delivered: bool,
    note: str | None,
    today: dt.date,
) -> Lesson:
    """FUND-04: a disputed lesson is resolved as delivered (its price is
    released like any confirmed lesson, less the reserve, FUND-05) or as not
    delivered (the money stays in the contract's escrow: the lesson counts as
    unconsumed, so it is refundable, FUND-06, and the institution may deliver
    it again).

    Who: the regulator of the contract's region, either way; the institution
    may concede (not delivered: the parent's own claim); the parent may
    withdraw the dispute (delivered: the parent's agreement)."""
    found = await session.get(Lesson, lesson_id)
    if found is None:
        raise not_found("课次不存在。")
    contract = await _lock_contract(session, found.contract_id)
    assert contract is not None
    if principal.has_role("bureau", "regulator") and principal.has_tenant(
        "region", contract.region_id
    ):
        by = "regulator"
    elif principal.has_role("institution") and principal.has_tenant(
        "institution", contract.institution_id
    ):
        by = "institution"
    elif principal.has_role("parent") and principal.person_id == contract.guardian_id:
        by = "parent"
    else:
        raise not_found("课次不存在。")
    if by == "institution" and delivered:
        raise rule_violation(
            "FUND-04",
            "机构不能单方认定有异议的课次已上课：须家长撤回异议或由监管部门裁定。",
            status=403,
        )
    if by == "parent" and not delivered:
        raise rule_violation(
            "FUND-04", "家长的异议即为“未上课”主张，须由机构认可或监管部门裁定。", status=403
        )
    lesson = (
        await session.execute(
            select(Lesson)
            .where(Lesson.id == lesson_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    if lesson.status != "disputed":
        raise conflict("该课次没有待处理的异议。", rule="FUND-04", current_status=lesson.status)
    released = 0
    if delivered:
        if contract.status != "active":
            # An open or finished refund counted this lesson as unconsumed.
            raise conflict(
                "合同退费办理中或已关闭，该课次已计入退费，不能再认定为已上课。",
                rule="FUND-06",
                current_status=contract.status,
            )
        lesson.status = "confirmed"
        contract.confirmed_lessons += 1
        account = await _account_shared(session, contract.account_id)
        policy = await funds_policy(session, policies, contract.region_id, today)
        postings = await settle(session, contract, account, policy)
        released = sum(
            leg.amount_fen
            for p in postings
            for leg in p.legs
            if ledger.kind_of(leg.account) == ledger.ESCROW
        )
        released = -released
    else:
        lesson.status = "not_delivered"
    lesson.resolution = "delivered" if delivered else "not_delivered"
    lesson.resolved_by = by
    lesson.resolved_at = utcnow()
    lesson.resolution_note = note
    await session.flush()
    await emit(
        session,
        ev.LessonDisputeResolved(
            lesson_id=lesson.id,
            contract_id=contract.id,
            institution_id=contract.institution_id,
            region_id=contract.region_id,
            resolution="delivered" if delivered else "not_delivered",
            resolved_by=by,
            released_fen=released,
        ),
    )
    await session.refresh(lesson)
    return lesson


def _release_posting(contract: Contract, amount: int, to_reserve: int, memo: str) -> Posting:
    legs = []
    if amount > 0:
        legs.append(Leg(ledger.escrow(contract.id), -amount, contract.institution_id, contract.id))
    to_institution = amount - to_reserve
    if to_reserve > 0:
        legs.append(
            Leg(ledger.reserve(contract.id), to_reserve, contract.institution_id, contract.id)
        )
    elif to_reserve < 0:
        legs.append(
            Leg(ledger.reserve(contract.id), to_reserve, contract.institution_id, contract.id)
        )
    if to_institution:
        legs.append(
            Leg(ledger.releasable(contract.institution_id), to_institution, contract.institution_id)
        )
    return Posting(kind="release", ref=contract.id, memo=memo, legs=legs)


def _settle_postings(
    contract: Contract, account: EscrowAccount, policy: FundsPolicy, bal: dict[str, int]
) -> list[Posting]:
    """The release postings confirmed lessons have earned (FUND-04), keeping
    the risk reserve (FUND-05) until the contract completes; nothing while
    frozen (FUND-07). Updates ``contract`` and the running balances ``bal``
    (escrow and reserve of the contract) as if the postings were made."""
    if account.state != "active":
        return []
    postings: list[Posting] = []
    escrow_code, reserve_code = ledger.escrow(contract.id), ledger.reserve(contract.id)
    escrow_fen, reserve_fen = bal[escrow_code], bal[reserve_code]
    closed = contract.status in ("refunded", "completed")
    if closed or contract.refunded_lessons:
        due = contract.confirmed_lessons * contract.price_per_lesson_fen
    else:
        due = rules.staged_release_due_fen(
            contract.total_fen, contract.lessons, contract.confirmed_lessons, policy
        )
    gross = min(due - contract.released_gross_fen, escrow_fen)
    accounted = contract.refunded_lessons + contract.confirmed_lessons
    complete = (
        accounted == contract.lessons
        and contract.reported_lessons == 0
        and contract.status in ("active", "refunded", "completed")
    )
    if gross > 0:
        final = complete and contract.released_gross_fen + gross >= due
        kept = 0 if final else rules.reserve_part(gross, reserve_fen, policy)
        postings.append(_release_posting(contract, gross, kept, "一课一消：确认课次划转"))
        contract.released_gross_fen += gross
        escrow_fen -= gross
        reserve_fen += kept
    fully_released = (
        contract.released_gross_fen >= contract.confirmed_lessons * contract.price_per_lesson_fen
    )
    if complete and fully_released and reserve_fen > 0:
        postings.append(_release_posting(contract, 0, -reserve_fen, "课程结束：释放风险保证金"))
        reserve_fen = 0
    if complete and fully_released and contract.status == "active":
        contract.status = "completed"
    if fully_released:
        contract.released_lessons = contract.confirmed_lessons
    bal[escrow_code], bal[reserve_code] = escrow_fen, reserve_fen
    return postings


async def _contract_balances(session: AsyncSession, contract: Contract) -> dict[str, int]:
    # Cached balances: every posting to these accounts holds the contract lock.
    return await ledger.cached_balances(
        session, [ledger.escrow(contract.id), ledger.reserve(contract.id)]
    )


async def _mark_released(session: AsyncSession, contract: Contract) -> None:
    if contract.released_lessons == contract.confirmed_lessons:
        await session.execute(
            Lesson.__table__.update()
            .where(
                Lesson.contract_id == contract.id,
                Lesson.status.in_(("confirmed", "auto_confirmed")),
                Lesson.released.is_(False),
            )
            .values(released=True)
        )


async def settle(
    session: AsyncSession, contract: Contract, account: EscrowAccount, policy: FundsPolicy
) -> list[Posting]:
    """Post what confirmed lessons have earned (see ``_settle_postings``).
    The caller holds the contract lock."""
    postings = _settle_postings(
        contract, account, policy, await _contract_balances(session, contract)
    )
    if postings:
        await ledger.post_many(session, postings)
        await _mark_released(session, contract)
    return postings


LESSON_COLUMNS = (
    Lesson.id,
    Lesson.contract_id,
    Lesson.seq,
    Lesson.delivered_on,
    Lesson.auto_confirm_on,
    Lesson.status,
    Lesson.released,
    Lesson.dispute_reason,
    Lesson.resolve_by,
    Lesson.resolution,
    Lesson.resolved_by,
)


# The contract columns the batched confirmation reads (and partly writes back).
PROGRESS_COLUMNS = (
    Contract.id,
    Contract.institution_id,
    Contract.account_id,
    Contract.region_id,
    Contract.guardian_id,
    Contract.lessons,
    Contract.price_per_lesson_fen,
    Contract.total_fen,
    Contract.status,
    Contract.reported_lessons,
    Contract.confirmed_lessons,
    Contract.released_lessons,
    Contract.refunded_lessons,
    Contract.released_gross_fen,
)
_contracts = Contract.__table__
_WRITE_PROGRESS = (
    _contracts.update()
    .where(_contracts.c.id == bindparam("p_id"))
    .values(
        status=bindparam("p_status"),
        reported_lessons=bindparam("p_reported"),
        confirmed_lessons=bindparam("p_confirmed"),
        released_lessons=bindparam("p_released"),
        released_gross_fen=bindparam("p_gross"),
        updated_at=bindparam("p_at"),
    )
)


def _among(session: AsyncSession, column: Any, values: list[str]) -> Any:
    """``column IN (values)``; on PostgreSQL one array parameter (``= ANY``)
    instead of one bind per value (no per-call expansion of the statement)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        return column == any_(literal(values, ARRAY(String)))
    return column.in_(values)


def _expire(session: AsyncSession, model: Any, ids: Any) -> None:
    """Rows changed with Core statements: forget any ORM copy this session holds."""
    held = session.identity_map
    for pk in ids:
        obj = held.get(identity_key(model, pk))
        if obj is not None:
            session.expire(obj)


async def _write_progress(session: AsyncSession, contracts: list[Any], now: dt.datetime) -> None:
    """Write back the progress of contracts read as plain rows (one executemany)."""
    await session.execute(
        _WRITE_PROGRESS,
        [
            {
                "p_id": c.id,
                "p_status": c.status,
                "p_reported": c.reported_lessons,
                "p_confirmed": c.confirmed_lessons,
                "p_released": c.released_lessons,
                "p_gross": c.released_gross_fen,
                "p_at": now,
            }
            for c in contracts
        ],
    )
    _expire(session, Contract, {c.id for c in contracts})


async def _release_earlier(session: AsyncSession, contracts: Any) -> None:
    """Mark released the earlier confirmed lessons that releases have now
    paid for, in every contract whose release has caught up (one statement)."""
    done = [c.id for c in contracts if c.released_lessons == c.confirmed_lessons]
    if done:
        lessons_table = Lesson.__table__
        await session.execute(
            lessons_table.update()
            .where(
                _among(session, lessons_table.c.contract_id, done),
                lessons_table.c.status.in_(("confirmed", "auto_confirmed")),
                lessons_table.c.released.is_(False),
            )
            .values(released=True)
        )


async def answer_lessons(
    session: AsyncSession,
    policies: PolicyRegistry,
    principal: Principal | None,
    lesson_ids: list[str],
    today: dt.date,
) -> list[dict[str, Any]]:
    """Batched confirmation (FUND-04): many lessons, one posting per lesson,
    all chained under one ledger-head lock. ``principal`` None: auto-confirm.

    The hot path of the batched release: lessons are read and updated with
    Core statements (one UPDATE per contract), not loaded as ORM objects.
    Returns the answered lessons as dicts (the fields of ``LessonOut``)."""
    wanted = sorted(set(lesson_ids))
    contract_of = dict(
        (
            await session.execute(
                select(Lesson.id, Lesson.contract_id).where(_among(session, Lesson.id, wanted))
            )
        ).all()
    )
    if len(contract_of) != len(wanted):
        raise not_found("课次不存在。")
    contract_ids = sorted(set(contract_of.values()))
    # Locks in the order every use case takes them: the contracts (by id),
    # then their lessons, then the escrow accounts (shared) — one statement
    # each. The contracts are read as plain rows (no ORM objects: their
    # progress is written back in one statement below).
    contracts = {
        row.id: SimpleNamespace(**row._asdict())
        for row in await session.execute(
            select(*PROGRESS_COLUMNS)
            .where(_among(session, Contract.id, contract_ids))
            .order_by(Contract.id)
            .with_for_update()
        )
    }
    if principal is not None and any(
        principal.person_id != c.guardian_id for c in contracts.values()
    ):
        raise not_found("课次不存在。")
    rows_of: dict[str, list[Any]] = {contract_id: [] for contract_id in contract_ids}
    for row in (
        await session.execute(
            select(*LESSON_COLUMNS)
            .where(_among(session, Lesson.id, wanted))
            .order_by(Lesson.contract_id, Lesson.seq)
            .with_for_update()
        )
    ).mappings():
        rows_of[row["contract_id"]].append(row)
    account_ids = sorted({c.account_id for c in contracts.values()})
    state_of = dict(
        (
            await session.execute(
                select(EscrowAccount.id, EscrowAccount.state)
                .where(EscrowAccount.id.in_(account_ids))
                .order_by(EscrowAccount.id)
                .with_for_update(read=True)
            )
        ).all()
    )
    accounts = {a: SimpleNamespace(state=state) for a, state in state_of.items()}
    bal = await ledger.cached_balances(
        session, [code for c in contract_ids for code in (ledger.escrow(c), ledger.reserve(c))]
    )
    status = "confirmed" if principal is not None else "auto_confirmed"
    now = utcnow()
    policy_of: dict[str, FundsPolicy] = {}
    postings: list[Posting] = []
    answered: list[dict[str, Any]] = []
    released_ids: dict[bool, list[str]] = {True: [], False: []}
    for contract_id in contract_ids:
        contract = contracts[contract_id]
        if contract.region_id not in policy_of:
            policy_of[contract.region_id] = await funds_policy(
                session, policies, contract.region_id, today
            )
        policy = policy_of[contract.region_id]
        account = accounts[contract.account_id]
        rows = rows_of[contract_id]
        for row in rows:
            if row["status"] != "reported":
                raise conflict(
                    "该课次已确认或已提出异议。", rule="FUND-04", current_status=row["status"]
                )
            contract.reported_lessons -= 1
            contract.confirmed_lessons += 1
            postings += _settle_postings(contract, account, policy, bal)
        released = contract.released_lessons == contract.confirmed_lessons
        released_ids[released] += [row["id"] for row in rows]
        answered += [{**row, "status": status, "released": released} for row in rows]
    lessons_table = Lesson.__table__
    for released, ids in released_ids.items():
        if ids:
            await session.execute(
                lessons_table.update()
                .where(_among(session, lessons_table.c.id, ids))
                .values(status=status, answered_at=now, released=released)
            )
    if postings:
        await ledger.post_many(session, postings)
    await _write_progress(session, list(contracts.values()), now)
    _expire(session, Lesson, {lesson["id"] for lesson in answered})
    await _release_earlier(session, contracts.values())
    return answered


async def confirm_lessons_each(
    session: AsyncSession,
    policies: PolicyRegistry,
    requests: list[tuple[Principal, str]],
    today: dt.date,
) -> list[dict[str, Any] | Problem]:
    """Many parents' single confirmations (``answer_lesson`` with ``confirm``),
    answered set-wise: a handful of statements for the whole set instead of a
    score per request, one posting per lesson chained under one head lock.
    Each request gets exactly what ``answer_lesson`` would have answered, in
    this order (the requests were concurrent, so any order is a valid one):
    its lesson, or its refusal (404 / 409) as a Problem."""
    ids = sorted({lesson_id for _, lesson_id in requests})
    contract_of = dict(
        (
            await session.execute(
                select(Lesson.id, Lesson.contract_id).where(_among(session, Lesson.id, ids))
            )
        ).all()
    )
    contract_ids = sorted(set(contract_of.values()))
    # Locks as ``answer_lessons`` takes them; plain rows, no ORM objects.
    contracts = {
        row.id: SimpleNamespace(**row._asdict())
        for row in await session.execute(
            select(*PROGRESS_COLUMNS)
            .where(_among(session, Contract.id, contract_ids))
            .order_by(Contract.id)
            .with_for_update()
        )
    }
    locked = {
        row["id"]: dict(row)
        for row in (
            await session.execute(
                select(*LESSON_COLUMNS)
                .where(_among(session, Lesson.id, sorted(contract_of)))
                .order_by(Lesson.id)
                .with_for_update()
            )
        ).mappings()
    }
    account_ids = sorted({c.account_id for c in contracts.values()})
    accounts = {
        account_id: SimpleNamespace(state=state)
        for account_id, state in (
            await session.execute(
                select(EscrowAccount.id, EscrowAccount.state)
                .where(EscrowAccount.id.in_(account_ids))
                .order_by(EscrowAccount.id)
                .with_for_update(read=True)
            )
        ).all()
    }
    codes = [code for c in contract_ids for code in (ledger.escrow(c), ledger.reserve(c))]
    bal = await ledger.cached_balances(session, codes)
    policy_of: dict[str, FundsPolicy] = {}
    postings: list[Posting] = []
    answers: list[dict[str, Any] | Problem] = []
    confirmed: list[dict[str, Any]] = []
    touched: dict[str, Any] = {}
    for principal, lesson_id in requests:
        lesson = locked.get(lesson_id)
        contract = None if lesson is None else contracts.get(lesson["contract_id"])
        if lesson is None or contract is None or principal.person_id != contract.guardian_id:
            answers.append(not_found("课次不存在。"))
            continue
        if lesson["status"] != "reported":
            answers.append(
                conflict(
                    "该课次已确认或已提出异议。", rule="FUND-04", current_status=lesson["status"]
                )
            )
            continue
        if contract.region_id not in policy_of:
            policy_of[contract.region_id] = await funds_policy(
                session, policies, contract.region_id, today
            )
        lesson["status"] = "confirmed"
        contract.reported_lessons -= 1
        contract.confirmed_lessons += 1
        postings += _settle_postings(
            contract, accounts[contract.account_id], policy_of[contract.region_id], bal
        )
        touched[contract.id] = contract
        confirmed.append(lesson)
        answers.append(lesson)
    if postings:
        await ledger.post_many(session, postings)
    now = utcnow()
    released_ids: dict[bool, list[str]] = {True: [], False: []}
    for lesson in confirmed:
        contract = touched[lesson["contract_id"]]
        lesson["released"] = contract.released_lessons == contract.confirmed_lessons
        released_ids[lesson["released"]].append(lesson["id"])
    lessons_table = Lesson.__table__
    for released, lesson_ids in released_ids.items():
        if lesson_ids:
            await session.execute(
                lessons_table.update()
                .where(_among(session, lessons_table.c.id, lesson_ids))
                .values(status="confirmed", answered_at=now, released=released)
            )
    if touched:
        await _write_progress(session, list(touched.values()), now)
    _expire(session, Lesson, {lesson["id"] for lesson in confirmed})
    await _release_earlier(session, touched.values())
    return answers


# ---------------------------------------------------------------- refunds (FUND-06)


async def _quote(session: AsyncSession, contract: Contract) -> rules.RefundQuote:
    bal = await ledger.balances(session, [ledger.escrow(contract.id), ledger.reserve(contract.id)])
    return rules.refund_quote(
        lessons=contract.lessons,
        refunded=contract.refunded_lessons,
        confirmed=contract.confirmed_lessons,
        reported=contract.reported_lessons,
        price_per_lesson_fen=contract.price_per_lesson_fen,
        escrow_fen=bal[ledger.escrow(contract.id)],
        reserve_fen=bal[ledger.reserve(contract.id)],
    )


async def request_refund(
    session: AsyncSession,
    policies: PolicyRegistry,
    principal: Principal,
    contract_id: str,
    reason: str | None,
    today: dt.date,
) -> Refund:
    contract = await _lock_contract(session, contract_id)
    if contract is None or contract.guardian_id != principal.person_id:
        raise not_found("合同不存在。")
    if contract.status == "refunding":
        raise conflict("该合同已有办理中的退费申请。", rule="FUND-06")
    if contract.status != "active":
        raise conflict(
            "合同未缴费或已关闭，无可退费用。", rule="FUND-06", current_status=contract.status
        )
    quote = await _quote(session, contract)
    if quote.amount_fen <= 0:
        raise rule_violation("FUND-06", "没有未消课时或未释放的保证金，无可退费用。", status=409)
    policy = await funds_policy(session, policies, contract.region_id, today)
    respond_by, due_by = rules.refund_deadlines(today, await calendar(session), policy)
    refund = Refund(
        id=_id(),
        contract_id=contract.id,
        institution_id=contract.institution_id,
        account_id=contract.account_id,
        region_id=contract.region_id,
        open_contract_id=contract.id,
        origin="parent",
        lessons=quote.lessons,
        amount_fen=quote.amount_fen,
        status="requested",
        requested_on=today,
        respond_by=respond_by,
        due_by=due_by,
        reason=reason,
    )
    session.add(refund)
    contract.status = "refunding"
    await session.flush()
    await emit(
        session,
        ev.RefundRequested(
            refund_id=refund.id,
            contract_id=contract.id,
            institution_id=contract.institution_id,
            region_id=contract.region_id,
            amount_fen=refund.amount_fen,
            lessons=refund.lessons,
            respond_by=respond_by,
            due_by=due_by,
        ),
    )
    await check_refund_spike(session, policy, contract.institution_id, contract.region_id, today)
    return refund


async def respond_refund(
    session: AsyncSession, principal: Principal, refund_id: str, agree: bool, answer: str | None
) -> Refund:
    refund = await _lock_refund(session, refund_id)
    if refund is None or not principal.has_tenant("institution", refund.institution_id):
        raise not_found("退费申请不存在。")
    if refund.status != "requested":
        raise conflict("该退费申请已答复或已办结。", rule="FUND-06", current_status=refund.status)
    refund.status = "agreed" if agree else "objected"
    refund.answer = answer
    return refund


async def decide_refund(
    session: AsyncSession, principal: Principal, refund_id: str, approve: bool, answer: str | None
) -> Refund:
    """The regulator decides a refund the institution objected to."""
    refund = await _lock_refund(session, refund_id)
    if refund is None or not principal.has_tenant("region", refund.region_id):
        raise not_found("退费申请不存在。")
    if refund.status != "objected":
        raise conflict("只有机构提出异议的退费申请需要监管部门裁定。", rule="FUND-06")
    contract = await _lock_contract(session, refund.contract_id)
    assert contract is not None
    refund.answer = answer
    if approve:
        refund.status = "approved"
    else:
        refund.status = "rejected"
        refund.open_contract_id = None
        contract.status = "active"
    return refund


async def _lock_refund(session: AsyncSession, refund_id: str) -> Refund | None:
    return (
        await session.execute(
            select(Refund)
            .where(Refund.id == refund_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def execute_refund(
    session: AsyncSession,
    policies: PolicyRegistry,
    bank_id: str,
    refund_id: str,
    bank_ref: str,
    today: dt.date,
) -> Refund:
    """The bank pays the refund back to the original payment account."""
    found = await session.get(Refund, refund_id)
    if found is None:
        raise not_found("退费申请不存在。")
    contract = await _lock_contract(session, found.contract_id)
    assert contract is not None
    account = await _account_shared(session, contract.account_id)
    if account.bank_id != bank_id:
        raise not_found("退费申请不存在。")
    refund = await _lock_refund(session, refund_id)
    assert refund is not None
    if refund.status == "paid":
        raise conflict("该退费已办结。", rule="FUND-06")
    if refund.status not in ("agreed", "deemed_agreed", "approved"):
        raise rule_violation(
            "FUND-06",
            "退费尚待机构答复或监管裁定，暂不能执行。",
            status=409,
            refund_status=refund.status,
        )
    policy = await funds_policy(session, policies, contract.region_id, today)
    # What confirmed lessons earned goes to the institution first (if not frozen).
    await settle(session, contract, account, policy)
    quote = await _quote(session, contract)
    bal = await ledger.balances(session, [ledger.escrow(contract.id), ledger.reserve(contract.id)])
    from_reserve = min(bal[ledger.reserve(contract.id)], quote.amount_fen)
    from_escrow = quote.amount_fen - from_reserve
    if quote.amount_fen > 0:
        legs = []
        if from_escrow:
            legs.append(
                Leg(ledger.escrow(contract.id), -from_escrow, contract.institution_id, contract.id)
            )
        if from_reserve:
            legs.append(
                Leg(
                    ledger.reserve(contract.id), -from_reserve, contract.institution_id, contract.id
                )
            )
        legs.append(
            Leg(
                ledger.refunds_paid(contract.institution_id),
                quote.amount_fen,
                contract.institution_id,
            )
        )
        posting = await ledger.post(
            session,
            Posting(
                kind="refund",
                ref=refund.id,
                memo="退费退回原支付账户",
                bank_ref=bank_ref,
                bank_id=bank_id,
                legs=legs,
            ),
        )
        refund.journal_seq = posting.seq
    refund.status = "paid"
    refund.open_contract_id = None
    refund.paid_at = utcnow()
    refund.paid_fen = quote.amount_fen
    refund.lessons = quote.lessons
    refund.payee_account = contract.payer_account
    contract.refunded_lessons += quote.lessons
    contract.refunded_fen += quote.amount_fen
    contract.status = "refunded"
    await session.flush()
    await settle(session, contract, account, policy)
    await emit(
        session,
        ev.RefundPaid(
            refund_id=refund.id,
            contract_id=contract.id,
            institution_id=contract.institution_id,
            region_id=contract.region_id,
            amount_fen=quote.amount_fen,
            origin="parent" if refund.origin == "parent" else "freeze_plan",
            paid_at=refund.paid_at,
            late=today > refund.due_by,
        ),
    )
    return refund


# ---------------------------------------------------------------- payouts (FUND-04)


async def create_payouts(
    session: AsyncSession, policies: PolicyRegistry, bank_id: str, today: dt.date
) -> list[Payout]:
    """Batch every releasable balance of the bank's active accounts into payout instructions."""
    accounts = (
        (
            await session.execute(
                select(EscrowAccount)
                .where(EscrowAccount.bank_id == bank_id, EscrowAccount.state == "active")
                .order_by(EscrowAccount.id)
                .with_for_update(read=True)
                .execution_options(populate_existing=True)
            )
        )
        .scalars()
        .all()
    )
    batch_id = _id()
    payouts: list[Payout] = []
    postings: list[Posting] = []
    for account in accounts:
        code = ledger.releasable(account.institution_id)
        amount = (await ledger.balances(session, [code]))[code]
        if amount <= 0:
            continue
        payout = Payout(
            id=_id(),
            batch_id=batch_id,
            institution_id=account.institution_id,
            account_id=account.id,
            bank_id=bank_id,
            amount_fen=amount,
            status="instructed",
            journal_seq=0,
        )
        payouts.append(payout)
        postings.append(
            Posting(
                kind="payout_instructed",
                ref=payout.id,
                memo="机构结算款划付指令",
                bank_id=bank_id,
                legs=[
                    Leg(code, -amount, account.institution_id),
                    Leg(
                        ledger.payout_instructed(account.institution_id),
                        amount,
                        account.institution_id,
                    ),
                ],
            )
        )
    if postings:
        await ledger.post_many(session, postings)
    for payout, posting in zip(payouts, postings, strict=True):
        payout.journal_seq = posting.seq
        session.add(payout)
        account = next(a for a in accounts if a.id == payout.account_id)
        policy = await funds_policy(session, policies, account.region_id, today)
        if rules.is_large_movement(payout.amount_fen, policy):
            await raise_alert(
                session,
                "large_movement",
                f"大额划付：{_yuan(payout.amount_fen)} 元",
                institution_id=payout.institution_id,
                region_id=account.region_id,
                dedupe=f"large:{payout.id}",
                facts={"amount_fen": payout.amount_fen, "payout_id": payout.id},
            )
    await session.flush()
    return payouts


async def execute_payout(
    session: AsyncSession, bank_id: str, payout_id: str, bank_ref: str
) -> Payout:
    payout = (
        await session.execute(
            select(Payout)
            .where(Payout.id == payout_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if payout is None or payout.bank_id != bank_id:
        raise not_found("划付指令不存在。")
    if payout.status != "instructed":
        raise conflict("该划付指令已执行。", rule="FUND-04")
    await ledger.post(
        session,
        Posting(
            kind="payout_executed",
            ref=payout.id,
            memo="机构结算款已划付",
            bank_ref=bank_ref,
            bank_id=bank_id,
            legs=[
                Leg(
                    ledger.payout_instructed(payout.institution_id),
                    -payout.amount_fen,
                    payout.institution_id,
                ),
                Leg(
                    ledger.paid_out(payout.institution_id), payout.amount_fen, payout.institution_id
                ),
            ],
        ),
    )
    payout.status = "executed"
    payout.executed_at = utcnow()
    await emit(
        session,
        ev.PayoutExecuted(
            payout_id=payout.id,
            institution_id=payout.institution_id,
            amount_fen=payout.amount_fen,
            executed_at=payout.executed_at,
        ),
    )
    return payout


# ---------------------------------------------------------------- risk (FUND-08)


async def raise_alert(
    session: AsyncSession,
    kind: str,
    detail: str,
    *,
    institution_id: str | None,
    region_id: str | None,
    dedupe: str,
    facts: dict[str, Any],
) -> bool:
    alert_id = _id()
    now = utcnow()
    result = await session.execute(
        _insert(session)(RiskAlert)
        .values(
            id=alert_id,
            kind=kind,
            institution_id=institution_id,
            region_id=region_id,
            detail=detail,
            facts=facts,
            dedupe_key=dedupe,
            created_at=now,
        )
        .on_conflict_do_nothing()
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    await emit(
        session,
        ev.RiskAlertRaised(
            alert_id=alert_id,
            kind=kind,  # type: ignore[arg-type]
            institution_id=institution_id,
            region_id=region_id,
            detail=detail,
            raised_at=now,
        ),
    )
    return True


async def check_refund_spike(
    session: AsyncSession, policy: FundsPolicy, institution_id: str, region_id: str, today: dt.date
) -> None:
    since = today - dt.timedelta(days=policy.risk_alerts.window_days)
    recent = await session.scalar(
        select(func.count())
        .select_from(Refund)
        .where(
            Refund.institution_id == institution_id,
            Refund.origin == "parent",
            Refund.requested_on > since,
        )
    )
    contracts = await session.scalar(
        select(func.count())
        .select_from(Contract)
        .where(Contract.institution_id == institution_id, Contract.status != "pending_payment")
    )
    if rules.is_refund_spike(int(recent or 0), int(contracts or 0), policy):
        await raise_alert(
            session,
            "refund_spike",
            f"近 {policy.risk_alerts.window_days} 天退费申请 {recent} 笔（合同 {contracts} 份）",
            institution_id=institution_id,
            region_id=region_id,
            dedupe=f"refund_spike:{institution_id}:{today.isoformat()}",
            facts={"refunds": int(recent or 0), "contracts": int(contracts or 0)},
        )


async def risk_scan(session: AsyncSession, today: dt.date) -> int:
    """FUND-08: liabilities above the escrow balance; releases beyond confirmed lessons."""
    raised = 0
    accounts = (await session.execute(select(EscrowAccount))).scalars().all()
    for account in accounts:
        contracts = (
            (await session.execute(select(Contract).where(Contract.account_id == account.id)))
            .scalars()
            .all()
        )
        if not contracts:
            continue
        codes = [ledger.escrow(c.id) for c in contracts] + [ledger.reserve(c.id) for c in contracts]
        bal = await ledger.balances(session, codes)
        held = sum(bal.values())
        liabilities = sum(
            (c.lessons - c.refunded_lessons - c.confirmed_lessons) * c.price_per_lesson_fen
            for c in contracts
            if c.mode == "prepaid" and c.status in ("active", "refunding")
        )
        if rules.liabilities_exceed_balance(liabilities, held):
            raised += await raise_alert(
                session,
                "liabilities_exceed_balance",
                f"未消课时负债 {_yuan(liabilities)} 元超过专户余额 {_yuan(held)} 元",
                institution_id=account.institution_id,
                region_id=account.region_id,
                dedupe=f"liabilities:{account.id}:{today.isoformat()}",
                facts={"liabilities_fen": liabilities, "held_fen": held},
            )
        released = dict(
            (
                await session.execute(
                    select(JournalTransaction.ref, func.sum(JournalEntry.amount_fen))
                    .join(JournalEntry, JournalEntry.seq == JournalTransaction.seq)
                    .where(
                        JournalTransaction.kind == "release",
                        JournalEntry.account.like(f"{ledger.ESCROW}:%"),
                        JournalTransaction.ref.in_([c.id for c in contracts]),
                    )
                    .group_by(JournalTransaction.ref)
                )
            ).all()
        )
        for c in contracts:
            out = -int(released.get(c.id, 0) or 0)
            earned = c.confirmed_lessons * c.price_per_lesson_fen
            if out > earned:
                raised += await raise_alert(
                    session,
                    "release_without_confirmed_lesson",
                    f"合同 {c.id} 划转 {_yuan(out)} 元，超过已确认课次应得 {_yuan(earned)} 元",
                    institution_id=c.institution_id,
                    region_id=c.region_id,
                    dedupe=f"release:{c.id}:{out}",
                    facts={"released_fen": out, "earned_fen": earned},
                )
    return raised


# ---------------------------------------------------------------- sweeps


@dataclass
class SweepResult:
    auto_confirmed: int = 0
    deemed_agreed: int = 0
    overdue: int = 0
    disputes_overdue: int = 0
    released_contracts: int = 0
    alerts: int = 0


async def sweep(session: AsyncSession, policies: PolicyRegistry, today: dt.date) -> SweepResult:
    """Time-driven steps: auto-confirm (FUND-04), deemed agreement and overdue
    refunds (FUND-06), catch-up releases after an unfreeze, risk scan (FUND-08)."""
    result = SweepResult()
    due_lessons = (
        (
            await session.execute(
                select(Lesson.id).where(
                    Lesson.status == "reported", Lesson.auto_confirm_on <= today
                )
            )
        )
        .scalars()
        .all()
    )
    if due_lessons:
        await answer_lessons(session, policies, None, list(due_lessons), today)
        result.auto_confirmed = len(due_lessons)
    refunds = (
        (
            await session.execute(
                select(Refund)
                .where(Refund.status == "requested", Refund.respond_by < today)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        )
        .scalars()
        .all()
    )
    for refund in refunds:
        refund.status = "deemed_agreed"
        result.deemed_agreed += 1
    overdue = (
        (
            await session.execute(
                select(Refund)
                .where(
                    Refund.status.in_(OPEN_REFUND),
                    Refund.due_by < today,
                    Refund.overdue_reported.is_(False),
                )
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        )
        .scalars()
        .all()
    )
    for refund in overdue:
        refund.overdue_reported = True
        await emit(
            session,
            ev.RefundOverdue(
                refund_id=refund.id,
                contract_id=refund.contract_id,
                institution_id=refund.institution_id,
                region_id=refund.region_id,
                amount_fen=refund.amount_fen,
                due_by=refund.due_by,
                status=refund.status,
            ),
        )
        result.overdue += 1
    disputes = (
        (
            await session.execute(
                select(Lesson)
                .where(
                    Lesson.status == "disputed",
                    Lesson.resolve_by < today,
                    Lesson.dispute_overdue_reported.is_(False),
                )
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        )
        .scalars()
        .all()
    )
    for lesson in disputes:
        lesson.dispute_overdue_reported = True
        region_id = await session.scalar(
            select(Contract.region_id).where(Contract.id == lesson.contract_id)
        )
        assert lesson.resolve_by is not None and region_id is not None
        await emit(
            session,
            ev.LessonDisputeOverdue(
                lesson_id=lesson.id,
                contract_id=lesson.contract_id,
                institution_id=lesson.institution_id,
                region_id=region_id,
                resolve_by=lesson.resolve_by,
            ),
        )
        result.disputes_overdue += 1
    # Catch-up releases (e.g. after an account is unfrozen).
    pending = (
        (
            await session.execute(
                select(Contract.id)
                .join(EscrowAccount, EscrowAccount.id == Contract.account_id)
                .where(
                    EscrowAccount.state == "active",
                    Contract.released_gross_fen
                    < Contract.confirmed_lessons * Contract.price_per_lesson_fen,
                )
            )
        )
        .scalars()
        .all()
    )
    for contract_id in pending:
        contract = await _lock_contract(session, contract_id)
        assert contract is not None
        account = await _account_shared(session, contract.account_id)
        policy = await funds_policy(session, policies, contract.region_id, today)
        if await settle(session, contract, account, policy):
            result.released_contracts += 1
    result.alerts = await risk_scan(session, today)
    return result


# ---------------------------------------------------------------- reconciliation (FUND-08)

STATEMENT_KINDS = {"payment": "payment", "refund": "refund", "payout": "payout_executed"}


def _movement_amount(kind: str, legs: list[tuple[str, int]]) -> int:
    if kind == "payment":
        return -sum(a for acc, a in legs if acc == ledger.PARENT_PAYMENTS)
    if kind == "refund":
        return sum(a for acc, a in legs if acc.startswith(ledger.REFUNDS_PAID + ":"))
    return sum(a for acc, a in legs if acc.startswith(ledger.PAID_OUT + ":"))


async def reconcile(
    session: AsyncSession, bank_id: str, statement_date: dt.date, text: str
) -> Reconciliation:
    """Match each statement line (bank_ref, kind, amount_fen) to a journal
    movement of this bank on that day (China time), and report every mismatch
    on either side."""
    mismatches: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    reader = csv.DictReader(io.StringIO(text))
    required = {"bank_ref", "kind", "amount_fen"}
    if reader.fieldnames is None or not required <= set(reader.fieldnames):
        raise Problem(
            422,
            "对账单须为 CSV，表头至少包含 bank_ref,kind,amount_fen。",
            errors=[FieldError(field="body", message="缺少列 bank_ref/kind/amount_fen")],
        )
    for number, row in enumerate(reader, start=2):
        kind = (row.get("kind") or "").strip()
        ref = (row.get("bank_ref") or "").strip()
        try:
            amount = int((row.get("amount_fen") or "").strip())
        except ValueError:
            raise Problem(
                422,
                f"对账单第 {number} 行金额不是整数（分）。",
                errors=[FieldError(field=f"line {number}.amount_fen", message="应为整数（分）")],
            ) from None
        if kind not in STATEMENT_KINDS or not ref:
            raise Problem(
                422,
                f"对账单第 {number} 行类型或流水号无效（类型：payment/refund/payout）。",
                errors=[FieldError(field=f"line {number}", message="类型或流水号无效")],
            )
        lines.append({"line": number, "bank_ref": ref, "kind": kind, "amount_fen": amount})
    start = dt.datetime.combine(statement_date, dt.time(0), CHINA)
    end = start + dt.timedelta(days=1)
    txns = (
        (
            await session.execute(
                select(JournalTransaction).where(
                    JournalTransaction.bank_id == bank_id,
                    JournalTransaction.bank_ref.is_not(None),
                    JournalTransaction.kind.in_(list(STATEMENT_KINDS.values())),
                    JournalTransaction.posted_at >= start,
                    JournalTransaction.posted_at < end,
                )
            )
        )
        .scalars()
        .all()
    )
    legs: dict[int, list[tuple[str, int]]] = {}
    if txns:
        rows = await session.execute(
            select(JournalEntry.seq, JournalEntry.account, JournalEntry.amount_fen).where(
                JournalEntry.seq.in_([t.seq for t in txns])
            )
        )
        for s, acc, amt in rows.all():
            legs.setdefault(s, []).append((acc, int(amt)))
    journal = {
        (t.kind, t.bank_ref): (t.seq, _movement_amount(t.kind, legs.get(t.seq, []))) for t in txns
    }
    seen: set[tuple[str, str | None]] = set()
    matched = 0
    for line in lines:
        key = (STATEMENT_KINDS[line["kind"]], line["bank_ref"])
        if key in seen:
            mismatches.append({**line, "problem": "duplicate_line", "detail": "对账单重复行"})
            continue
        seen.add(key)
        found = journal.get(key)
        if found is None:
            mismatches.append(
                {
                    **line,
                    "problem": "missing_in_journal",
                    "detail": "银行有记录，平台账簿无对应流水",
                }
            )
        elif found[1] != line["amount_fen"]:
            mismatches.append(
                {
                    **line,
                    "problem": "amount_differs",
                    "journal_seq": found[0],
                    "journal_amount_fen": found[1],
                    "detail": "金额不一致",
                }
            )
        else:
            matched += 1
    for (kind, ref), (seq, amount) in sorted(journal.items(), key=lambda kv: kv[1][0]):
        if (kind, ref) not in seen:
            mismatches.append(
                {
                    "line": None,
                    "bank_ref": ref,
                    "kind": next(k for k, v in STATEMENT_KINDS.items() if v == kind),
                    "amount_fen": amount,
                    "journal_seq": seq,
                    "problem": "missing_in_statement",
                    "detail": "平台账簿有流水，银行对账单无对应记录",
                }
            )
    rec = Reconciliation(
        id=_id(),
        bank_id=bank_id,
        statement_date=statement_date,
        lines=len(lines),
        matched=matched,
        mismatches=mismatches,
    )
    session.add(rec)
    await session.flush()
    if mismatches:
        await raise_alert(
            session,
            "reconciliation_mismatch",
            f"{statement_date.isoformat()} 银行对账单有 {len(mismatches)} 处不符",
            institution_id=None,
            region_id=None,
            dedupe=f"reconcile:{rec.id}",
            facts={"reconciliation_id": rec.id, "mismatches": len(mismatches)},
        )
    return rec
