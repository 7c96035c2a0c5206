"""Pure after-school rules against the policy profiles (AS-01..AS-08)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from chassis.calendar import Calendar
from chassis.policy import PolicyRegistry
from services.afterschool import rules
from services.afterschool.rules import Session

REG = PolicyRegistry.load()
NATIONAL = REG.profile("national").afterschool
JINHUA = REG.profile("jinhua").afterschool
T = dt.time


def s(kind, a, b):
    return Session(kind, T.fromisoformat(a), T.fromisoformat(b))


GOOD_PRIMARY = [s("regular", "15:30", "17:30"), s("delayed_care", "17:30", "18:30")]


def test_as01_two_hours_and_end_time_by_stage():
    assert rules.check_sessions(NATIONAL, "primary", GOOD_PRIMARY) is None
    short = [s("regular", "15:45", "17:30"), s("delayed_care", "17:30", "18:00")]
    v = rules.check_sessions(NATIONAL, "primary", short)
    assert v and v.rule == "AS-01" and v.facts["minutes"] == 105
    early = [s("regular", "15:00", "17:29"), s("delayed_care", "17:30", "18:00")]
    v = rules.check_sessions(NATIONAL, "primary", early)
    assert v and v.rule == "AS-01" and v.facts["min_end_time"] == "17:30"
    # 17:30 is enough for primary but not for junior (18:00)
    v = rules.check_sessions(NATIONAL, "junior", GOOD_PRIMARY)
    assert v and v.facts["min_end_time"] == "18:00"
    # split sessions add up
    split = [
        s("regular", "15:00", "16:00"),
        s("regular", "16:30", "17:30"),
        s("delayed_care", "17:30", "18:00"),
    ]
    assert rules.check_sessions(NATIONAL, "primary", split) is None
    overlapping = [s("regular", "15:00", "16:30"), s("regular", "16:00", "17:30")]
    assert rules.check_sessions(NATIONAL, "primary", overlapping).rule == "AS-01"


def test_as01_evening_study_junior_only_and_by_2030():
    base = [s("regular", "16:00", "18:00"), s("delayed_care", "18:00", "18:30")]
    assert (
        rules.check_sessions(NATIONAL, "junior", [*base, s("evening_study", "19:00", "20:30")])
        is None
    )
    v = rules.check_sessions(NATIONAL, "junior", [*base, s("evening_study", "19:00", "20:31")])
    assert v and v.rule == "AS-01" and v.facts["latest_end"] == "20:30"
    v = rules.check_sessions(
        NATIONAL, "primary", [*GOOD_PRIMARY, s("evening_study", "19:00", "20:00")]
    )
    assert v and "初中" in v.detail


def test_as01_delayed_care_required_by_profile_and_after_regular_end():
    v = rules.check_sessions(NATIONAL, "primary", [s("regular", "15:30", "17:30")])
    assert v and "延时托管" in v.detail
    relaxed = NATIONAL.model_copy(update={"delayed_care_required": False})
    assert rules.check_sessions(relaxed, "primary", [s("regular", "15:30", "17:30")]) is None
    v = rules.check_sessions(
        NATIONAL, "primary", [s("regular", "15:30", "17:30"), s("delayed_care", "17:00", "18:00")]
    )
    assert v and v.rule == "AS-01"


def test_as01_service_days_skip_holidays_and_weekends_and_honour_swaps():
    cal = Calendar.load("jinhua")
    days = rules.service_days(cal, dt.date(2026, 9, 14), dt.date(2026, 10, 11), NATIONAL)
    assert dt.date(2026, 9, 20) in days  # Sunday working day
    assert dt.date(2026, 10, 10) in days  # Saturday working day
    assert dt.date(2026, 9, 25) not in days  # 中秋
    assert not any(dt.date(2026, 10, d) in days for d in range(1, 8))  # 国庆
    assert dt.date(2026, 9, 19) not in days  # ordinary Saturday
    assert all(d.isoweekday() <= 5 or cal.is_workday_swap(d) for d in days)
    # outside a term (summer vacation) nothing is served
    assert rules.service_days(cal, dt.date(2026, 7, 6), dt.date(2026, 7, 10), NATIONAL) == []


def test_as02_kinds_and_one_plus_one_by_profile():
    assert rules.check_course_kind("homework_guidance") is None
    assert rules.check_course_kind("labour") is None
    for bad in ("new_lessons", "讲新课", "math_lecture"):
        assert rules.check_course_kind(bad).rule == "AS-02"
    menu = [("homework_guidance", [1, 2, 3, 4, 5]), ("sport", [1, 3, 5])]
    assert rules.check_interest_daily(NATIONAL, menu) is None  # national: no "1+1"
    v = rules.check_interest_daily(JINHUA, menu)
    assert v and v.rule == "AS-02" and v.facts["weekdays_without_interest"] == [2, 4]
    assert rules.check_interest_daily(JINHUA, [*menu, ("club", [2, 4])]) is None


def test_as03_catalog_entry_and_external_share_exact():
    ok = {"category": "sports", "can_enroll": True, "blacklisted": False, "status": "licensed"}
    day = dt.date(2026, 9, 1)
    check = rules.check_institution_provider
    assert check(ok, day) is None
    assert check(None, day).rule == "AS-03"
    assert check({**ok, "category": "subject"}, day).rule == "AS-03"
    assert check({**ok, "can_enroll": False, "status": "suspended"}, day)
    assert check({**ok, "blacklisted": True}, day)
    # A licence is valid through its last day, and lapses the day after.
    assert check({**ok, "licence_valid_until": day}, day) is None
    lapsed = check({**ok, "licence_valid_until": day}, day + dt.timedelta(days=1))
    assert lapsed and lapsed.rule == "AS-03"
    assert lapsed.facts == {"licence_valid_until": "2026-09-01"}
    assert rules.check_external_share(NATIONAL, 3, 10) is None  # exactly 30 %
    v = rules.check_external_share(NATIONAL, 31, 100)
    assert v and v.rule == "AS-03"
    tighter = NATIONAL.model_copy(update={"max_external_share": Decimal("0.2")})
    assert rules.check_external_share(tighter, 3, 10).rule == "AS-03"


def test_as04_slot_clash_and_window():
    a = ([1, 3], T(15, 30), T(16, 30))
    assert rules.slots_clash(a, ([3], T(16, 0), T(17, 0)))
    assert not rules.slots_clash(a, ([3], T(16, 30), T(17, 30)))  # back to back
    assert not rules.slots_clash(a, ([2, 4], T(15, 30), T(16, 30)))
    now = dt.datetime(2026, 9, 1, 8, tzinfo=dt.UTC)
    assert rules.window_state(now, None, None) == "unset"
    assert rules.window_state(now, now, now + dt.timedelta(hours=1)) == "open"
    assert (
        rules.window_state(now, now + dt.timedelta(seconds=1), now + dt.timedelta(hours=1))
        == "before"
    )
    assert rules.window_state(now, now - dt.timedelta(hours=1), now) == "closed"


def test_as04_lottery_reproducible_from_seed_and_independent_of_arrival_order():
    applicants = [f"s{i:03d}" for i in range(50)]
    first = rules.lottery_order("seed-1", "course-a", applicants)
    assert first == rules.lottery_order("seed-1", "course-a", list(reversed(applicants)))
    assert sorted(first) == applicants
    assert first != rules.lottery_order("seed-2", "course-a", applicants)
    assert first != rules.lottery_order("seed-1", "course-b", applicants)
    assert rules.seed_hash("seed-1") == rules.seed_hash("seed-1") != rules.seed_hash("seed-2")


def test_as05_fee_standard_and_settlement_on_days_served_with_waiver():
    assert rules.check_fee(20000, "month", 20000, "month") is None
    assert rules.check_fee(20000, "month", 20001, "month").rule == "AS-05"
    assert rules.check_fee(20000, "month", 100, "session").rule == "AS-05"
    # per month, pro rata on days served: 15000 * 17 / 20
    line = rules.settle_fee(15000, "month", 20, 17, 0)
    assert (line.gross_fen, line.waiver_fen, line.amount_fen) == (12750, 0, 12750)
    # floor to whole fen in the family's favour
    assert rules.settle_fee(10000, "month", 21, 20, 0).gross_fen == 9523
    # per session
    assert rules.settle_fee(800, "session", 20, 12, 0).amount_fen == 9600
    # waivers: 100 % and 50 % (ceil the waiver)
    assert rules.settle_fee(800, "session", 20, 12, 100).amount_fen == 0
    half = rules.settle_fee(333, "session", 1, 1, 50)
    assert (half.waiver_fen, half.amount_fen) == (167, 166)
    assert rules.settle_fee(15000, "month", 0, 0, 0).amount_fen == 0
    assert rules.refund_on_withdrawal(15000, 6000) == 9000
    assert rules.refund_on_withdrawal(5000, 6000) == 0


def test_as07_scores_one_to_five():
    assert rules.check_score(1) is None and rules.check_score(5) is None
    assert rules.check_score(0).rule == "AS-07" and rules.check_score(6).rule == "AS-07"


@pytest.mark.parametrize(
    ("served", "students", "meets"), [(90, 100, True), (89, 100, False), (9, 10, True)]
)
def test_as08_served_share_target_exact(served, students, meets):
    figures = rules.SchoolFigures("s", True, students, served, 4, 4, 1, 10, 9, 2)
    report = rules.school_report(NATIONAL, figures)
    assert report.meets_target is meets
    assert report.external_share == Decimal("0.1")
    assert report.satisfaction == Decimal("4.50")
    assert report.difficulty_served_share == Decimal(1)
    no_plan = rules.school_report(
        NATIONAL, rules.SchoolFigures("s", False, 10, 0, 0, 0, 0, 0, 0, 0)
    )
    assert not no_plan.meets_target and no_plan.satisfaction is None
