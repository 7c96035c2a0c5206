"""Pure funds rules against policy profiles (FUND-01, 02, 04, 05, 06, 08; INST-02)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from chassis.calendar import Calendar
from chassis.policy import PolicyRegistry
from services.funds import rules

REG = PolicyRegistry.load()
NATIONAL = REG.profile("national").funds
D = dt.date(2026, 3, 2)  # a Monday
ONE_DAY = dt.timedelta(days=1)

LICENSED = rules.InstitutionFacts("licensed", True, False, False)
COURSE = rules.CourseFacts("i1", 10000, 60, dt.date(2026, 1, 1), dt.date(2026, 12, 31))


def req(**over: object) -> rules.PurchaseRequest:
    base: dict[str, object] = {
        "institution_id": "i1",
        "lessons": 10,
        "price_per_lesson_fen": 10000,
        "starts_on": D,
        "ends_on": D + dt.timedelta(days=60),
        "mode": "prepaid",
        "today": D,
    }
    base.update(over)
    return rules.PurchaseRequest(**base)  # type: ignore[arg-type]


def check(inst=LICENSED, account="active", course=COURSE, policy=NATIONAL, **over):  # type: ignore[no-untyped-def]
    return rules.check_purchase(inst, account, course, req(**over), policy)


def test_fund02_a_valid_purchase_passes() -> None:
    assert check() is None


@pytest.mark.parametrize(
    ("inst", "rule"),
    [
        (None, "FUND-02"),
        (rules.InstitutionFacts("suspended", False, False, False), "FUND-02"),
        (rules.InstitutionFacts("revoked", False, False, False), "FUND-02"),
        (rules.InstitutionFacts("licensed", True, True, False), "FUND-02"),
        (rules.InstitutionFacts("licensed", False, False, True), "INST-02"),
        # A licence past its last valid day, although no event said so.
        (
            rules.InstitutionFacts("licensed", True, False, False, D - dt.timedelta(days=1)),
            "FUND-02",
        ),
    ],
)
def test_fund02_inst02_who_may_charge(inst: rules.InstitutionFacts | None, rule: str) -> None:
    refusal = check(inst=inst)
    assert refusal is not None and refusal.rule == rule


def test_fund02_a_licence_sells_through_its_last_valid_day() -> None:
    assert check(inst=rules.InstitutionFacts("licensed", True, False, False, D)) is None
    refusal = check(
        inst=rules.InstitutionFacts("licensed", True, False, False, D),
        today=D + dt.timedelta(days=1),
    )
    assert refusal is not None and refusal.rule == "FUND-02"
    assert refusal.facts == {"licence_valid_until": D.isoformat()}


def test_fund01_no_active_account_no_sale_and_fund07_frozen() -> None:
    assert check(account=None).rule == "FUND-01"
    assert check(account="closed").rule == "FUND-01"
    assert check(account="frozen").rule == "FUND-07"


def test_fund02_unfiled_course_and_price_mismatch() -> None:
    assert check(course=None).rule == "FUND-02"
    other = rules.CourseFacts("i2", 10000, 60, COURSE.period_start, COURSE.period_end)
    assert check(course=other).rule == "FUND-02"
    refusal = check(price_per_lesson_fen=10001)
    assert refusal.rule == "FUND-02" and refusal.facts["filed_price_fen"] == 10000


def test_fund02_limits_lessons_amount_months_from_profile() -> None:
    assert check(lessons=60, price_per_lesson_fen=10000).rule == "FUND-02"  # 6000 yuan > 5000
    cheap = rules.CourseFacts("i1", 5000, 100, COURSE.period_start, COURSE.period_end)
    assert check(course=cheap, lessons=60, price_per_lesson_fen=5000) is None  # 3000 yuan
    r = check(course=cheap, lessons=61, price_per_lesson_fen=5000)
    assert r.rule == "FUND-02" and r.facts["limit"] == 60
    at_limit = rules.CourseFacts("i1", 50000, 60, COURSE.period_start, COURSE.period_end)
    assert check(course=at_limit, lessons=10, price_per_lesson_fen=50000) is None  # exactly 5000
    over = rules.CourseFacts("i1", 50001, 60, COURSE.period_start, COURSE.period_end)
    assert check(course=over, lessons=10, price_per_lesson_fen=50001).rule == "FUND-02"
    # 3 months: 2026-03-02 .. 2026-06-02 passes, one day more does not.
    assert check(ends_on=dt.date(2026, 6, 2)) is None
    r = check(ends_on=dt.date(2026, 6, 3))
    assert r.rule == "FUND-02" and r.facts["limit_months"] == 3
    # A profile with other numbers changes the verdicts (no constants in code).
    strict = NATIONAL.model_copy(update={"max_charge_lessons": 5, "max_charge_months": 1})
    assert check(policy=strict).rule == "FUND-02"
    assert check(policy=strict, lessons=5).rule == "FUND-02"  # 60 days > 1 month
    assert check(policy=strict, lessons=5, ends_on=dt.date(2026, 4, 2)) is None


def test_fund02_optional_early_charge_and_renewal_rules() -> None:
    profile = NATIONAL.model_copy(
        update={"earliest_charge_days_before_start": 30, "min_remaining_lessons_before_renewal": 20}
    )
    start = D + dt.timedelta(days=31)
    r = check(policy=profile, starts_on=start, ends_on=start + dt.timedelta(days=30))
    assert r.rule == "FUND-02" and "earliest_charge_on" in r.facts
    start = D + dt.timedelta(days=30)
    assert check(policy=profile, starts_on=start, ends_on=start + dt.timedelta(days=30)) is None
    assert check(policy=profile, remaining_lessons_on_course=21).rule == "FUND-02"
    assert check(policy=profile, remaining_lessons_on_course=20) is None
    # National has neither rule: no refusal.
    assert check(remaining_lessons_on_course=59) is None


def test_fund04_train_first_per_profile() -> None:
    assert check(mode="train_first") is None
    off = NATIONAL.model_copy(update={"train_first_pay_later_allowed": False})
    assert check(policy=off, mode="train_first").rule == "FUND-04"


def test_fund05_reserve_share_and_minimum_exact() -> None:
    assert rules.reserve_part(10000, 0, NATIONAL) == 1000
    assert rules.reserve_part(10001, 0, NATIONAL) == 1001  # ceil
    assert rules.release_split(10000, 0, NATIONAL, final=False) == (9000, 1000)
    assert rules.release_split(10000, 3000, NATIONAL, final=True) == (13000, -3000)
    with_min = NATIONAL.model_copy(update={"risk_reserve_min_fen": 5000})
    assert rules.reserve_part(10000, 0, with_min) == 5000
    assert rules.reserve_part(10000, 4500, with_min) == 1000
    assert rules.reserve_part(300, 0, with_min) == 300  # never more than the release
    zero = NATIONAL.model_copy(update={"risk_reserve_share": Decimal(0)})
    assert rules.reserve_part(10000, 0, zero) == 0


def test_fund04_staged_release_thirds() -> None:
    staged = NATIONAL.model_copy(
        update={
            "release_mode": "staged",
            "release_stages": (Decimal("0.3"), Decimal("0.3"), Decimal("0.4")),
        }
    )
    due = [rules.staged_release_due_fen(30000, 9, c, staged) for c in range(10)]
    assert due == [0, 0, 0, 9000, 9000, 9000, 18000, 18000, 18000, 30000]
    assert rules.staged_release_due_fen(30000, 10, 4, staged) == 9000  # ceil(10/3) = 4
    assert rules.staged_release_due_fen(30000, 10, 3, NATIONAL) == 9000  # per lesson


def test_fund04_auto_confirm_calendar_aware() -> None:
    cal = Calendar.load()
    # 2026-09-28 (Mon) + 7 working days crosses National Day (10-01..10-07/08).
    reported = dt.date(2026, 9, 28)
    due = rules.auto_confirm_on(reported, cal, NATIONAL)
    assert cal.working_days_between(reported, due) == 7
    assert (due - reported).days > 9
    fifteen = NATIONAL.model_copy(update={"auto_confirm_working_days": 15})
    assert cal.working_days_between(reported, rules.auto_confirm_on(reported, cal, fifteen)) == 15


def test_fund06_refund_quote_is_computed() -> None:
    q = rules.refund_quote(
        lessons=10,
        refunded=0,
        confirmed=3,
        reported=1,
        price_per_lesson_fen=10000,
        escrow_fen=70000,
        reserve_fen=3000,
    )
    assert q == rules.RefundQuote(6, 63000)
    # Never more than the escrow holds (e.g. train-first, partly paid).
    q = rules.refund_quote(
        lessons=10,
        refunded=0,
        confirmed=0,
        reported=0,
        price_per_lesson_fen=10000,
        escrow_fen=20000,
        reserve_fen=0,
    )
    assert q.amount_fen == 20000
    respond, due = rules.refund_deadlines(D, Calendar.load(), NATIONAL)
    assert respond == dt.date(2026, 3, 9) and due == dt.date(2026, 3, 23)


def test_fund08_risk_thresholds() -> None:
    assert rules.is_large_movement(5_000_000, NATIONAL)
    assert not rules.is_large_movement(4_999_999, NATIONAL)
    assert rules.is_refund_spike(10, 1000, NATIONAL)
    assert rules.is_refund_spike(2, 10, NATIONAL)  # 20 %
    assert not rules.is_refund_spike(1, 2, NATIONAL)  # a single refund is no spike
    assert not rules.is_refund_spike(2, 11, NATIONAL)
    assert rules.liabilities_exceed_balance(10001, 10000)
    assert not rules.liabilities_exceed_balance(10000, 10000)


def test_add_months_clamps() -> None:
    assert rules.add_months(dt.date(2026, 11, 30), 3) == dt.date(2027, 2, 28)
    assert rules.add_months(dt.date(2026, 1, 31), 1) == dt.date(2026, 2, 28)
