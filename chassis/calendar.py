"""School calendar: festivals, statutory holidays, day-off swaps, terms (X-05).

Pure: nothing here reads a file except the explicit loaders, and nothing keeps
state a rule could read. Three layers:

1. **Festivals, computed.** ``festivals(year)`` derives every traditional
   festival from the lunar calendar and the solar terms with ``lunar_python``
   (astronomical computation, no year table), so it answers for 2024, 2150 or
   2400 alike. 清明 is the day of the 清明 solar term; 端午 is lunar 5/5;
   中秋 lunar 8/15; 春节 lunar 1/1; 除夕 the day before 春节. HW-04's
   "no written homework" festivals (清明、端午、中秋) come from here.

2. **Statutory holidays and day-off swaps (调休), loaded.** The State Council
   publishes each year's arrangement (国务院办公厅关于 YYYY 年部分节假日安排的
   通知): which days are off and which weekend days become working days. That
   is data, not something to compute: ``HolidayArrangement`` holds one year of
   it, validates from JSON (operators upload it) and from the TOML files in
   ``policy/calendar/`` (``load_holiday_files``).

   **Fallback for a year without an arrangement:** the calendar then treats
   as statutory holidays exactly the days named by the 全国年节及纪念日放假办法
   for that year (computed: 元旦 1/1; 春节 除夕+初一至初三 from 2025, 初一至
   初三 2014-2024, 除夕至初二 before 2014; 清明; 劳动节 5/1 (+5/2 from 2025);
   端午; 中秋; 国庆 10/1-10/3), plus ordinary Saturdays and Sundays as rest
   days. No bridging days and no swapped working days are guessed: those only
   exist once an operator loads the year's notice. Years before 2008 are
   approximated with the 2008 rules. ``Calendar.has_holiday_data(year)`` tells
   a caller which mode applies.

3. **School terms and vacations per region**, loaded (``SchoolTerms``).

``Calendar`` combines them: working days for deadlines (complaints, refunds,
auto-confirmation), school days for homework and after-school service.
"""

from __future__ import annotations

import datetime as dt
import itertools
import tomllib
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal

from lunar_python import Lunar, Solar
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: Policy dates are China's local dates (UTC+8, no daylight saving).
CHINA_TZ: Final = dt.timezone(dt.timedelta(hours=8), "Asia/Shanghai")


def today_in_china() -> dt.date:
    """Today in China; a server's own clock may be a day behind (after 16:00 UTC)."""
    return dt.datetime.now(CHINA_TZ).date()


__all__ = [
    "DEFAULT_CALENDAR_DIR",
    "FESTIVAL_NAMES_ZH",
    "NO_WRITTEN_HOMEWORK_FESTIVALS",
    "Calendar",
    "CalendarDataError",
    "DayKind",
    "HolidayArrangement",
    "HolidayDay",
    "SchoolTerms",
    "Term",
    "Vacation",
    "VacationKind",
    "festival_date",
    "festival_occurrences",
    "festivals",
    "is_no_written_homework_festival",
    "load_holiday_files",
    "load_school_terms",
    "statutory_days",
    "today_in_china",
]

#: ``policy/calendar`` of this repository.
DEFAULT_CALENDAR_DIR: Final[Path] = Path(__file__).resolve().parent.parent / "policy" / "calendar"

VacationKind = Literal["winter", "summer"]

#: What a day is for homework caps (HW-04) and services, most specific first:
#: a statutory holiday beats a vacation, which beats an ordinary weekend.
#: ``"other"`` is a working day outside every term while terms are loaded.
DayKind = Literal["statutory_holiday", "vacation", "weekend", "school_day", "other"]

#: Festival keys (stable ASCII ids used by policy profiles) and their zh-CN
#: names. The order is also the priority when two fall on one date (e.g.
#: 中秋 = 国庆 on 2020-10-01): the no-written-homework festivals come first.
FESTIVAL_NAMES_ZH: Final[Mapping[str, str]] = MappingProxyType(
    {
        "qingming": "清明节",
        "duanwu": "端午节",
        "midautumn": "中秋节",
        "spring_festival": "春节",
        "spring_festival_eve": "除夕",
        "lantern": "元宵节",
        "double_ninth": "重阳节",
        "new_year": "元旦",
        "labour_day": "劳动节",
        "national_day": "国庆节",
    }
)

