"""Pure policy checks of the funds service (FUND-01..FUND-08).

Every function takes facts and the region's ``PolicyProfile`` (or its
``FundsPolicy``) and returns a verdict; none reads files, clocks or globals.
Money is integer fen; shares are exact (``Fraction``), never float.
"""

from __future__ import annotations

import calendar as _calendar
import datetime as dt
import functools
import math
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any, Protocol

from chassis.policy import FundsPolicy


class WorkingDays(Protocol):
    def add_working_days(self, d: dt.date, n: int) -> dt.date: ...


@dataclass(frozen=True)
class Refusal:
    rule: str
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InstitutionFacts:
    status: str
    can_charge: bool
    blacklisted: bool
    reregistration_pending: bool
    #: The licence's last valid day (institutions' facts); None when unknown.
    licence_valid_until: dt.date | None = None


@dataclass(frozen=True)
class CourseFacts:
    institution_id: str
    price_per_lesson_fen: int
    lesson_count: int
    period_start: dt.date
    period_end: dt.date


@dataclass(frozen=True)
class PurchaseRequest:
    institution_id: str
    lessons: int
    price_per_lesson_fen: int
    starts_on: dt.date
    ends_on: dt.date
    mode: str  # prepaid | train_first
    today: dt.date
    #: Unconsumed lessons of the student's open contracts on the same course (renewal).
    remaining_lessons_on_course: int | None = None


def add_months(d: dt.date, months: int) -> dt.date:
    """``d`` plus whole calendar months, clamped to the month's last day."""
    month_index = d.month - 1 + months
    year = d.year + month_index // 12
    month = month_index % 12 + 1
    day = min(d.day, _calendar.monthrange(year, month)[1])
    return dt.date(year, month, day)


def check_account(account_state: str | None) -> Refusal | None:
    """FUND-01 / FUND-07: an institution sells only with an active escrow account."""
    if account_state is None or account_state == "closed":
        return Refusal("FUND-01", "该机构尚未开设有效的预收费资金监管专户，不得收取预付费用。")
    if account_state == "frozen":
        return Refusal(
            "FUND-07", "该机构的资金监管专户已冻结，暂停收费（仅办理退费）。", {"state": "frozen"}
        )
    return None


def check_institution(inst: InstitutionFacts | None, today: dt.date) -> Refusal | None:
    """FUND-02 / INST-02: who may charge at all. A licence past its validity
    is no licence, although no event said so (expiry is a date, not a
    transition)."""
    if inst is None or inst.status not in ("licensed",):
        status = None if inst is None else inst.status
        return Refusal(
            "FUND-02",
            "该机构未取得有效办学许可（未许可、暂停或吊销），不得收费。",
            {"licence_status": status},
        )
    if inst.licence_valid_until is not None and inst.licence_valid_until < today:
        return Refusal(
            "FUND-02",
            "该机构的办学许可证已过有效期，不得收费。",
            {"licence_valid_until": inst.licence_valid_until.isoformat()},
        )
    if inst.blacklisted:
        return Refusal("FUND-02", "该机构已列入黑名单，不得收费。", {"blacklisted": True})
    if inst.reregistration_pending:
        return Refusal("INST-02", "学科类机构尚未登记为非营利性机构，在此之前暂停招生和收费。", {})
    if not inst.can_charge:
        return Refusal("FUND-02", "该机构当前不得收费。", {})
    return None


