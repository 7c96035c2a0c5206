"""Pure after-school rules (AS-01..AS-08): facts + policy profile -> verdict.

Nothing here reads files, clocks or databases; every figure comes from the
``PolicyProfile`` (or ``AfterschoolPolicy``) passed in. A check returns a
``Violation`` (rule id, zh-CN detail, the numbers behind it) or ``None``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

from chassis.calendar import Calendar
from chassis.policy import AfterschoolPolicy, share_at_least, share_at_most

HOMEWORK_KIND = "homework_guidance"
#: AS-02 the "X": personal-interest kinds (sport, arts, science, reading, labour, clubs).
INTEREST_KINDS = ("sport", "arts", "science", "reading", "labour", "club")
COURSE_KINDS = (HOMEWORK_KIND, *INTEREST_KINDS)
PROVIDER_TYPES = ("own_teacher", "retired_teacher", "professional", "volunteer", "institution")
SESSION_KINDS = ("regular", "evening_study", "delayed_care")
FEE_UNITS = ("month", "session")
Stage = Literal["primary", "junior"]


@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Session:
    kind: str
    start: dt.time
    end: dt.time

    @property
    def minutes(self) -> int:
        return _minutes(self.end) - _minutes(self.start)


def _minutes(t: dt.time) -> int:
    return t.hour * 60 + t.minute


def _hm(t: dt.time) -> str:
    return t.strftime("%H:%M")


# ----------------------------------------------------------------- AS-01 plan


def make_up_weekday(calendar: Calendar, day: dt.date, chosen: int | None = None) -> int:
    """AS-01: the weekday timetable a weekend make-up working day (调休上班日) runs.

    The school's choice when it named one; otherwise the weekday of the nearest
    weekday holiday (the day the swap pays for), earlier first on a tie; Monday
    when no such holiday lies within three weeks.
    """
    if chosen is not None:
        return chosen
    for distance in range(1, 22):
        for d in (day - dt.timedelta(days=distance), day + dt.timedelta(days=distance)):
            if d.isoweekday() <= 5 and calendar.holiday_name(d) is not None:
                return d.isoweekday()
    return 1


def timetable_weekday(day: dt.date, make_up_weekdays: dict[str, int]) -> int:
    """AS-01/AS-05/AS-06: the weekday whose courses run on ``day`` — its own,
    or for a make-up working day the weekday the plan assigned it."""
    return make_up_weekdays.get(day.isoformat(), day.isoweekday())


def service_days(
    calendar: Calendar, start: dt.date, end: dt.date, policy: AfterschoolPolicy
) -> list[dt.date]:
    """AS-01: the plan's service days between ``start`` and ``end`` (inclusive).

    A day serves when it is a school day (working day inside the term, not in a
    vacation, not a statutory holiday) and either one of the profile's service
    weekdays (Monday-Friday) or a weekend day that a 调休 makes a working day.
    """
    days: list[dt.date] = []
    d = start
    while d <= end:
        if calendar.is_school_day(d) and (
            d.isoweekday() in policy.service_weekdays or calendar.is_workday_swap(d)
        ):
            days.append(d)
        d += dt.timedelta(days=1)
    return days


def check_sessions(
    policy: AfterschoolPolicy, stage: Stage, sessions: Sequence[Session]
) -> Violation | None:
    """AS-01: daily sessions of a plan.

    Regular sessions add up to at least ``min_daily_minutes`` ("5+2": 2 hours),
    the last ends no earlier than the stage's minimum end time; evening
    self-study is for juniors only and ends by ``evening_study_latest_end_junior``;
    delayed care (for named students) is offered where the profile requires it
    and starts after the regular service ends.
    """
    for s in sessions:
        if s.kind not in SESSION_KINDS:
            return Violation("AS-01", f"未知的服务时段类型“{s.kind}”。", {"kind": s.kind})
        if s.end <= s.start:
            return Violation(
                "AS-01", f"时段 {_hm(s.start)}–{_hm(s.end)} 的结束时间须晚于开始时间。"
            )
    regular = sorted((s for s in sessions if s.kind == "regular"), key=lambda s: s.start)
    if not regular:
        return Violation("AS-01", "方案须至少包含一个常规课后服务时段。")
    for a, b in itertools.pairwise(regular):
        if b.start < a.end:
            return Violation("AS-01", "常规课后服务时段不得重叠。")
    total = sum(s.minutes for s in regular)
    if total < policy.min_daily_minutes:
        return Violation(
            "AS-01",
            f"每天课后服务不少于 {policy.min_daily_minutes} 分钟（“5+2”），方案仅 {total} 分钟。",
            {"min_minutes": policy.min_daily_minutes, "minutes": total},
        )
    end = regular[-1].end
    minimum = policy.min_end_time_junior if stage == "junior" else policy.min_end_time_primary
    if end < minimum:
        label = "初中" if stage == "junior" else "小学"
        return Violation(
            "AS-01",
            f"{label}课后服务结束时间不得早于 {_hm(minimum)}（方案为 {_hm(end)}）。",
            {"min_end_time": _hm(minimum), "end_time": _hm(end)},
        )
    for s in sessions:
        if s.kind != "evening_study":
            continue
        if stage != "junior":
            return Violation("AS-01", "晚自习仅面向初中学生。")
        if s.end > policy.evening_study_latest_end_junior:
            latest = policy.evening_study_latest_end_junior
            return Violation(
                "AS-01",
                f"初中晚自习结束时间不得晚于 {_hm(latest)}（方案为 {_hm(s.end)}）。",
                {"latest_end": _hm(latest), "end_time": _hm(s.end)},
            )
    delayed = [s for s in sessions if s.kind == "delayed_care"]
    if policy.delayed_care_required and not delayed:
        return Violation("AS-01", "须为有特殊需要的学生提供延时托管服务时段。")
    for s in delayed:
        if s.start < end:
            return Violation("AS-01", "延时托管须在常规课后服务结束后开始。")
    return None


def daily_minutes(sessions: Sequence[Session]) -> int:
    return sum(s.minutes for s in sessions if s.kind == "regular")


def end_time(sessions: Sequence[Session]) -> dt.time:
    return max(s.end for s in sessions if s.kind == "regular")


# ----------------------------------------------------------- AS-02/03 menu


def check_course_kind(kind: str) -> Violation | None:
    """AS-02: homework guidance or a personal-interest kind; never new lessons."""
    if kind in COURSE_KINDS:
        return None
    return Violation(
        "AS-02",
        f"课程类型“{kind}”不允许：课后服务只可开设作业辅导或个性化兴趣课程，严禁讲新课。",
        {"allowed": list(COURSE_KINDS)},
    )


def slot_within_plan(
    sessions: Sequence[Session],
    weekdays: Iterable[int],
    policy: AfterschoolPolicy,
    start: dt.time,
    end: dt.time,
) -> Violation | None:
    """AS-02: a course runs on service weekdays inside one of the plan's sessions."""
    if end <= start:
        return Violation("AS-02", "课程结束时间须晚于开始时间。")
    bad = sorted(set(weekdays) - set(policy.service_weekdays))
    if bad:
        return Violation("AS-02", "课程只能安排在课后服务日（周一至周五）。", {"weekdays": bad})
    if not any(s.start <= start and end <= s.end for s in sessions):
        return Violation("AS-02", "课程时间须在方案的课后服务时段之内。")
    return None


