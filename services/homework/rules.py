"""Homework policy checks (HW-02..HW-06): pure functions, no I/O.

Every check takes the facts and the region's ``PolicyProfile`` (and a
``Calendar`` where the kind of day matters) and returns a ``Verdict``: allowed,
or refused with the rule id, the limit and what is already used. The service
turns a refusal into a problem+json answer and records it (HW-08); the atomic
counters in the database enforce the same limits under concurrency.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final, Literal

from chassis.calendar import FESTIVAL_NAMES_ZH, Calendar, DayKind
from chassis.policy import GradeBand, PolicyProfile, SchoolSystem, grade_band

__all__ = [
    "ALLOWED",
    "EVENING_STUDY",
    "FORBIDDEN_FLAGS",
    "BurdenAssessment",
    "DayRule",
    "Verdict",
    "assess_burden",
    "burden_transition",
    "check_daily_limit",
    "check_forbidden_flags",
    "check_quota_plan",
    "check_subject_quota",
    "check_warnings_acknowledged",
    "check_written_homework_day",
    "counts_toward_daily_limit",
    "daily_loads",
    "day_rule",
    "estimate_gap",
    "evening_study_keeps_written_at_school",
    "histogram_stats",
    "is_homework_school_day",
    "limit_exceeded",
    "local_date",
    "median",
    "nearest_rank",
    "report_editable",
    "school_days_window",
    "screen_content",
    "subject_quota_exceeded",
    "trend",
    "week_bounds",
]

HW02: Final = "HW-02"
HW03: Final = "HW-03"
HW04: Final = "HW-04"
HW05: Final = "HW-05"
HW06: Final = "HW-06"

Kind = Literal["written", "reading", "oral", "practice", "sport", "project"]
Layer = Literal["basic", "extended", "personalized"]
Location = Literal["in_school", "at_home"]

#: Asia/Shanghai has no daylight saving time: local time is UTC+8 all year.
SHANGHAI_OFFSET: Final = dt.timedelta(hours=8)

DAY_KIND_ZH: Final[Mapping[str, str]] = {
    "school_day": "上学日",
    "weekend": "周末",
    "statutory_holiday": "法定节假日",
    "vacation": "寒暑假",
    "other": "上学日",
}
BAND_ZH: Final[Mapping[str, str]] = {
    "lower_primary": "小学一、二年级",
    "upper_primary": "小学三年级及以上",
    "junior": "初中",
}


@dataclass(frozen=True)
class Verdict:
    """Allowed (``rule is None``) or refused by ``rule`` with the numbers behind it."""

    rule: str | None = None
    detail: str = ""
    limit: int | None = None
    used: int | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rule is None


ALLOWED: Final = Verdict()


def local_date(instant: dt.datetime) -> dt.date:
    """The Asia/Shanghai calendar date of an aware instant (policy dates are local)."""
    if instant.tzinfo is None:
        raise ValueError("naive datetime: give an aware instant")
    return (instant.astimezone(dt.UTC) + SHANGHAI_OFFSET).date()


# ---------------------------------------------------------------------------
# HW-02 / HW-04: what may be given for one class on one day
# ---------------------------------------------------------------------------


def counts_toward_daily_limit(kind: str, layer: str, location: str) -> bool:
    """HW-02 counts required (basic) written homework done at home, nothing else.

    In-school consolidation exercises, reading, oral, practice, sport and
    project work, and optional (extended) or personalized homework are not
    part of the class's daily written total.
    """
    return kind == "written" and layer == "basic" and location == "at_home"


def is_home_written(kind: str, location: str) -> bool:
    """HW-04 bans written homework at home (any layer) on some days."""
    return kind == "written" and location == "at_home"


@dataclass(frozen=True)
class DayRule:
    """What governs required written homework at home for one class on one day."""

    day: dt.date
    #: ``Calendar.day_kind``; a working day outside the loaded terms counts as a school day.
    day_kind: DayKind
    band: GradeBand
    #: Daily total allowed (0 on a day without written homework).
    limit: int
    #: The rule that sets ``limit``: HW-02 on school days, HW-04 otherwise.
    rule: str
    #: Why no written homework at home is allowed: a festival key,
    #: "school_declared" (HW-04) or "evening_study" (HW-02, 004 §二.2).
    ban: str | None = None
    #: zh-CN description of the ban (festival name or the school's reason).
    ban_label: str | None = None

    @property
    def day_label(self) -> str:
        return DAY_KIND_ZH.get(self.day_kind, self.day_kind)

    @property
    def band_zh(self) -> str:
        return BAND_ZH[self.band]


def is_homework_school_day(calendar: Calendar, day: dt.date) -> bool:
    """A school day for homework: a working day outside every vacation.

    With terms loaded, working days outside the terms (``"other"``, e.g. a year
    the terms do not cover) count as school days too, so the school-day limit
    and the HW-06 window still apply to dates beyond the loaded school years.
    """
    return calendar.day_kind(day) in ("school_day", "other")


def day_rule(
    *,
    day: dt.date,
    grade: int,
    school_system: SchoolSystem,
    profile: PolicyProfile,
    calendar: Calendar,
    declared_no_written: str | None = None,
    evening_study: bool = False,
) -> DayRule:
    """The limit and the rule for ``day`` (HW-02, HW-04).

    The grade band comes from the *school's* system (6-3 or 5-4): grade 6 is
    upper primary in a 6-3 school and junior high in a 5-4 school. Weekends,
    statutory holidays and vacations take the profile's own caps
    (``Calendar.day_kind``). The profile's festivals (清明、端午、中秋 by
    default, computed for any year) and a day the school declared without
    written homework allow no written homework at home at all.
    ``declared_no_written`` is the school's reason, when it declared one and
    the profile lets schools declare such days. ``evening_study``: the class
    attends evening self-study (晚自习) that day; where the profile says so
    (环翠, 004 §二.2 "参加晚自习服务的初中学生书面作业不带回家"), a junior
    class then takes no written homework home on a school day (HW-02, limit 0:
    it is done in the self-study, ``in_school``).
    """
    band = grade_band(grade, school_system)
    kind = calendar.day_kind(day)
    effective: DayKind = "school_day" if kind == "other" else kind
    limit = profile.homework.limit_minutes(band, effective)
    rule = HW02 if effective == "school_day" else HW04
    festival = calendar.no_written_homework_festival(
        day, profile.homework.no_written_homework_festivals
    )
    if festival is not None:
        return DayRule(day, effective, band, 0, HW04, festival, FESTIVAL_NAMES_ZH[festival])
    if (
        declared_no_written is not None
        and profile.homework.schools_may_declare_no_written_homework_days
    ):
        label = declared_no_written or "学校无书面作业日"
        return DayRule(day, effective, band, 0, HW04, "school_declared", label)
    if evening_study_keeps_written_at_school(band, effective, evening_study, profile):
        return DayRule(day, effective, band, 0, HW02, EVENING_STUDY, EVENING_STUDY_ZH)
    return DayRule(day, effective, band, limit, rule)


#: ``DayRule.ban`` of a junior class's evening self-study day (HW-02, 004 §二.2).
EVENING_STUDY: Final = "evening_study"
EVENING_STUDY_ZH: Final = "晚自习日（书面作业在校完成，不带回家）"


def evening_study_keeps_written_at_school(
    band: GradeBand, day_kind: DayKind, evening_study: bool, profile: PolicyProfile
) -> bool:
    """HW-02 (004 §二.2): juniors attending evening self-study on a school day
    take no written homework home, where the region's profile says so."""
    return (
        evening_study
        and band == "junior"
        and day_kind in ("school_day", "other")
        and profile.homework.evening_study_juniors_no_home_written_homework
    )