def check_purchase(
    inst: InstitutionFacts | None,
    account_state: str | None,
    course: CourseFacts | None,
    req: PurchaseRequest,
    policy: FundsPolicy,
) -> Refusal | None:
    """FUND-01/02 (+INST-02): the first reason a purchase is refused, or None."""
    refusal = check_institution(inst, req.today) or check_account(account_state)
    if refusal is not None:
        return refusal
    if course is None or course.institution_id != req.institution_id:
        return Refusal("FUND-02", "该课程未在主管部门备案，不得收费。", {})
    if req.price_per_lesson_fen != course.price_per_lesson_fen:
        return Refusal(
            "FUND-02",
            "课时单价与备案价格不一致。",
            {"filed_price_fen": course.price_per_lesson_fen, "price_fen": req.price_per_lesson_fen},
        )
    if req.mode == "train_first" and not policy.train_first_pay_later_allowed:
        return Refusal("FUND-04", "本地区不支持“先学后付”模式。", {})
    if req.lessons > course.lesson_count:
        return Refusal(
            "FUND-02",
            "购买课时数超过备案课程的课时总数。",
            {"limit": course.lesson_count, "requested": req.lessons},
        )
    if req.lessons > policy.max_charge_lessons:
        return Refusal(
            "FUND-02",
            f"一次收费不得超过 {policy.max_charge_lessons} 课时。",
            {"limit": policy.max_charge_lessons, "requested": req.lessons},
        )
    total = req.lessons * req.price_per_lesson_fen
    if total > policy.max_charge_fen:
        return Refusal(
            "FUND-02",
            f"一次收费不得超过 {policy.max_charge_fen / 100:.2f} 元。",
            {"limit_fen": policy.max_charge_fen, "requested_fen": total},
        )
    if req.ends_on < req.starts_on:
        return Refusal("FUND-02", "课程结束日期早于开始日期。", {})
    if req.starts_on < course.period_start or req.ends_on > course.period_end:
        return Refusal(
            "FUND-02",
            "收费所涵盖的上课期间超出备案的课程期间。",
            {
                "period_start": course.period_start.isoformat(),
                "period_end": course.period_end.isoformat(),
            },
        )
    span_start = max(req.starts_on, req.today)
    latest_end = add_months(span_start, policy.max_charge_months)
    if req.ends_on > latest_end:
        return Refusal(
            "FUND-02",
            f"一次收费的时间跨度不得超过 {policy.max_charge_months} 个月。",
            {"limit_months": policy.max_charge_months, "latest_end": latest_end.isoformat()},
        )
    days = policy.earliest_charge_days_before_start
    if days is not None and req.today < req.starts_on - dt.timedelta(days=days):
        return Refusal(
            "FUND-02",
            f"不得早于开课前 {days} 天收费。",
            {"earliest_charge_on": (req.starts_on - dt.timedelta(days=days)).isoformat()},
        )
    remaining_max = policy.min_remaining_lessons_before_renewal
    if (
        remaining_max is not None
        and req.remaining_lessons_on_course is not None
        and req.remaining_lessons_on_course > remaining_max
    ):
        return Refusal(
            "FUND-02",
            f"剩余课时不超过 {remaining_max} 节时方可续费。",
            {"limit": remaining_max, "remaining": req.remaining_lessons_on_course},
        )
    return None


# ---------------------------------------------------------------- release (FUND-04/05)


@functools.lru_cache(maxsize=64)
def _fraction(share: Decimal) -> Fraction:
    """The profile's share as an exact fraction (made once per value)."""
    return Fraction(share)


def reserve_part(amount_fen: int, reserve_held_fen: int, policy: FundsPolicy) -> int:
    """FUND-05: fen of a release that stays in the risk reserve.

    ``ceil(share × amount)``, topped up while the contract's reserve is below
    the profile's minimum; never more than the amount itself.
    """
    if amount_fen < 0 or reserve_held_fen < 0:
        raise ValueError("amounts must be non-negative")
    by_share = math.ceil(amount_fen * _fraction(policy.risk_reserve_share))
    top_up = max(policy.risk_reserve_min_fen - reserve_held_fen, 0)
    return min(amount_fen, max(by_share, top_up))