#: HW-04 default: traditional festivals without written homework
#: [000 §一.2 "清明、端午、中秋等传统节日不布置书面家庭作业"].
NO_WRITTEN_HOMEWORK_FESTIVALS: Final[tuple[str, ...]] = ("qingming", "duanwu", "midautumn")

_MIN_YEAR: Final = 1901
_MAX_YEAR: Final = 9998


class CalendarDataError(ValueError):
    """A holiday or term file (or upload) is malformed; the message names it."""


# ---------------------------------------------------------------------------
# Festivals (computed)
# ---------------------------------------------------------------------------


def _check_year(year: int) -> None:
    if not _MIN_YEAR <= year <= _MAX_YEAR:
        raise ValueError(f"year {year} outside supported range {_MIN_YEAR}..{_MAX_YEAR}")


def _solar_to_date(solar: Any) -> dt.date:
    return dt.date(int(solar.getYear()), int(solar.getMonth()), int(solar.getDay()))


def _lunar_date(year: int, month: int, day: int) -> dt.date:
    # A positive month is the ordinary (non-leap) month of that lunar year.
    return _solar_to_date(Lunar.fromYmd(year, month, day).getSolar())


def _qingming(year: int) -> dt.date:
    # Early April always lies in lunar year ``year``; its solar-term table
    # holds that year's 清明.
    table = Solar.fromYmd(year, 4, 1).getLunar().getJieQiTable()
    day = _solar_to_date(table["清明"])
    if day.year != year:  # pragma: no cover - astronomical invariant
        raise RuntimeError(f"清明 for {year} computed as {day}")
    return day


@lru_cache(maxsize=512)
def festival_occurrences(year: int) -> tuple[tuple[dt.date, str], ...]:
    """Every festival of a Gregorian year as ``(date, key)``, sorted by date.

    Computed for any year (lunar calendar and solar terms); unlike
    ``festivals`` it keeps two festivals that share a date.
    """
    _check_year(year)
    spring = _lunar_date(year, 1, 1)
    found = {
        "qingming": _qingming(year),
        "duanwu": _lunar_date(year, 5, 5),
        "midautumn": _lunar_date(year, 8, 15),
        "spring_festival": spring,
        "spring_festival_eve": spring - dt.timedelta(days=1),
        "lantern": _lunar_date(year, 1, 15),
        "double_ninth": _lunar_date(year, 9, 9),
        "new_year": dt.date(year, 1, 1),
        "labour_day": dt.date(year, 5, 1),
        "national_day": dt.date(year, 10, 1),
    }
    order = list(FESTIVAL_NAMES_ZH)
    return tuple(
        sorted(((d, k) for k, d in found.items()), key=lambda p: (p[0], order.index(p[1])))
    )


def festivals(year: int) -> dict[dt.date, str]:
    """Festival key by date for ``year`` (X-05), e.g. ``{date(2024, 4, 4): "qingming", ...}``.

    Keys are those of ``FESTIVAL_NAMES_ZH``. When two festivals share a date
    the one listed first in ``FESTIVAL_NAMES_ZH`` wins (no-homework festivals
    first); use ``festival_occurrences`` to see both.
    """
    result: dict[dt.date, str] = {}
    for day, key in festival_occurrences(year):
        result.setdefault(day, key)
    return result


def festival_date(year: int, key: str) -> dt.date:
    """The date of one festival (by key) in ``year``."""
    if key not in FESTIVAL_NAMES_ZH:
        raise KeyError(f"unknown festival {key!r}; known: {', '.join(FESTIVAL_NAMES_ZH)}")
    for day, k in festival_occurrences(year):
        if k == key:
            return day
    raise AssertionError(key)  # pragma: no cover