def check_written_homework_day(kind: str, location: str, rule: DayRule, used: int = 0) -> Verdict:
    """HW-04: no written homework at home on a festival or a declared day;
    HW-02: none either on a junior class's evening self-study day (环翠)."""
    if rule.ban is None or not is_home_written(kind, location):
        return ALLOWED
    if rule.ban == EVENING_STUDY:
        return Verdict(
            HW02,
            f"{rule.day} 本班参加晚自习：参加晚自习服务的初中学生书面作业不带回家，"
            "请在晚自习中完成（地点选择 in_school）。",
            limit=0,
            used=used,
            extras={"date": rule.day.isoformat(), "no_written_homework": rule.ban},
        )
    if rule.ban == "school_declared":
        why = f"学校已将 {rule.day} 设为无书面作业日（{rule.ban_label}）"
    else:
        why = f"{rule.day} 是{rule.ban_label}，传统节日不布置书面家庭作业"
    return Verdict(
        HW04,
        f"{why}，不能发布书面家庭作业。",
        limit=0,
        used=used,
        extras={"date": rule.day.isoformat(), "no_written_homework": rule.ban},
    )


def limit_exceeded(rule: DayRule, minutes: int, used: int) -> Verdict:
    """The refusal for ``minutes`` more on a day where ``used`` are taken (HW-02/HW-04)."""
    remaining = max(rule.limit - used, 0)
    if rule.rule == HW02:
        what = f"{rule.band_zh}每日书面作业总量不超过 {rule.limit} 分钟"
    else:
        what = f"{rule.day_label}每日书面作业不超过 {rule.limit} 分钟"
    return Verdict(
        rule.rule,
        f"超出班级当日书面作业时长上限：{what}，当日已用 {used} 分钟，"
        f"剩余 {remaining} 分钟，本次 {minutes} 分钟。",
        limit=rule.limit,
        used=used,
        extras={
            "remaining": remaining,
            "requested_minutes": minutes,
            "date": rule.day.isoformat(),
            "day_kind": rule.day_kind,
        },
    )


