"""The pure homework rules (services/homework/rules.py), each by its rule id."""

from __future__ import annotations

import datetime as D
from decimal import Decimal

import pytest

from chassis.calendar import Calendar, HolidayArrangement, SchoolTerms, festival_date
from chassis.policy import BandMinutes, PolicyProfile, PolicyRegistry
from services.homework import rules

REGISTRY = PolicyRegistry.load()
NATIONAL = REGISTRY.profile("national")
HUANCUI = REGISTRY.profile("weihai-huancui")
CAL = Calendar()  # no arrangements: computed statutory days for every year
TUESDAY = D.date(2150, 3, 10)
SATURDAY = D.date(2150, 3, 14)


def with_homework(profile: PolicyProfile, **changes: object) -> PolicyProfile:
    return profile.model_copy(update={"homework": profile.homework.model_copy(update=changes)})


def rule_for(day: D.date, grade: int, system: str = "6-3", **kw: object) -> rules.DayRule:
    profile = kw.pop("profile", NATIONAL)
    calendar = kw.pop("calendar", CAL)
    return rules.day_rule(
        day=day,
        grade=grade,
        school_system=system,  # type: ignore[arg-type]
        profile=profile,  # type: ignore[arg-type]
        calendar=calendar,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------- HW-02


@pytest.mark.parametrize(
    ("grade", "system", "limit"),
    [
        (1, "6-3", 0),
        (2, "5-4", 0),
        (3, "6-3", 60),
        (5, "5-4", 60),
        (6, "6-3", 60),  # 6-3: grade 6 is primary
        (6, "5-4", 90),  # 5-4 (环翠): grade 6 is junior high
        (7, "6-3", 90),
        (9, "5-4", 90),
    ],
)
def test_hw02_limit_by_grade_band_and_school_system(grade: int, system: str, limit: int) -> None:
    rule = rule_for(TUESDAY, grade, system)
    assert (rule.limit, rule.rule, rule.day_kind) == (limit, "HW-02", "school_day")


def test_hw02_huancui_profile_grade6_junior_in_5_4_school() -> None:
    assert HUANCUI.school_system == "5-4"
    assert rule_for(TUESDAY, 6, "5-4", profile=HUANCUI).limit == 90
    # The school's own system decides, even inside the 5-4 region.
    assert rule_for(TUESDAY, 6, "6-3", profile=HUANCUI).limit == 60


def test_hw02_huancui_juniors_in_evening_study_take_no_written_homework_home() -> None:
    """004 §二.2 "参加晚自习服务的初中学生书面作业不带回家": in 环翠 a junior class
    on an evening self-study school day has 0 minutes of written homework at
    home (HW-02); it is done in the self-study (in school)."""
    rule = rule_for(TUESDAY, 6, "5-4", profile=HUANCUI, evening_study=True)
    assert (rule.rule, rule.limit, rule.ban) == ("HW-02", 0, rules.EVENING_STUDY)
    refused = rules.check_written_homework_day("written", "at_home", rule)
    assert (refused.rule, refused.limit) == ("HW-02", 0)
    assert "晚自习" in refused.detail
    assert rules.check_written_homework_day("written", "in_school", rule).ok
    assert rules.check_written_homework_day("reading", "at_home", rule).ok
    # Without evening study that day, the junior limit.
    assert rule_for(TUESDAY, 6, "5-4", profile=HUANCUI).limit == 90
    # Not on a weekend (no self-study; the weekend cap applies), not for primary
    # grades, and not where the profile does not say so (national).
    weekend = rule_for(SATURDAY, 7, "5-4", profile=HUANCUI, evening_study=True)
    assert weekend.ban is None and weekend.rule == "HW-04"
    assert rule_for(TUESDAY, 5, "5-4", profile=HUANCUI, evening_study=True).ban is None
    national = rule_for(TUESDAY, 8, "6-3", profile=NATIONAL, evening_study=True)
    assert (national.ban, national.limit) == (None, 90)
    assert HUANCUI.homework.evening_study_juniors_no_home_written_homework
    assert not NATIONAL.homework.evening_study_juniors_no_home_written_homework


def test_hw02_only_basic_written_at_home_counts() -> None:
    assert rules.counts_toward_daily_limit("written", "basic", "at_home")
    assert not rules.counts_toward_daily_limit("written", "basic", "in_school")
    assert not rules.counts_toward_daily_limit("written", "extended", "at_home")
    assert not rules.counts_toward_daily_limit("written", "personalized", "at_home")
    assert not rules.counts_toward_daily_limit("reading", "basic", "at_home")


def test_hw02_daily_limit_verdict_names_rule_limit_and_used() -> None:
    rule = rule_for(TUESDAY, 4)
    assert rules.check_daily_limit(15, 45, rule).ok
    refused = rules.check_daily_limit(16, 45, rule)
    assert (refused.rule, refused.limit, refused.used) == ("HW-02", 60, 45)
    assert refused.extras["remaining"] == 15 and refused.extras["requested_minutes"] == 16
    assert "60" in refused.detail and "45" in refused.detail


def test_hw02_lower_primary_takes_no_written_homework_home() -> None:
    refused = rules.check_daily_limit(5, 0, rule_for(TUESDAY, 2))
    assert (refused.rule, refused.limit, refused.used) == ("HW-02", 0, 0)


# ---------------------------------------------------------------- HW-03


def test_hw03_subject_quota() -> None:
    quotas = {"math": 20, "chinese": 30}
    assert rules.check_subject_quota("math", 20, 0, quotas).ok
    refused = rules.check_subject_quota("math", 5, 20, quotas)
    assert (refused.rule, refused.limit, refused.used) == ("HW-03", 20, 20)
    unallocated = rules.check_subject_quota("english", 5, 0, quotas)
    assert (unallocated.rule, unallocated.limit) == ("HW-03", 0)


def test_hw03_without_quotas_first_come_first_served() -> None:
    assert rules.check_subject_quota("math", 60, 0, {}).ok


def test_hw03_quota_plan_within_grade_limit() -> None:
    assert rules.check_quota_plan({"math": 30, "chinese": 30}, 4, "6-3", NATIONAL).ok
    refused = rules.check_quota_plan({"math": 40, "chinese": 30}, 4, "6-3", NATIONAL)
    assert (refused.rule, refused.limit, refused.used) == ("HW-03", 60, 70)
    # 5-4 grade 6 is junior: 90 minutes to share.
    assert rules.check_quota_plan({"math": 45, "chinese": 45}, 6, "5-4", HUANCUI).ok


# ---------------------------------------------------------------- HW-04


@pytest.mark.parametrize("festival", ["qingming", "duanwu", "midautumn"])
@pytest.mark.parametrize("year", [2150, 2400])
def test_hw04_festivals_computed_for_years_no_holiday_package_covers(
    festival: str, year: int
) -> None:
    day = festival_date(year, festival)
    assert not CAL.has_holiday_data(year)
    rule = rule_for(day, 5)
    assert (rule.limit, rule.rule, rule.ban) == (0, "HW-04", festival)
    refused = rules.check_written_homework_day("written", "at_home", rule, used=0)
    assert (refused.rule, refused.limit) == ("HW-04", 0)
    assert refused.extras["no_written_homework"] == festival
    # Reading and in-school work are not written homework at home.
    assert rules.check_written_homework_day("reading", "at_home", rule).ok
    assert rules.check_written_homework_day("written", "in_school", rule).ok


def test_hw04_duanwu_2150() -> None:
    assert festival_date(2150, "duanwu") == D.date(2150, 5, 31)
    refused = rules.check_written_homework_day(
        "written", "at_home", rule_for(D.date(2150, 5, 31), 8)
    )
    assert refused.rule == "HW-04" and "端午" in refused.detail
    assert rule_for(D.date(2150, 6, 1), 8).ban is None


def test_hw04_school_declared_day_only_where_the_profile_allows() -> None:
    rule = rule_for(TUESDAY, 4, declared_no_written="读书节")
    assert (rule.ban, rule.limit, rule.rule) == ("school_declared", 0, "HW-04")
    assert "读书节" in rules.check_written_homework_day("written", "at_home", rule).detail
    closed = with_homework(NATIONAL, schools_may_declare_no_written_homework_days=False)
    assert rule_for(TUESDAY, 4, declared_no_written="读书节", profile=closed).ban is None


def test_hw04_weekend_holiday_and_vacation_caps_come_from_the_profile() -> None:
    profile = with_homework(
        NATIONAL,
        weekend_daily_limit_minutes=BandMinutes(lower_primary=0, upper_primary=30, junior=45),
        statutory_holiday_daily_limit_minutes=BandMinutes(
            lower_primary=0, upper_primary=20, junior=40
        ),
        vacation_daily_limit_minutes=BandMinutes(lower_primary=0, upper_primary=10, junior=35),
    )
    weekend = rule_for(SATURDAY, 4, profile=profile)
    assert (weekend.day_kind, weekend.limit, weekend.rule) == ("weekend", 30, "HW-04")
    national_day = rule_for(D.date(2150, 10, 2), 8, profile=profile)
    assert (national_day.day_kind, national_day.limit) == ("statutory_holiday", 40)
    terms = SchoolTerms.model_validate(
        {
            "region_id": "testland",
            "terms": [
                {
                    "name": "秋季",
                    "school_year": "2150-2151",
                    "start": "2150-09-01",
                    "end": "2151-01-20",
                },
            ],
            "vacations": [
                {
                    "kind": "summer",
                    "school_year": "2149-2150",
                    "start": "2150-07-05",
                    "end": "2150-08-31",
                },
            ],
        }
    )
    vacation = rule_for(D.date(2150, 7, 15), 4, profile=profile, calendar=Calendar((), terms))
    assert (vacation.day_kind, vacation.limit, vacation.rule) == ("vacation", 10, "HW-04")
    refused = rules.check_daily_limit(11, 0, vacation)
    assert (refused.rule, refused.limit) == ("HW-04", 10)


def test_hw04_loaded_day_off_swap_is_a_school_day() -> None:
    cal = Calendar(
        [
            HolidayArrangement.model_validate(
                {
                    "year": 2150,
                    "holidays": [{"date": "2150-10-01", "name": "国庆节"}],
                    "workday_swaps": ["2150-03-14"],
                }
            )
        ]
    )
    assert rule_for(SATURDAY, 4, calendar=cal).day_kind == "school_day"
    assert rule_for(SATURDAY, 4, calendar=cal).rule == "HW-02"


# ---------------------------------------------------------------- HW-05


def test_hw05_forbidden_flags_refuse() -> None:
    assert rules.check_forbidden_flags({name: False for name in rules.FORBIDDEN_FLAGS}).ok
    for name in rules.FORBIDDEN_FLAGS:
        refused = rules.check_forbidden_flags({name: True})
        assert refused.rule == "HW-05" and refused.extras["flags"] == [name]
    with pytest.raises(ValueError):
        rules.check_forbidden_flags({"unknown": True})


def test_hw05_content_screening_and_acknowledgement() -> None:
    text = "抄写课文三遍，请家长 签字检查，并手机打卡"
    warnings = rules.screen_content(text, NATIONAL)
    assert "家长签字检查" in warnings and "手机打卡" in warnings and "家长签字" in warnings
    refused = rules.check_warnings_acknowledged(warnings, ["手机打卡"])
    assert refused.rule == "HW-05"
    assert "手机打卡" not in refused.extras["unacknowledged"]
    assert rules.check_warnings_acknowledged(warnings, warnings).ok
    assert rules.screen_content("阅读课外书二十分钟", NATIONAL) == ()
    custom = with_homework(NATIONAL, forbidden_phrases=("打卡",))
    assert rules.screen_content(text, custom) == ("打卡",)


# ---------------------------------------------------------------- HW-06


def test_hw06_median_and_window_of_school_days() -> None:
    assert rules.median([3, 1, 2]) == 2
    assert rules.median([1, 2, 3, 10]) == 2.5
    window = rules.school_days_window(CAL, D.date(2150, 3, 17), 7)  # a Tuesday
    assert len(window) == 7 and window[-1] == D.date(2150, 3, 17)
    assert all(d.isoweekday() <= 5 for d in window)
    assert window[0] == D.date(2150, 3, 9)


def test_hw06_daily_loads_use_median_reports_or_the_estimate() -> None:
    day1, day2 = D.date(2150, 3, 9), D.date(2150, 3, 10)
    loads = rules.daily_loads([(day1, 30, [40, 50, 90]), (day1, 20, []), (day2, 25, [10])])
    assert loads == {day1: 70.0, day2: 10.0}


def test_hw06_burden_opens_once_and_closes_when_it_falls_back() -> None:
    window = rules.school_days_window(CAL, D.date(2150, 3, 17), 7)
    high = {d: 90.0 for d in window[:4]}
    over = rules.assess_burden(high, window, 60)
    assert over.median_minutes == 90 and over.over
    assert rules.burden_transition(False, over) == "open"
    assert rules.burden_transition(True, over) is None
    fell = rules.assess_burden({d: 90.0 for d in window[:3]}, window, 60)
    assert fell.median_minutes == 0 and not fell.over
    assert rules.burden_transition(True, fell) == "close"
    assert rules.burden_transition(False, fell) is None
    at_limit = rules.assess_burden({d: 60.0 for d in window}, window, 60)
    assert not at_limit.over


def test_hw06_estimate_gap_uses_profile_ratio_and_minimum_reports() -> None:
    ratio = NATIONAL.homework.estimate_gap_ratio
    n = NATIONAL.homework.estimate_gap_min_reports
    assert ratio == Decimal("1.5")
    assert rules.estimate_gap(151, 100, n, NATIONAL)
    assert not rules.estimate_gap(150, 100, n, NATIONAL)  # exactly 1.5 is not "far below"
    assert not rules.estimate_gap(300, 100, n - 1, NATIONAL)


def test_hw06_reports_editable_only_the_same_local_day() -> None:
    day = D.date(2150, 3, 10)
    assert rules.report_editable(day, day)
    assert not rules.report_editable(day, day + D.timedelta(days=1))
    late_evening_utc = D.datetime(2150, 3, 10, 16, 30, tzinfo=D.UTC)  # 00:30 in Shanghai
    assert rules.local_date(late_evening_utc) == D.date(2150, 3, 11)


# ---------------------------------------------------------------- HW-07 / HW-08


def test_hw07_week_bounds_and_trend() -> None:
    assert rules.week_bounds(D.date(2150, 3, 12)) == (D.date(2150, 3, 9), D.date(2150, 3, 15))
    assert rules.trend(120, 100)["direction"] == "up"
    assert rules.trend(120, 100)["change_percent"] == 20.0
    assert rules.trend(80, 100)["direction"] == "down"
    assert rules.trend(50, 0)["direction"] == "new"
    assert rules.trend(0, 0)["direction"] == "flat"


def test_hw08_nearest_rank_percentile() -> None:
    assert rules.nearest_rank(list(range(1, 11)), 90) == 9
    assert rules.nearest_rank([5], 90) == 5
    assert rules.nearest_rank([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110], 90) == 100


def test_hw08_histogram_stats_match_the_plain_statistics() -> None:
    values = [10, 20, 20, 30, 45, 45, 45, 50, 55, 60, 60, 90]
    buckets: dict[float, tuple[int, float]] = {}
    for v in values:
        n, total = buckets.get(v, (0, 0.0))
        buckets[v] = (n + 1, total + v)
    stats = rules.histogram_stats([(v, n, s) for v, (n, s) in buckets.items()], 90)
    assert stats.count == len(values)
    assert stats.mean == sum(values) / len(values)
    assert stats.percentile == rules.nearest_rank(values, 90) == 60
    # Buckets of rounded values keep the exact mean (sums of the originals).
    assert rules.histogram_stats([(32.5, 2, 65.1)], 90).mean == 32.55
    assert rules.histogram_stats([], 90) == rules.HistogramStats(0, None, None)