def check_interest_daily(
    policy: AfterschoolPolicy, courses: Iterable[tuple[str, Iterable[int]]]
) -> Violation | None:
    """AS-02 "1+1": where the profile asks, every service weekday offers at
    least one personal-interest course. ``courses`` are (kind, weekdays)."""
    if not policy.require_interest_period_daily:
        return None
    covered: set[int] = set()
    for kind, weekdays in courses:
        if kind in INTEREST_KINDS:
            covered.update(weekdays)
    missing = sorted(set(policy.service_weekdays) - covered)
    if missing:
        names = "、".join("周" + "一二三四五六日"[d - 1] for d in missing)
        return Violation(
            "AS-02",
            f"本地区要求“1+1”：每天至少安排一节个性化兴趣课程，{names}没有。",
            {"weekdays_without_interest": missing},
        )
    return None


def check_institution_provider(entry: dict[str, Any] | None, today: dt.date) -> Violation | None:
    """AS-03: an institution provider must be in the bureau's catalog: licensed
    (and the licence not past its validity), non-subject, not blacklisted,
    may enroll."""
    if entry is None:
        return Violation("AS-03", "该机构不在教育局校外机构目录库中。")
    if entry["category"] == "subject":
        return Violation("AS-03", "学科类培训机构不得进入课后服务。")
    if not entry["can_enroll"] or entry["blacklisted"] or entry["status"] != "licensed":
        return Violation(
            "AS-03",
            "该机构已暂停、吊销或列入黑名单，已移出校外机构目录库。",
            {"licence_status": entry["status"], "blacklisted": entry["blacklisted"]},
        )
    if licence_lapsed(entry.get("licence_valid_until"), today):
        return Violation(
            "AS-03",
            "该机构的办学许可证已过有效期，已移出校外机构目录库。",
            {"licence_valid_until": entry["licence_valid_until"].isoformat()},
        )
    return None


def licence_lapsed(valid_until: dt.date | None, today: dt.date) -> bool:
    """A licence is valid through its last day; unknown validity is not lapsed."""
    return valid_until is not None and valid_until < today


def check_external_share(policy: AfterschoolPolicy, external: int, total: int) -> Violation | None:
    """AS-03: external (institution) courses at most ``max_external_share``."""
    if share_at_most(external, total, policy.max_external_share):
        return None
    return Violation(
        "AS-03",
        f"校外机构提供的课程不得超过学校课程的 {policy.max_external_share * 100:.0f}%"
        f"（将为 {external}/{total}）。",
        {"max_share": str(policy.max_external_share), "external": external, "total": total},
    )


# ---------------------------------------------------------- AS-04 enrollment