def check_daily_limit(minutes: int, used: int, rule: DayRule) -> Verdict:
    """HW-02 (school days) / HW-04 (weekends, holidays, vacations): the class total."""
    if minutes <= 0 or used + minutes <= rule.limit:
        return ALLOWED
    return limit_exceeded(rule, minutes, used)


# ---------------------------------------------------------------------------
# HW-03: the head teacher's per-subject quotas
# ---------------------------------------------------------------------------


def subject_quota_exceeded(
    subject: str, minutes: int, subject_used: int, quota: int, day: dt.date | None = None
) -> Verdict:
    remaining = max(quota - subject_used, 0)
    if quota == 0:
        detail = f"班主任未给「{subject}」分配每日书面作业时间（配额 0 分钟）。"
    else:
        detail = (
            f"超出班主任给「{subject}」分配的每日书面作业配额 {quota} 分钟：当日已用 "
            f"{subject_used} 分钟，剩余 {remaining} 分钟，本次 {minutes} 分钟。"
        )
    extras: dict[str, Any] = {
        "subject": subject,
        "remaining": remaining,
        "requested_minutes": minutes,
    }
    if day is not None:
        extras["date"] = day.isoformat()
    return Verdict(HW03, detail, limit=quota, used=subject_used, extras=extras)


def check_subject_quota(
    subject: str,
    minutes: int,
    subject_used: int,
    quotas: Mapping[str, int],
    day: dt.date | None = None,
) -> Verdict:
    """HW-03: a subject cannot go past the head teacher's quota.

    Without quotas the class is first come, first served within its limit.
    Once the head teacher has set quotas, they are the whole allocation: a
    subject without a quota has none (0 minutes).
    """
    if not quotas or minutes <= 0:
        return ALLOWED
    quota = quotas.get(subject, 0)
    if subject_used + minutes <= quota:
        return ALLOWED
    return subject_quota_exceeded(subject, minutes, subject_used, quota, day)


def check_quota_plan(
    quotas: Mapping[str, int], grade: int, school_system: SchoolSystem, profile: PolicyProfile
) -> Verdict:
    """HW-03: the head teacher's quotas add up to at most the grade's school-day limit."""
    limit = profile.homework.daily_limit_minutes.for_band(grade_band(grade, school_system))
    negative = sorted(s for s, m in quotas.items() if m < 0)
    if negative:
        return Verdict(HW03, "配额不能为负数。", limit=limit, used=0, extras={"subjects": negative})
    total = sum(quotas.values())
    if total <= limit:
        return ALLOWED
    return Verdict(
        HW03,
        f"各学科配额合计 {total} 分钟，超过该年级每日书面作业上限 {limit} 分钟。",
        limit=limit,
        used=total,
    )