def is_no_written_homework_festival(
    d: dt.date, festival_keys: Iterable[str] = NO_WRITTEN_HOMEWORK_FESTIVALS
) -> str | None:
    """HW-04: the festival key if ``d`` is a festival without written homework.

    ``festival_keys`` comes from the region's policy profile
    (``homework.no_written_homework_festivals``); default 清明、端午、中秋.
    """
    wanted = set(festival_keys)
    unknown = wanted.difference(FESTIVAL_NAMES_ZH)
    if unknown:
        raise KeyError(f"unknown festival key(s): {', '.join(sorted(unknown))}")
    for day, key in festival_occurrences(d.year):
        if day == d and key in wanted:
            return key
    return None


@lru_cache(maxsize=512)
def _statutory_days_cached(year: int) -> tuple[tuple[dt.date, str], ...]:
    _check_year(year)
    spring = _lunar_date(year, 1, 1)
    days: list[tuple[dt.date, str]] = [(dt.date(year, 1, 1), "元旦")]
    if year >= 2025:  # 放假办法 as amended 2024-11, in force 2025-01-01
        spring_days = [spring + dt.timedelta(days=i) for i in range(-1, 3)]
        labour = [dt.date(year, 5, 1), dt.date(year, 5, 2)]
    elif year >= 2014:  # as amended 2013-12, in force 2014-01-01
        spring_days = [spring + dt.timedelta(days=i) for i in range(0, 3)]
        labour = [dt.date(year, 5, 1)]
    else:  # as amended 2007-12, in force 2008-01-01 (used for earlier years too)
        spring_days = [spring + dt.timedelta(days=i) for i in range(-1, 2)]
        labour = [dt.date(year, 5, 1)]
    days += [(d, "春节") for d in spring_days]
    days.append((_qingming(year), "清明节"))
    days += [(d, "劳动节") for d in labour]
    days.append((_lunar_date(year, 5, 5), "端午节"))
    days.append((_lunar_date(year, 8, 15), "中秋节"))
    days += [(dt.date(year, 10, i), "国庆节") for i in (1, 2, 3)]
    merged: dict[dt.date, str] = {}
    for d, name in days:
        merged[d] = f"{merged[d]}、{name}" if d in merged else name
    return tuple(sorted(merged.items()))


def statutory_days(year: int) -> dict[dt.date, str]:
    """The legal holidays of ``year`` under the 全国年节及纪念日放假办法, computed.

    Only the days the law names (13 from 2025 on), without the bridging days
    and swapped working days that each year's State Council notice adds. The
    calendar uses this as the fallback for years without a loaded arrangement.
    Dates of 春节 (除夕) may fall in late January, always inside ``year``.
    """
    return dict(_statutory_days_cached(year))


# ---------------------------------------------------------------------------
# Holiday arrangements (loaded)
# ---------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HolidayDay(_Frozen):
    """One day off in a published arrangement (a statutory or bridging day)."""

    date: dt.date
    name: Annotated[str, Field(min_length=1, max_length=40)]


