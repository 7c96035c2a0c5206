"""Calendar (X-05): computed festivals (HW-04), loaded holidays, swaps, terms."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from lunar_python import Solar
from pydantic import ValidationError

from chassis.calendar import (
    DEFAULT_CALENDAR_DIR,
    FESTIVAL_NAMES_ZH,
    Calendar,
    CalendarDataError,
    HolidayArrangement,
    SchoolTerms,
    festival_date,
    festival_occurrences,
    festivals,
    is_no_written_homework_festival,
    load_holiday_files,
    load_school_terms,
    statutory_days,
)

D = dt.date
REGIONS = ("national", "changsha-wangcheng", "jinhua", "chongqing-rongchang", "weihai-huancui")


@pytest.fixture(scope="module")
def cal() -> Calendar:
    return Calendar.load()


@pytest.fixture(scope="module")
def jinhua() -> Calendar:
    return Calendar.load("jinhua")


# -- festivals, computed --------------------------------------------------------


def test_x05_hw04_festivals_2024_known_dates() -> None:
    f = festivals(2024)
    assert f[D(2024, 4, 4)] == "qingming"
    assert f[D(2024, 6, 10)] == "duanwu"
    assert f[D(2024, 9, 17)] == "midautumn"
    assert f[D(2024, 2, 10)] == "spring_festival"
    assert f[D(2024, 2, 9)] == "spring_festival_eve"
    assert set(f.values()) == set(FESTIVAL_NAMES_ZH)


def test_x05_hw04_festivals_2026_match_state_council_notice() -> None:
    """The computed 2026 dates fall inside the periods the 2026 notice publishes."""
    assert festival_date(2026, "qingming") == D(2026, 4, 5)
    assert festival_date(2026, "duanwu") == D(2026, 6, 19)
    assert festival_date(2026, "midautumn") == D(2026, 9, 25)
    assert festival_date(2026, "spring_festival") == D(2026, 2, 17)
    loaded = {a.year: a for a in load_holiday_files()}[2026]
    names = {h.date: h.name for h in loaded.holidays}
    assert names[D(2026, 4, 5)] == "清明节"
    assert names[D(2026, 6, 19)] == "端午节"
    assert names[D(2026, 9, 25)] == "中秋节"
    assert names[D(2026, 2, 17)] == "春节"


@pytest.mark.parametrize("year", [2150, 2400])
def test_x05_hw04_festivals_far_years_are_computed(year: int, cal: Calendar) -> None:
    """No holiday package covers these years; the lunar calendar still answers."""
    assert not cal.has_holiday_data(year)
    qingming = festival_date(year, "qingming")
    duanwu = festival_date(year, "duanwu")
    midautumn = festival_date(year, "midautumn")
    assert qingming.year == duanwu.year == midautumn.year == year
    assert D(year, 4, 3) <= qingming <= D(year, 4, 6)
    # independent round trip through the solar -> lunar conversion
    assert Solar.fromYmd(year, qingming.month, qingming.day).getLunar().getJieQi() == "清明"
    lunar = Solar.fromYmd(year, duanwu.month, duanwu.day).getLunar()
    assert (lunar.getMonth(), lunar.getDay()) == (5, 5)
    lunar = Solar.fromYmd(year, midautumn.month, midautumn.day).getLunar()
    assert (lunar.getMonth(), lunar.getDay()) == (8, 15)
    assert is_no_written_homework_festival(duanwu) == "duanwu"
    assert cal.no_written_homework_festival(midautumn) == "midautumn"


def test_x05_known_far_dates() -> None:
    assert festival_date(2150, "qingming") == D(2150, 4, 5)
    assert festival_date(2400, "duanwu") == D(2400, 5, 28)
    assert festival_date(2400, "midautumn") == D(2400, 10, 3)


def test_hw04_no_written_homework_festival() -> None:
    assert is_no_written_homework_festival(D(2024, 4, 4)) == "qingming"
    assert is_no_written_homework_festival(D(2024, 4, 5)) is None
    assert is_no_written_homework_festival(D(2024, 2, 10)) is None  # 春节: not in the list
    assert is_no_written_homework_festival(D(2024, 2, 10), ["spring_festival"]) == "spring_festival"
    with pytest.raises(KeyError):
        is_no_written_homework_festival(D(2024, 2, 10), ["christmas"])


def test_hw04_festival_sharing_a_date_still_counts() -> None:
    """2020-10-01 is both 国庆 and 中秋: the festival without homework wins."""
    assert festivals(2020)[D(2020, 10, 1)] == "midautumn"
    assert (D(2020, 10, 1), "national_day") in festival_occurrences(2020)
    assert is_no_written_homework_festival(D(2020, 10, 1)) == "midautumn"


def test_x05_statutory_days_fallback_by_law_version() -> None:
    days_2150 = statutory_days(2150)
    assert len(days_2150) == 13  # 2025 rules: 除夕 and 5/2 added
    assert days_2150[D(2150, 5, 2)] == "劳动节"
    eve = festival_date(2150, "spring_festival_eve")
    assert days_2150[eve] == "春节"
    days_2024 = statutory_days(2024)
    assert len(days_2024) == 11
    assert D(2024, 2, 9) not in days_2024  # 除夕 was not a legal holiday in 2024
    assert D(2024, 5, 2) not in days_2024


# -- holiday arrangements ----------------------------------------------------------


def test_x05_holiday_files_load() -> None:
    arrangements = {a.year: a for a in load_holiday_files()}
    assert set(arrangements) == {2025, 2026}
    a25, a26 = arrangements[2025], arrangements[2026]
    assert len(a25.holidays) == 1 + 8 + 3 + 5 + 3 + 8
    assert len(a25.workday_swaps) == 5
    assert len(a26.holidays) == 3 + 9 + 3 + 5 + 3 + 3 + 7
    assert len(a26.workday_swaps) == 6
    assert "国务院办公厅" in a25.source and "国务院办公厅" in a26.source


def test_x05_holiday_arrangement_from_json() -> None:
    payload = {
        "year": 2027,
        "source": "test",
        "holidays": [{"date": "2027-01-01", "name": "元旦"}],
        "workday_swaps": ["2027-01-02"],
    }
    arr = HolidayArrangement.model_validate_json(json.dumps(payload))
    assert arr.holidays[0].date == D(2027, 1, 1)
    cal = Calendar([arr])
    assert cal.has_holiday_data(2027)
    assert cal.is_working_day(D(2027, 1, 2))  # Saturday swapped
    assert not cal.is_working_day(D(2027, 1, 1))
    # a loaded year uses only its data: 5/1 is not a holiday unless listed
    assert cal.is_working_day(D(2027, 5, 3))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"workday_swaps": ["2027-01-04"]}, "weekday"),  # a Monday
        ({"holidays": [{"date": "2027-01-01", "name": "元旦"}] * 2}, "twice"),
        ({"holidays": [{"date": "2027-06-01", "name": "x"}], "year": 2029}, "not near"),
        ({"workday_swaps": ["2027-01-02", "2027-01-02"]}, "twice"),
        (
            {"holidays": [{"date": "2027-01-02", "name": "元旦"}], "workday_swaps": ["2027-01-02"]},
            "both",
        ),
        ({"extra": 1}, "Extra inputs"),
        ({"holidays": [{"date": "2027-01-01", "name": ""}]}, "at least 1"),
    ],
)
def test_x05_holiday_arrangement_rejects_bad_input(change: dict[str, object], message: str) -> None:
    payload: dict[str, object] = {
        "year": 2027,
        "holidays": [{"date": "2027-01-01", "name": "元旦"}],
        "workday_swaps": [],
    }
    payload.update(change)
    with pytest.raises(ValidationError, match=message):
        HolidayArrangement.model_validate_json(json.dumps(payload))


def test_x05_duplicate_year_files_rejected(tmp_path: Path) -> None:
    text = 'year = 2030\nholidays = [{ date = 2030-01-01, name = "元旦" }]\n'
    (tmp_path / "holidays-2030.toml").write_text(text, encoding="utf-8")
    (tmp_path / "holidays-2030-bis.toml").write_text(text, encoding="utf-8")
    with pytest.raises(CalendarDataError, match="already loaded"):
        load_holiday_files(tmp_path)
    (tmp_path / "holidays-2030-bis.toml").write_text("year = 2031\nholidays = 3\n")
    with pytest.raises(CalendarDataError, match=r"holidays-2030-bis\.toml"):
        load_holiday_files(tmp_path)


def test_x05_day_off_swap_makes_sunday_a_working_day(cal: Calendar) -> None:
    sunday = D(2025, 9, 28)
    assert sunday.isoweekday() == 7
    assert cal.is_workday_swap(sunday)
    assert not cal.is_weekend_rest(sunday)
    assert cal.is_working_day(sunday)
    assert cal.is_working_day(D(2026, 1, 4))  # 元旦 2026: 1月4日（周日）上班
    ordinary_sunday = D(2025, 9, 21)
    assert cal.is_weekend_rest(ordinary_sunday) and not cal.is_working_day(ordinary_sunday)


def test_x05_statutory_holidays_loaded(cal: Calendar) -> None:
    assert cal.is_statutory_holiday(D(2025, 10, 8))  # 8-day 国庆+中秋 2025
    assert cal.holiday_name(D(2025, 10, 6)) == "国庆节、中秋节"
    assert not cal.is_working_day(D(2025, 1, 28))  # 除夕 2025
    assert not cal.is_statutory_holiday(D(2026, 10, 8))  # 2026: only 10/1-10/7
    assert cal.is_working_day(D(2026, 10, 8))
    assert cal.is_weekend_rest(D(2026, 10, 3))  # a Saturday inside the holiday


def test_x05_add_working_days_across_national_day(cal: Calendar) -> None:
    assert cal.add_working_days(D(2025, 9, 30), 1) == D(2025, 10, 9)
    assert cal.add_working_days(D(2025, 9, 26), 1) == D(2025, 9, 28)  # Sunday swap
    # 10/9, 10/10, 10/11 (Saturday swap), 10/13, 10/14
    assert cal.add_working_days(D(2025, 9, 30), 5) == D(2025, 10, 14)
    assert cal.add_working_days(D(2026, 9, 30), 1) == D(2026, 10, 8)
    assert cal.add_working_days(D(2025, 10, 9), -1) == D(2025, 9, 30)
    assert cal.add_working_days(D(2025, 10, 3), 0) == D(2025, 10, 3)
    # a 15-working-day complaint deadline from the eve of National Day 2025
    due = cal.add_working_days(D(2025, 9, 30), 15)
    assert due == D(2025, 10, 28)
    assert cal.working_days_between(D(2025, 9, 30), due) == 15
    assert cal.working_days_between(due, D(2025, 9, 30)) == -15
    assert cal.working_days_between(D(2025, 10, 1), D(2025, 10, 8)) == 0


def test_x05_working_days_round_trip(cal: Calendar) -> None:
    start = D(2025, 1, 20)
    for n in range(0, 60, 7):
        assert cal.working_days_between(start, cal.add_working_days(start, n)) == n


def test_x05_fallback_year_without_data(cal: Calendar) -> None:
    """2150: weekends + the legal holiday days computed from the lunar calendar."""
    assert not cal.has_holiday_data(2150)
    assert cal.is_statutory_holiday(D(2150, 10, 2))
    assert not cal.is_statutory_holiday(D(2150, 10, 4))  # no bridging days guessed
    midautumn = festival_date(2150, "midautumn")
    assert cal.is_statutory_holiday(midautumn)
    # 2150-09-30 is a Wednesday; 10/1-10/3 (Thu-Sat) 国庆, 10/4 Sunday, 10/5 (Mon) 中秋
    assert cal.add_working_days(D(2150, 9, 30), 1) == D(2150, 10, 6)


# -- school terms ---------------------------------------------------------------


def test_x05_terms_load_for_every_region() -> None:
    terms = load_school_terms()
    assert set(terms) == set(REGIONS)
    for rid, t in terms.items():
        assert t.region_id == rid
        assert t.demo is True
        assert {v.kind for v in t.vacations} == {"winter", "summer"}
        assert {x.school_year for x in t.terms} == {"2025-2026", "2026-2027"}
        # winter vacations contain 春节
        for v in t.vacations:
            if v.kind == "winter":
                year = v.end.year
                assert v.start <= festival_date(year, "spring_festival") <= v.end


def test_x05_vacations_and_school_days(jinhua: Calendar) -> None:
    assert jinhua.in_vacation(D(2026, 2, 17)) == "winter"
    assert jinhua.in_vacation(D(2026, 7, 15)) == "summer"
    assert jinhua.in_vacation(D(2025, 10, 15)) is None
    assert jinhua.is_school_day(D(2025, 10, 15))  # ordinary Wednesday in term
    assert not jinhua.is_school_day(D(2025, 10, 3))  # National Day
    assert not jinhua.is_school_day(D(2025, 10, 18))  # Saturday
    assert jinhua.is_school_day(D(2025, 9, 28))  # Sunday made a working day
    assert not jinhua.is_school_day(D(2026, 2, 14))  # swap Saturday, but winter vacation
    assert jinhua.is_working_day(D(2026, 2, 14))
    assert not jinhua.is_school_day(D(2026, 7, 15))
    assert jinhua.term_on(D(2026, 3, 2)) is not None


def test_x05_regions_differ_in_terms() -> None:
    weihai = Calendar.load("weihai-huancui")
    jinhua = Calendar.load("jinhua")
    day = D(2026, 1, 20)
    assert weihai.in_vacation(day) == "winter"
    assert jinhua.in_vacation(day) is None and jinhua.is_school_day(day)


def test_hw04_day_kind(jinhua: Calendar, cal: Calendar) -> None:
    assert jinhua.day_kind(D(2026, 2, 17)) == "statutory_holiday"  # beats vacation
    assert jinhua.day_kind(D(2026, 2, 7)) == "vacation"  # a Saturday in vacation
    assert jinhua.day_kind(D(2025, 10, 18)) == "weekend"
    assert jinhua.day_kind(D(2025, 10, 15)) == "school_day"
    assert cal.day_kind(D(2025, 10, 15)) == "school_day"  # no terms loaded
    assert cal.in_vacation(D(2026, 2, 7)) is None
    assert not cal.is_school_day(D(2025, 10, 15))


def test_x05_school_terms_from_json_and_validation() -> None:
    good = {
        "region_id": "demo-city",
        "terms": [
            {"name": "秋季", "school_year": "2030-2031", "start": "2030-09-01", "end": "2031-01-17"}
        ],
        "vacations": [
            {
                "kind": "winter",
                "school_year": "2030-2031",
                "start": "2031-01-18",
                "end": "2031-02-16",
            }
        ],
    }
    terms = SchoolTerms.model_validate_json(json.dumps(good))
    cal = Calendar([], terms)
    assert cal.in_vacation(D(2031, 1, 20)) == "winter"
    assert cal.is_school_day(D(2030, 9, 2))
    overlapping = json.loads(json.dumps(good))
    overlapping["vacations"][0]["start"] = "2031-01-17"
    with pytest.raises(ValidationError, match="overlaps"):
        SchoolTerms.model_validate(overlapping)
    reversed_term = json.loads(json.dumps(good))
    reversed_term["terms"][0]["end"] = "2030-08-01"
    with pytest.raises(ValidationError, match="before it starts"):
        SchoolTerms.model_validate(reversed_term)
    bad_year = json.loads(json.dumps(good))
    bad_year["terms"][0]["school_year"] = "2030-2032"
    with pytest.raises(ValidationError, match="consecutive"):
        SchoolTerms.model_validate(bad_year)
    bad_kind = json.loads(json.dumps(good))
    bad_kind["vacations"][0]["kind"] = "spring"
    with pytest.raises(ValidationError):
        SchoolTerms.model_validate(bad_kind)


def test_x05_terms_file_name_must_match(tmp_path: Path) -> None:
    src = (DEFAULT_CALENDAR_DIR / "terms" / "jinhua.toml").read_text(encoding="utf-8")
    (tmp_path / "hangzhou.toml").write_text(src, encoding="utf-8")
    with pytest.raises(CalendarDataError, match="does not match"):
        load_school_terms(tmp_path)


def test_x05_calendar_load_unknown_region() -> None:
    with pytest.raises(CalendarDataError, match="beijing"):
        Calendar.load("beijing")