# ---------------------------------------------------------------------------
# HW-05: forbidden homework
# ---------------------------------------------------------------------------

#: Flags on an assignment that make it forbidden outright, with zh-CN reasons.
FORBIDDEN_FLAGS: Final[Mapping[str, str]] = {
    "assigned_to_parents": "布置给家长或变相布置给家长的作业",
    "parents_must_check": "要求家长检查、批改的作业",
    "students_self_grade": "要求学生自批自改的作业",
    "requires_phone": "要求使用手机完成或打卡的作业",
    "punitive": "惩罚性作业",
    "repetitive": "重复性、机械性作业",
}


def check_forbidden_flags(flags: Mapping[str, bool]) -> Verdict:
    """HW-05: any forbidden flag refuses the assignment."""
    unknown = set(flags) - set(FORBIDDEN_FLAGS)
    if unknown:
        raise ValueError(f"unknown homework flag(s): {sorted(unknown)}")
    raised = [name for name in FORBIDDEN_FLAGS if flags.get(name)]
    if not raised:
        return ALLOWED
    reasons = "、".join(FORBIDDEN_FLAGS[name] for name in raised)
    return Verdict(HW05, f"禁止布置：{reasons}。", extras={"flags": raised})


_SPACES = re.compile(r"\s+")


def screen_content(text: str, profile: PolicyProfile) -> tuple[str, ...]:
    """HW-05 screening: the profile's tell-tale phrases found in ``text``
    (whitespace ignored), in the profile's order."""
    squeezed = _SPACES.sub("", text)
    return tuple(p for p in profile.homework.forbidden_phrases if _SPACES.sub("", p) in squeezed)


def check_warnings_acknowledged(warnings: Sequence[str], acknowledged: Iterable[str]) -> Verdict:
    """HW-05: every screening warning must be acknowledged by the teacher."""
    seen = set(acknowledged)
    open_warnings = [w for w in warnings if w not in seen]
    if not open_warnings:
        return ALLOWED
    return Verdict(
        HW05,
        "作业内容含有可能违反规定的表述："
        + "、".join(f"「{w}」" for w in open_warnings)
        + "。请修改，或确认不违反规定后在 acknowledged_warnings 中逐条确认再发布。",
        extras={"warnings": list(warnings), "unacknowledged": open_warnings},
    )


# ---------------------------------------------------------------------------
# HW-06: actual time and the burden alert
# ---------------------------------------------------------------------------


def report_editable(first_reported_on: dt.date, today: dt.date) -> bool:
    """A student's report may be changed only on the (local) day it was made."""
    return first_reported_on == today


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of nothing")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return (ordered[mid - 1] + ordered[mid]) / 2