class HolidayArrangement(_Frozen):
    """One year's 放假调休 arrangement as published by the State Council.

    ``holidays`` lists every day off of every holiday period (the whole span
    "X月X日至Y月Y日放假调休", weekends inside it included); ``workday_swaps``
    lists the Saturdays/Sundays that are working days ("X月X日（周日）上班").
    Dates may spill a few days into the neighbouring year (an 元旦 holiday can
    start on 31 December), but must lie within a month of ``year``.

    JSON shape (operator upload)::

        {"year": 2026, "source": "...",
         "holidays": [{"date": "2026-01-01", "name": "元旦"}, ...],
         "workday_swaps": ["2026-01-04", ...]}
    """

    year: Annotated[int, Field(ge=_MIN_YEAR, le=_MAX_YEAR)]
    source: str = ""
    holidays: tuple[HolidayDay, ...]
    workday_swaps: tuple[dt.date, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> HolidayArrangement:
        lo = dt.date(self.year - 1, 12, 1)
        hi = dt.date(self.year + 1, 1, 31)
        seen: set[dt.date] = set()
        for h in self.holidays:
            if not lo <= h.date <= hi:
                raise ValueError(f"holiday {h.date} ({h.name}) is not near year {self.year}")
            if h.date in seen:
                raise ValueError(f"holiday {h.date} listed twice")
            seen.add(h.date)
        swaps: set[dt.date] = set()
        for s in self.workday_swaps:
            if not lo <= s <= hi:
                raise ValueError(f"workday swap {s} is not near year {self.year}")
            if s.isoweekday() < 6:
                raise ValueError(f"workday swap {s} is a weekday; only Saturdays/Sundays swap")
            if s in seen:
                raise ValueError(f"{s} is both a holiday and a workday swap")
            if s in swaps:
                raise ValueError(f"workday swap {s} listed twice")
            swaps.add(s)
        return self


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CalendarDataError(f"{path}: cannot read TOML: {exc}") from exc


def _validation_message(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid calendar data:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def load_holiday_files(directory: Path | None = None) -> tuple[HolidayArrangement, ...]:
    """Load every ``holidays-*.toml`` in ``directory`` (default ``policy/calendar``).

    Each file is one ``HolidayArrangement``; two files for one year are an error.
    A missing directory yields no arrangements (the computed fallback applies).
    """
    directory = DEFAULT_CALENDAR_DIR if directory is None else directory
    if not directory.is_dir():
        return ()
    result: list[HolidayArrangement] = []
    years: dict[int, Path] = {}
    for path in sorted(directory.glob("holidays-*.toml")):
        try:
            arrangement = HolidayArrangement.model_validate(_read_toml(path))
        except ValidationError as exc:
            raise CalendarDataError(_validation_message(path, exc)) from exc
        if arrangement.year in years:
            raise CalendarDataError(
                f"{path}: year {arrangement.year} already loaded from {years[arrangement.year]}"
            )
        years[arrangement.year] = path
        result.append(arrangement)
    return tuple(result)


# ---------------------------------------------------------------------------
# School terms (loaded)
# ---------------------------------------------------------------------------

_SCHOOL_YEAR = r"^\d{4}-\d{4}$"


def _check_school_year(value: str) -> None:
    first, second = (int(p) for p in value.split("-"))
    if second != first + 1:
        raise ValueError(f"school year {value!r} must span two consecutive years")


class Term(_Frozen):
    """A teaching term (学期), both ends inclusive."""

    name: Annotated[str, Field(min_length=1)]
    school_year: Annotated[str, Field(pattern=_SCHOOL_YEAR)]
    start: dt.date
    end: dt.date

    @model_validator(mode="after")
    def _check(self) -> Term:
        _check_school_year(self.school_year)
        if self.end < self.start:
            raise ValueError(
                f"term {self.name!r} ends ({self.end}) before it starts ({self.start})"
            )
        return self


class Vacation(_Frozen):
    """A winter (寒假) or summer (暑假) vacation, both ends inclusive."""

    kind: VacationKind
    school_year: Annotated[str, Field(pattern=_SCHOOL_YEAR)]
    start: dt.date
    end: dt.date

    @model_validator(mode="after")
    def _check(self) -> Vacation:
        _check_school_year(self.school_year)
        if self.end < self.start:
            raise ValueError(f"{self.kind} vacation ends ({self.end}) before it starts")
        return self


class SchoolTerms(_Frozen):
    """Terms and vacations of one region. Validates from JSON and TOML alike.

    Terms must not overlap each other, vacations must not overlap each other
    or any term. ``demo`` marks placeholder data an operator must replace.
    """

    region_id: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")]
    demo: bool = False
    source: str = ""
    terms: tuple[Term, ...]
    vacations: tuple[Vacation, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> SchoolTerms:
        spans: list[tuple[dt.date, dt.date, str]] = [
            (t.start, t.end, f"term {t.name!r} ({t.school_year})") for t in self.terms
        ] + [(v.start, v.end, f"{v.kind} vacation ({v.school_year})") for v in self.vacations]
        spans.sort()
        for (_, a_end, a_label), (b_start, _, b_label) in itertools.pairwise(spans):
            if b_start <= a_end:
                raise ValueError(f"{a_label} overlaps {b_label}")
        return self

    def term_on(self, d: dt.date) -> Term | None:
        """The term containing ``d``, if any."""
        for t in self.terms:
            if t.start <= d <= t.end:
                return t
        return None

    def vacation_on(self, d: dt.date) -> Vacation | None:
        """The vacation containing ``d``, if any."""
        for v in self.vacations:
            if v.start <= d <= v.end:
                return v
        return None


def load_school_terms(directory: Path | None = None) -> dict[str, SchoolTerms]:
    """Load ``<region-id>.toml`` files from ``directory`` (default ``policy/calendar/terms``).

    The file name must equal the ``region_id`` inside it.
    """
    directory = DEFAULT_CALENDAR_DIR / "terms" if directory is None else directory
    result: dict[str, SchoolTerms] = {}
    if not directory.is_dir():
        return result
    for path in sorted(directory.glob("*.toml")):
        try:
            terms = SchoolTerms.model_validate(_read_toml(path))
        except ValidationError as exc:
            raise CalendarDataError(_validation_message(path, exc)) from exc
        if terms.region_id != path.stem:
            raise CalendarDataError(
                f"{path}: region_id {terms.region_id!r} does not match the file name"
            )
        result[terms.region_id] = terms
    return result


# ---------------------------------------------------------------------------
# Calendar
# ---------------------------------------------------------------------------


class Calendar:
    """Working days and school days from loaded arrangements (+ optional terms).

    Immutable once built. For a year with a loaded ``HolidayArrangement`` the
    published data is authoritative; for any other year the computed fallback
    described in the module docstring applies (``statutory_days`` + weekends).
    """

    __slots__ = ("_covered", "_holidays", "_swaps", "_terms")

    def __init__(
        self,
        arrangements: Iterable[HolidayArrangement] = (),
        terms: SchoolTerms | None = None,
    ) -> None:
        holidays: dict[dt.date, str] = {}
        swaps: set[dt.date] = set()
        covered: set[int] = set()
        for arr in arrangements:
            if arr.year in covered:
                raise CalendarDataError(f"two holiday arrangements for year {arr.year}")
            covered.add(arr.year)
            for h in arr.holidays:
                holidays[h.date] = h.name
            swaps.update(arr.workday_swaps)
        clash = swaps.intersection(holidays)
        if clash:
            raise CalendarDataError(
                "dates both holiday and workday swap: " + ", ".join(str(d) for d in sorted(clash))
            )
        self._holidays: Mapping[dt.date, str] = MappingProxyType(holidays)
        self._swaps: frozenset[dt.date] = frozenset(swaps)
        self._covered: frozenset[int] = frozenset(covered)
        self._terms = terms

    @classmethod
    def load(cls, region_id: str | None = None, directory: Path | None = None) -> Calendar:
        """Build from ``holidays-*.toml`` in ``directory`` (default ``policy/calendar``)
        and, when ``region_id`` is given, ``terms/<region_id>.toml`` (must exist)."""
        base = DEFAULT_CALENDAR_DIR if directory is None else directory
        arrangements = load_holiday_files(base)
        terms: SchoolTerms | None = None
        if region_id is not None:
            all_terms = load_school_terms(base / "terms")
            if region_id not in all_terms:
                raise CalendarDataError(f"no school terms for region {region_id!r} in {base}")
            terms = all_terms[region_id]
        return cls(arrangements, terms)

    # -- introspection -----------------------------------------------------

    @property
    def covered_years(self) -> frozenset[int]:
        """Years with a loaded State Council arrangement."""
        return self._covered

    @property
    def terms(self) -> SchoolTerms | None:
        return self._terms

    def has_holiday_data(self, year: int) -> bool:
        """True if ``year`` uses loaded data, False if it uses the computed fallback."""
        return year in self._covered

    # -- holidays and working days ----------------------------------------

    def holiday_name(self, d: dt.date) -> str | None:
        """Name of the statutory holiday period ``d`` belongs to, else None."""
        name = self._holidays.get(d)
        if name is not None or d.year in self._covered:
            return name
        return statutory_days(d.year).get(d)

    def is_statutory_holiday(self, d: dt.date) -> bool:
        """A day off of a statutory holiday period (published span incl. bridging
        days for loaded years; the legal days themselves for fallback years)."""
        return self.holiday_name(d) is not None

    def is_workday_swap(self, d: dt.date) -> bool:
        """A Saturday/Sunday that the year's arrangement makes a working day (调休上班)."""
        return d in self._swaps

    def is_weekend_rest(self, d: dt.date) -> bool:
        """Saturday or Sunday not swapped to a working day (holiday or not)."""
        return d.isoweekday() >= 6 and d not in self._swaps

    def is_working_day(self, d: dt.date) -> bool:
        """Neither a statutory holiday nor a weekend rest day."""
        return not self.is_statutory_holiday(d) and not self.is_weekend_rest(d)

    def add_working_days(self, d: dt.date, n: int) -> dt.date:
        """The ``n``-th working day after ``d`` (``d`` itself not counted).

        ``n == 0`` returns ``d``; a negative ``n`` counts backwards. Deadline
        arithmetic: a complaint received on ``d`` with a 15-working-day limit
        is due by ``add_working_days(d, 15)``.
        """
        step = dt.timedelta(days=1 if n >= 0 else -1)
        remaining = abs(n)
        current = d
        while remaining:
            current += step
            if self.is_working_day(current):
                remaining -= 1
        return current

    def working_days_between(self, a: dt.date, b: dt.date) -> int:
        """Working days in ``(a, b]`` (negative if ``b < a``).

        Consistent with ``add_working_days``:
        ``working_days_between(d, add_working_days(d, n)) == n`` for ``n >= 0``.
        """
        if b < a:
            return -self.working_days_between(b, a)
        count = 0
        current = a
        while current < b:
            current += dt.timedelta(days=1)
            if self.is_working_day(current):
                count += 1
        return count

    # -- terms and school days --------------------------------------------

    def in_vacation(self, d: dt.date) -> VacationKind | None:
        """``"winter"`` / ``"summer"`` inside a loaded vacation, else None
        (always None without terms)."""
        if self._terms is None:
            return None
        v = self._terms.vacation_on(d)
        return None if v is None else v.kind

    def term_on(self, d: dt.date) -> Term | None:
        return None if self._terms is None else self._terms.term_on(d)

    def is_school_day(self, d: dt.date) -> bool:
        """A working day inside a term and not in a vacation.

        Working Saturdays/Sundays of a 调休 are school days (schools follow the
        national arrangement). Without terms loaded, no day is a school day.
        """
        if self._terms is None or not self.is_working_day(d):
            return False
        return self._terms.term_on(d) is not None and self._terms.vacation_on(d) is None

    def day_kind(self, d: dt.date) -> DayKind:
        """Classify ``d`` for homework caps (HW-04).

        Precedence: statutory holiday > vacation > weekend rest > school day.
        Without terms every working day is ``"school_day"``; with terms a
        working day outside every term and vacation is ``"other"``.
        """
        if self.is_statutory_holiday(d):
            return "statutory_holiday"
        if self.in_vacation(d) is not None:
            return "vacation"
        if self.is_weekend_rest(d):
            return "weekend"
        if self._terms is None or self.is_school_day(d):
            return "school_day"
        return "other"

    def no_written_homework_festival(
        self, d: dt.date, festival_keys: Iterable[str] = NO_WRITTEN_HOMEWORK_FESTIVALS
    ) -> str | None:
        """Same as the module-level ``is_no_written_homework_festival`` (HW-04)."""
        return is_no_written_homework_festival(d, festival_keys)