def release_split(
    amount_fen: int, reserve_held_fen: int, policy: FundsPolicy, *, final: bool
) -> tuple[int, int]:
    """FUND-04/05: (to the institution, into the reserve) for a confirmed lesson.

    When the contract completes (``final``) nothing more is withheld and the
    whole reserve is released too: the result's first part then includes it
    and the second is ``-reserve_held_fen``.
    """
    if final:
        return amount_fen + reserve_held_fen, -reserve_held_fen
    kept = reserve_part(amount_fen, reserve_held_fen, policy)
    return amount_fen - kept, kept


def staged_release_due_fen(
    total_fen: int, lessons: int, confirmed: int, policy: FundsPolicy
) -> int:
    """FUND-04 staged release: fen due to the institution after ``confirmed`` lessons.

    Stage ``i`` of ``k`` is due once ``ceil(lessons × (i+1)/k)`` lessons are
    confirmed (e.g. 30 % / 30 % / 40 % at one third, two thirds and the end).
    Per-lesson mode: the whole price of each confirmed lesson.
    """
    if policy.release_mode != "staged":
        return total_fen * confirmed // lessons if lessons else 0
    amounts = policy.stage_amounts_fen(total_fen)
    k = len(amounts)
    due = 0
    for i, amount in enumerate(amounts):
        threshold = math.ceil(Fraction(lessons * (i + 1), k))
        if confirmed >= threshold:
            due += amount
    return due


def auto_confirm_on(reported_on: dt.date, cal: WorkingDays, policy: FundsPolicy) -> dt.date:
    """FUND-04: an unanswered report is confirmed on this working day."""
    return cal.add_working_days(reported_on, policy.auto_confirm_working_days)


def dispute_resolve_by(disputed_on: dt.date, cal: WorkingDays, policy: FundsPolicy) -> dt.date:
    """FUND-04: a disputed lesson is to be resolved within the profile's
    response time (the working days an institution has to answer a refund)."""
    return cal.add_working_days(disputed_on, policy.refund_response_working_days)


# ---------------------------------------------------------------- refunds (FUND-06)


@dataclass(frozen=True)
class RefundQuote:
    lessons: int
    amount_fen: int


def refund_quote(
    *,
    lessons: int,
    refunded: int,
    confirmed: int,
    reported: int,
    price_per_lesson_fen: int,
    escrow_fen: int,
    reserve_fen: int,
) -> RefundQuote:
    """FUND-06: the refund is computed, never typed in.

    Unconsumed lessons = bought − refunded − confirmed − reported (awaiting
    an answer); amount = unconsumed × price (never more than the contract's
    escrow holds) + the contract's unreleased risk reserve.
    """
    unconsumed = max(lessons - refunded - confirmed - reported, 0)
    by_lessons = min(unconsumed * price_per_lesson_fen, max(escrow_fen, 0))
    return RefundQuote(unconsumed, by_lessons + max(reserve_fen, 0))


def refund_deadlines(
    requested_on: dt.date, cal: WorkingDays, policy: FundsPolicy
) -> tuple[dt.date, dt.date]:
    """FUND-06: (institution answers by, refund paid by), in working days."""
    return (
        cal.add_working_days(requested_on, policy.refund_response_working_days),
        cal.add_working_days(requested_on, policy.refund_deadline_working_days),
    )


# ---------------------------------------------------------------- risk (FUND-08)


def is_large_movement(amount_fen: int, policy: FundsPolicy) -> bool:
    return abs(amount_fen) >= policy.risk_alerts.large_movement_fen


def is_refund_spike(refunds_in_window: int, active_contracts: int, policy: FundsPolicy) -> bool:
    """Refund requests in the window reach the count, or their share of the
    institution's contracts reaches the ratio (with at least 2 requests)."""
    ra = policy.risk_alerts
    if refunds_in_window >= ra.refund_spike_count:
        return True
    if active_contracts <= 0 or refunds_in_window < 2:
        return False
    return Fraction(refunds_in_window, active_contracts) >= Fraction(ra.refund_spike_ratio)


def liabilities_exceed_balance(liabilities_fen: int, escrow_balance_fen: int) -> bool:
    return liabilities_fen > escrow_balance_fen