def nearest_rank(values: Sequence[float], percentile: int) -> float:
    """The nearest-rank percentile (e.g. 90): the smallest value with at least
    ``percentile``% of the values at or below it."""
    if not values:
        raise ValueError("percentile of nothing")
    if not 0 < percentile <= 100:
        raise ValueError("percentile must be in (0, 100]")
    ordered = sorted(values)
    rank = -(-percentile * len(ordered) // 100)  # ceil
    return float(ordered[rank - 1])


@dataclass(frozen=True)
class HistogramStats:
    """Count, mean and nearest-rank percentile of values given as a histogram."""

    count: int
    mean: float | None
    percentile: float | None


def histogram_stats(
    buckets: Iterable[tuple[float, int, float]], percentile: int = 90
) -> HistogramStats:
    """HW-08 statistics from ``(value, count, sum)`` buckets (SQL ``GROUP BY value``).

    The mean is exact (``sum`` of the original values over their count); the
    percentile is the nearest-rank one (as ``nearest_rank``) over the bucket
    values, so the database ships one row per distinct value, not one per
    class-day.
    """
    if not 0 < percentile <= 100:
        raise ValueError("percentile must be in (0, 100]")
    ordered = sorted((float(v), int(n), float(s)) for v, n, s in buckets if n > 0)
    total = sum(n for _, n, _ in ordered)
    if total == 0:
        return HistogramStats(0, None, None)
    rank = -(-percentile * total // 100)  # ceil
    seen, value_at_rank = 0, ordered[-1][0]
    for value, n, _ in ordered:
        seen += n
        if seen >= rank:
            value_at_rank = value
            break
    return HistogramStats(total, sum(s for _, _, s in ordered) / total, value_at_rank)


def school_days_window(
    calendar: Calendar, end: dt.date, days: int, *, max_lookback: int = 400
) -> tuple[dt.date, ...]:
    """The ``days`` homework school days ending at ``end`` (inclusive), oldest first.

    Fewer when ``max_lookback`` calendar days hold fewer school days.
    """
    if days < 1:
        raise ValueError("window must hold at least one day")
    found: list[dt.date] = []
    current = end
    for _ in range(max_lookback):
        if is_homework_school_day(calendar, current):
            found.append(current)
            if len(found) == days:
                break
        current -= dt.timedelta(days=1)
    return tuple(reversed(found))


def daily_loads(
    assignments: Iterable[tuple[dt.date, int, Sequence[int]]],
) -> dict[dt.date, float]:
    """A class's actual daily load: per day, the sum over its counted
    assignments of the median reported minutes (the estimate where nobody
    reported). Input rows: ``(date, estimated_minutes, reported_minutes)``."""
    loads: dict[dt.date, float] = {}
    for day, estimated, reported in assignments:
        actual = median(reported) if reported else float(estimated)
        loads[day] = loads.get(day, 0.0) + actual
    return loads


@dataclass(frozen=True)
class BurdenAssessment:
    median_minutes: float
    limit: int
    window: tuple[dt.date, ...]

    @property
    def over(self) -> bool:
        return self.median_minutes > self.limit


def assess_burden(
    loads: Mapping[dt.date, float], window: Sequence[dt.date], limit: int
) -> BurdenAssessment:
    """HW-06: the median of the class's daily loads over the window's school
    days (a day without homework counts 0) against the grade's daily limit."""
    if not window:
        return BurdenAssessment(0.0, limit, ())
    values = [loads.get(d, 0.0) for d in window]
    return BurdenAssessment(median(values), limit, tuple(window))


def burden_transition(
    is_open: bool, assessment: BurdenAssessment
) -> Literal["open", "close"] | None:
    """HW-06: open an alert once when the median goes over; close it when it falls back."""
    if assessment.over and not is_open:
        return "open"
    if is_open and not assessment.over:
        return "close"
    return None


def estimate_gap(
    actual_total: int | float, estimated_total: int, reports: int, profile: PolicyProfile
) -> bool:
    """HW-06/HW-08: does a teacher's reported time run far above the estimates?

    True when at least ``estimate_gap_min_reports`` reports exist and the sum
    of reported minutes exceeds ``estimate_gap_ratio`` times the sum of the
    corresponding estimates (exact arithmetic).
    """
    if reports < profile.homework.estimate_gap_min_reports:
        return False
    if estimated_total <= 0:
        return actual_total > 0
    actual = Fraction(actual_total).limit_denominator(1000)
    return actual > Fraction(estimated_total) * Fraction(profile.homework.estimate_gap_ratio)


# ---------------------------------------------------------------------------
# HW-07: weekly publicity
# ---------------------------------------------------------------------------


def week_bounds(day: dt.date) -> tuple[dt.date, dt.date]:
    """Monday and Sunday of the ISO week holding ``day``."""
    monday = day - dt.timedelta(days=day.isoweekday() - 1)
    return monday, monday + dt.timedelta(days=6)


def trend(this_week: int, last_week: int) -> dict[str, Any]:
    """Change against last week: direction and percentage (None when last week was 0)."""
    if this_week == last_week:
        direction = "flat"
    elif last_week == 0:
        direction = "new"
    elif this_week > last_week:
        direction = "up"
    else:
        direction = "down"
    percent = None if last_week == 0 else round((this_week - last_week) * 100 / last_week, 1)
    return {
        "last_week_total_minutes": last_week,
        "change_minutes": this_week - last_week,
        "change_percent": percent,
        "direction": direction,
    }