def window_state(
    now: dt.datetime, opens_at: dt.datetime | None, closes_at: dt.datetime | None
) -> Literal["unset", "before", "open", "closed"]:
    if opens_at is None or closes_at is None:
        return "unset"
    if now < opens_at:
        return "before"
    if now >= closes_at:
        return "closed"
    return "open"


def slots_clash(
    a: tuple[Iterable[int], dt.time, dt.time], b: tuple[Iterable[int], dt.time, dt.time]
) -> bool:
    """AS-04: two courses share a weekday and their times overlap."""
    a_days, a_start, a_end = a
    b_days, b_start, b_end = b
    if not set(a_days) & set(b_days):
        return False
    return a_start < b_end and b_start < a_end


def seed_hash(seed: str) -> str:
    """Published when the window opens, so the seed revealed at the draw can be checked."""
    return hashlib.sha256(seed.encode()).hexdigest()


def lottery_order(seed: str, course_id: str, applicants: Iterable[str]) -> list[str]:
    """AS-04: the seeded draw for one course: anyone can recompute it from the
    seed, the course id and the applicants; the time of applying plays no part."""
    ordered = sorted(set(applicants))
    rng = random.Random(f"{seed}:{course_id}")
    rng.shuffle(ordered)
    return ordered


# ---------------------------------------------------------------- AS-05 fees


def check_fee(standard_fen: int, standard_unit: str, fee_fen: int, unit: str) -> Violation | None:
    """AS-05: a course's fee follows the approved standard (same unit, not above)."""
    if unit not in FEE_UNITS or unit != standard_unit:
        return Violation(
            "AS-05", "课程收费须按核定标准的计费方式（按月或按次）。", {"unit": standard_unit}
        )
    if fee_fen < 0 or fee_fen > standard_fen:
        return Violation(
            "AS-05",
            f"课程收费 {fee_fen} 分超过核定标准 {standard_fen} 分。",
            {"standard_fen": standard_fen, "fee_fen": fee_fen},
        )
    return None


@dataclass(frozen=True)
class FeeLine:
    gross_fen: int
    waiver_fen: int
    amount_fen: int


def settle_fee(
    fee_fen: int, unit: str, planned_sessions: int, served_sessions: int, waiver_percent: int
) -> FeeLine:
    """AS-05: a month's fee on days actually served.

    Per session: fee x sessions served. Per month: the month's fee pro rata
    ``served / planned`` (floor to whole fen; nothing planned, nothing due).
    A waiver of ``waiver_percent`` (0-100) for a family in difficulty comes off
    the gross (floor in the family's favour).
    """
    if unit == "session":
        gross = fee_fen * served_sessions
    elif planned_sessions <= 0:
        gross = 0
    else:
        served = min(served_sessions, planned_sessions)
        gross = math.floor(Fraction(fee_fen * served, planned_sessions))
    waiver = math.ceil(Fraction(gross * waiver_percent, 100))  # the family pays less
    waiver = min(waiver, gross)
    return FeeLine(gross, waiver, gross - waiver)


def refund_on_withdrawal(paid_fen: int, due_fen: int) -> int:
    """AS-05: per-day refund: what was paid beyond the days actually served."""
    return max(0, paid_fen - due_fen)


# -------------------------------------------------------------- AS-07 / AS-08


def check_score(score: int) -> Violation | None:
    if 1 <= score <= 5:
        return None
    return Violation("AS-07", "评分须为 1 至 5 分。", {"score": score})


@dataclass(frozen=True)
class SchoolFigures:
    school_id: str
    has_plan: bool
    students: int
    served: int
    difficulty: int
    difficulty_served: int
    external_courses: int
    courses: int
    satisfaction_sum: int
    satisfaction_count: int


@dataclass(frozen=True)
class SchoolReport:
    school_id: str
    has_plan: bool
    students: int
    served: int
    served_share: Decimal
    difficulty: int
    difficulty_served: int
    difficulty_served_share: Decimal | None
    external_share: Decimal
    satisfaction: Decimal | None
    meets_target: bool


def share(part: int, whole: int) -> Decimal:
    """A share rounded to 4 places for reports (decisions use exact comparisons)."""
    if whole == 0:
        return Decimal(0)
    return (Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001"))


def school_report(policy: AfterschoolPolicy, f: SchoolFigures) -> SchoolReport:
    """AS-08: one school's oversight figures; below target when the served share
    is under ``served_share_target`` (exact comparison)."""
    return SchoolReport(
        school_id=f.school_id,
        has_plan=f.has_plan,
        students=f.students,
        served=f.served,
        served_share=share(f.served, f.students),
        difficulty=f.difficulty,
        difficulty_served=f.difficulty_served,
        difficulty_served_share=(
            share(f.difficulty_served, f.difficulty) if f.difficulty else None
        ),
        external_share=share(f.external_courses, f.courses),
        satisfaction=(
            (Decimal(f.satisfaction_sum) / Decimal(f.satisfaction_count)).quantize(Decimal("0.01"))
            if f.satisfaction_count
            else None
        ),
        meets_target=f.has_plan
        and f.students > 0
        and share_at_least(f.served, f.students, policy.served_share_target),
    )
