"""Pure policy checks of the institutions service (INST-01..INST-08).

Functions of facts, the region's ``PolicyProfile`` and a ``Calendar``; no I/O,
no globals read at run time. Routes and use cases gather the facts, call these,
and turn the verdicts into problem+json (each verdict names its rule id).
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from chassis.calendar import Calendar
from chassis.policy import PolicyProfile, class_size_band, max_price_within_guide_fen

Category = Literal["subject", "sports", "arts", "science_tech"]
Department = Literal["education", "sports", "culture", "science"]
TargetGroup = Literal["preschool", "compulsory", "high_school"]
ProfitStatus = Literal["for_profit", "non_profit"]
Mode = Literal["offline", "online"]

CATEGORIES: Final[tuple[Category, ...]] = ("subject", "sports", "arts", "science_tech")
DEPARTMENTS: Final[tuple[Department, ...]] = ("education", "sports", "culture", "science")

#: INST-01: the competent department of each category [000 §四.19, §三.26]:
#: 学科类 教育, 体育类 体育, 文化艺术类 文旅, 科技类 科技.
COMPETENT_DEPARTMENT: Final[Mapping[Category, Department]] = {
    "subject": "education",
    "sports": "sports",
    "arts": "culture",
    "science_tech": "science",
}
CATEGORY_NAMES_ZH: Final[Mapping[str, str]] = {
    "subject": "学科类",
    "sports": "体育类",
    "arts": "文化艺术类",
    "science_tech": "科技类",
}
DEPARTMENT_NAMES_ZH: Final[Mapping[str, str]] = {
    "education": "教育部门",
    "sports": "体育部门",
    "culture": "文旅部门",
    "science": "科技部门",
}
TARGET_GROUP_NAMES_ZH: Final[Mapping[str, str]] = {
    "preschool": "学龄前儿童",
    "compulsory": "义务教育阶段学生",
    "high_school": "普通高中学生",
}


def competent_department(category: Category) -> Department:
    """INST-01: which department reviews and supervises an institution of ``category``."""
    return COMPETENT_DEPARTMENT[category]


def categories_of(departments: Iterable[str]) -> set[Category]:
    """The categories a regulator holding ``department:<code>`` tenants supervises."""
    wanted = set(departments)
    return {c for c, d in COMPETENT_DEPARTMENT.items() if d in wanted}


@dataclass(frozen=True)
class Violation:
    """One reason a rule refuses; ``lesson`` is the 1-based index of the offending lesson."""

    rule: str
    code: str
    message: str
    lesson: int | None = None
    date: dt.date | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "code": self.code, "message": self.message}
        if self.lesson is not None:
            out["lesson"] = self.lesson
        if self.date is not None:
            out["date"] = self.date.isoformat()
        out.update(self.details)
        return out


# ---------------------------------------------------------------------------
# INST-01: unified social credit code (GB 32100-2015) and organisation code (GB 11714)
# ---------------------------------------------------------------------------

#: GB 32100 character set (no I, O, S, V, Z); a character's value is its index.
CREDIT_CODE_CHARSET: Final = "0123456789ABCDEFGHJKLMNPQRTUWXY"
#: Weight of position i (0-based) is 3^i mod 31.
CREDIT_CODE_WEIGHTS: Final[tuple[int, ...]] = tuple(pow(3, i, 31) for i in range(17))
#: GB 11714 weights of the 8 body characters of the organisation code.
ORG_CODE_WEIGHTS: Final[tuple[int, ...]] = (3, 7, 9, 10, 5, 8, 4, 2)


def _org_char_value(ch: str) -> int:
    # GB 11714: digits are themselves, letters A..Z are 10..35.
    return int(ch) if ch.isdigit() else ord(ch) - 55


def org_code_check_digit(body: str) -> str:
    """GB 11714 check character of an 8-character organisation code body."""
    if len(body) != 8 or not all(c.isdigit() or "A" <= c <= "Z" for c in body):
        raise ValueError("organisation code body must be 8 digits or capital letters")
    total = sum(_org_char_value(c) * w for c, w in zip(body, ORG_CODE_WEIGHTS, strict=True))
    check = 11 - total % 11
    return "X" if check == 10 else "0" if check == 11 else str(check)


def credit_code_check_char(first17: str) -> str:
    """GB 32100 check character: 31 - (sum of value * 3^i mod 31) mod 31; 31 becomes 0."""
    if len(first17) != 17 or any(c not in CREDIT_CODE_CHARSET for c in first17):
        raise ValueError("need 17 characters of the GB 32100 character set")
    total = sum(
        CREDIT_CODE_CHARSET.index(c) * w for c, w in zip(first17, CREDIT_CODE_WEIGHTS, strict=True)
    )
    check = 31 - total % 31
    return CREDIT_CODE_CHARSET[0 if check == 31 else check]


def complete_credit_code(first16: str) -> str:
    """Append both check characters: ``first16`` is positions 1-8 (registration
    authority, type, 6-digit division code) and the 8-character organisation body."""
    first16 = first16.upper()
    first17 = first16 + org_code_check_digit(first16[8:16])
    return first17 + credit_code_check_char(first17)


def normalize_credit_code(value: str) -> str:
    return value.strip().upper()


def credit_code_problems(value: str) -> list[str]:
    """INST-01: what is wrong with a unified social credit code (empty if valid).

    Positions: 1 registration authority, 2 entity type, 3-8 administrative
    division code (digits), 9-17 organisation code (GB 11714, own check
    character at 17), 18 the GB 32100 check character.
    """
    code = normalize_credit_code(value)
    if len(code) != 18:
        return [f"统一社会信用代码应为 18 位，实际 {len(code)} 位"]
    bad = sorted({c for c in code if c not in CREDIT_CODE_CHARSET})
    if bad:
        return [f"含有不允许的字符：{''.join(bad)}（不使用 I、O、S、V、Z）"]
    problems: list[str] = []
    if not code[2:8].isdigit():
        problems.append("第 3–8 位应为登记管理机关行政区划码（6 位数字）")
    else:
        org = code[8:17]
        if org_code_check_digit(org[:8]) != org[8]:
            problems.append("第 9–17 位组织机构代码的校验码不符（GB 11714）")
    if credit_code_check_char(code[:17]) != code[17]:
        problems.append("第 18 位校验码不符（GB 32100）")
    return problems


def is_valid_credit_code(value: str) -> bool:
    return not credit_code_problems(value)


# ---------------------------------------------------------------------------
# INST-02: approval rules
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplicationFacts:
    category: Category
    target_groups: frozenset[TargetGroup]
    profit_status: ProfitStatus
    #: Re-registration of an institution that already held a permit (原有机构重新登记).
    existing: bool


def approval_violations(facts: ApplicationFacts) -> list[Violation]:
    """INST-02: a registration the rules forbid outright (nothing may be granted).

    - no new institution of any category for preschool children, and never
      subject-type training for them [000 last part; 000 §四.20 严禁…以学前班…
      名义开展线下学科类培训];
    - no new subject-type institution for compulsory or high-school students
      [000 §四.19 "不再审批新的…学科类校外培训机构"; 000 last part].
    """
    out: list[Violation] = []
    groups = facts.target_groups
    if "preschool" in groups and (not facts.existing or facts.category == "subject"):
        out.append(
            Violation(
                "INST-02",
                "preschool",
                "不再审批新的面向学龄前儿童的校外培训机构，且严禁面向学龄前儿童开展学科类培训。",
                details={"target_group": "preschool"},
            )
        )
    if facts.category == "subject" and not facts.existing:
        for group in ("compulsory", "high_school"):
            if group in groups:
                out.append(
                    Violation(
                        "INST-02",
                        f"new_subject_{group}",
                        f"不再审批新的面向{TARGET_GROUP_NAMES_ZH[group]}的学科类校外培训机构。",
                        details={"target_group": group},
                    )
                )
    return out


def reregistration_required(facts: ApplicationFacts) -> bool:
    """INST-02: an existing subject-type institution for school students that is
    not yet registered as non-profit may not enroll or charge until it is
    [000 §四.19 "在完成非营利性机构登记前，暂停招生及收费行为"]."""
    return (
        facts.category == "subject"
        and facts.profit_status != "non_profit"
        and bool(facts.target_groups & {"compulsory", "high_school"})
    )


def may_enroll_and_charge(*, status: str, blacklisted: bool, reregistration_pending: bool) -> bool:
    """INST-02/INST-03/INST-08: enrollment and charging need a licence in force,
    no pending re-registration and no black-list entry."""
    return status == "licensed" and not blacklisted and not reregistration_pending


# ---------------------------------------------------------------------------
# INST-03: licence lifecycle (explicit state machine)
# ---------------------------------------------------------------------------

LicenceStatus = Literal[
    "applied", "under_review", "licensed", "rejected", "suspended", "revoked", "terminated"
]
LicenceAction = Literal[
    "start_review", "grant", "reject", "suspend", "reinstate", "revoke", "transform", "terminate"
]
Transformation = Literal["to_non_subject", "to_non_profit", "staff_reassignment"]

LICENCE_STATUS_NAMES_ZH: Final[Mapping[str, str]] = {
    "applied": "已申请",
    "under_review": "审核中",
    "licensed": "已许可",
    "rejected": "不予许可",
    "suspended": "暂停（整改中）",
    "revoked": "已吊销",
    "terminated": "已终止办学",
}

#: (from status, action) -> to status. 三转一止: ``transform`` (to non-subject,
#: to non-profit, staff reassignment) keeps the status; ``terminate`` ends it.
LICENCE_TRANSITIONS: Final[Mapping[tuple[str, str], LicenceStatus]] = {
    ("applied", "start_review"): "under_review",
    ("under_review", "grant"): "licensed",
    ("under_review", "reject"): "rejected",
    ("licensed", "suspend"): "suspended",
    ("suspended", "reinstate"): "licensed",
    ("licensed", "revoke"): "revoked",
    ("suspended", "revoke"): "revoked",
    ("licensed", "transform"): "licensed",
    ("suspended", "transform"): "suspended",
    ("licensed", "terminate"): "terminated",
    ("suspended", "terminate"): "terminated",
}

#: Statuses that once held a licence (public detail pages exist for these).
PUBLIC_STATUSES: Final = frozenset({"licensed", "suspended", "revoked", "terminated"})


def allowed_licence_actions(status: str) -> list[str]:
    return sorted(a for (s, a) in LICENCE_TRANSITIONS if s == status)


def next_licence_status(status: str, action: str) -> LicenceStatus | None:
    """INST-03: the status after ``action``, or None if the transition is illegal."""
    return LICENCE_TRANSITIONS.get((status, action))


def transformation_violations(
    kind: Transformation, *, category: Category, profit_status: ProfitStatus
) -> list[Violation]:
    """INST-03 三转: a transformation that changes nothing is refused."""
    if kind == "to_non_subject" and category != "subject":
        return [Violation("INST-03", "already_non_subject", "该机构已是非学科类机构。")]
    if kind == "to_non_profit" and profit_status == "non_profit":
        return [Violation("INST-03", "already_non_profit", "该机构已登记为非营利性机构。")]
    return []


# ---------------------------------------------------------------------------
# INST-05: trainers
# ---------------------------------------------------------------------------

BackgroundCheck = Literal["clear", "pending", "record_found"]


@dataclass(frozen=True)
class TrainerFacts:
    institution_category: Category
    nationality: str  # ISO 3166-1 alpha-2, "CN" for Chinese citizens
    located_abroad: bool
    teacher_certificate_number: str | None
    consent_given: bool
    background_check: BackgroundCheck
    #: The trainer's hashed identity number matches an in-service school teacher.
    matches_in_service_teacher: bool


def trainer_violations(facts: TrainerFacts) -> list[Violation]:
    """INST-05 (all at once): in-service teachers, foreign nationals abroad,
    subject-type trainers without a teacher qualification certificate, no
    consent to real-name registration, a disqualifying background record."""
    out: list[Violation] = []
    if facts.matches_in_service_teacher:
        out.append(
            Violation(
                "INST-05",
                "in_service_teacher",
                "严禁聘用中小学在职教师：该身份证号与在职教师名册相符。",
            )
        )
    if facts.nationality != "CN" and facts.located_abroad:
        out.append(Violation("INST-05", "foreign_abroad", "严禁聘请在境外的外籍人员开展培训活动。"))
    if facts.institution_category == "subject" and not facts.teacher_certificate_number:
        out.append(
            Violation(
                "INST-05",
                "teacher_certificate_missing",
                "学科类培训的教师应具有相应的教师资格（缺少教师资格证书编号）。",
            )
        )
    if not facts.consent_given:
        out.append(
            Violation("INST-05", "no_consent", "实名登记须经本人同意（consent_given 须为 true）。")
        )
    if facts.background_check == "record_found":
        out.append(
            Violation(
                "INST-05",
                "background_record",
                "背景审查发现不得从事面向未成年人工作的记录（未成年人保护法第六十二条）。",
            )
        )
    return out


# ---------------------------------------------------------------------------
# INST-06: course filing
# ---------------------------------------------------------------------------

#: Grades: 0 preschool (学前), 1-9 compulsory education, 10-12 high school.
PRESCHOOL_GRADE: Final = 0
COMPULSORY_GRADES: Final = frozenset(range(1, 10))
HIGH_SCHOOL_GRADES: Final = frozenset(range(10, 13))
#: Academic subjects: training in these is subject-type (学科类) training.
ACADEMIC_SUBJECTS: Final = frozenset(
    {
        "chinese",
        "math",
        "english",
        "foreign_language",
        "morality",
        "history",
        "geography",
        "physics",
        "chemistry",
        "biology",
        "science",
    }
)


def target_group_of_grade(grade: int) -> TargetGroup:
    if grade == PRESCHOOL_GRADE:
        return "preschool"
    return "compulsory" if grade in COMPULSORY_GRADES else "high_school"


@dataclass(frozen=True)
class Lesson:
    date: dt.date
    start: dt.time
    end: dt.time

    @property
    def minutes(self) -> int:
        return _minutes(self.end) - _minutes(self.start)


def _minutes(t: dt.time) -> int:
    return t.hour * 60 + t.minute


@dataclass(frozen=True)
class CourseFacts:
    institution_category: Category
    institution_target_groups: frozenset[TargetGroup]
    subject: str
    mode: Mode
    target_grades: frozenset[int]
    lesson_minutes: int
    price_per_lesson_fen: int
    lesson_count: int
    max_class_size: int
    lessons: tuple[Lesson, ...]
    min_age_years: int | None = None
    overseas_curriculum: bool = False
    exams_or_rankings: bool = False


@dataclass(frozen=True)
class CourseVerdict:
    violations: list[Violation]
    warnings: list[str]
    price_group: str | None = None
    class_size_band: str | None = None
    max_price_fen: int | None = None

    @property
    def ok(self) -> bool:
        return not self.violations


def guided_max_price_fen(
    profile: PolicyProfile, *, subject: str, band: str, mode: Mode, lesson_minutes: int
) -> tuple[str, int]:
    """INST-06: the price group and the highest per-lesson price (fen) within
    the guided price (base scaled to the lesson length, up to +max_markup)."""
    gp = profile.institutions.guided_price
    group = gp.group_for(subject)
    base = gp.base_price_fen(group, band, mode)  # type: ignore[arg-type]
    unit = gp.unit_minutes(mode)
    # floor(base * (1 + markup) * minutes / unit): the same exact comparison as
    # ``within_guide`` (which decides); this is only the figure we show.
    top = max_price_within_guide_fen(base * lesson_minutes, gp.max_markup) // unit
    return group, top


def course_violations(
    facts: CourseFacts, profile: PolicyProfile, calendar: Calendar
) -> CourseVerdict:
    """INST-06: every violation of a course filing, each with the offending lesson.

    Subject-type courses for compulsory students: no lesson on the profile's
    blocked day kinds (weekends, statutory holidays, winter/summer vacations),
    offline lessons end by 20:30 and online ones by 21:00, online lessons at
    most 30 minutes with at least 10-minute breaks, price within the guided
    price (base by subject group x class-size band x mode, up to +10 %), no
    overseas curricula. Any course: no online training for children under 6,
    no exams/competitions/rankings for compulsory students, a non-subject
    institution may not file academic-subject training, target grades within
    the institution's registered target groups.
    """
    policy = profile.institutions
    out: list[Violation] = []
    warnings: list[str] = []
    lessons = sorted(enumerate(facts.lessons, start=1), key=lambda p: (p[1].date, p[1].start))
    is_subject = facts.institution_category == "subject"
    compulsory = bool(facts.target_grades & COMPULSORY_GRADES)
    groups = {target_group_of_grade(g) for g in facts.target_grades}

    outside = sorted(groups - facts.institution_target_groups)
    if outside:
        out.append(
            Violation(
                "INST-06",
                "target_group_not_registered",
                "课程面向的学段不在机构登记的培训对象范围内："
                + "、".join(TARGET_GROUP_NAMES_ZH[g] for g in outside),
                details={"target_groups": outside},
            )
        )
    if not is_subject and facts.subject in ACADEMIC_SUBJECTS:
        out.append(
            Violation(
                "INST-06",
                "non_subject_institution_subject_training",
                "严禁非学科类培训机构从事学科类培训。",
                details={"subject": facts.subject},
            )
        )
    if is_subject and PRESCHOOL_GRADE in facts.target_grades:
        out.append(
            Violation(
                "INST-06",
                "preschool_subject_training",
                "严禁面向学龄前儿童开展学科类培训（含学前班、幼小衔接班）。",
            )
        )
    under_age = PRESCHOOL_GRADE in facts.target_grades or (
        facts.min_age_years is not None and facts.min_age_years < policy.online_min_age_years
    )
    if facts.mode == "online" and under_age:
        out.append(
            Violation(
                "INST-06",
                "online_under_min_age",
                f"严禁面向{policy.online_min_age_years}岁以下儿童开展线上培训。",
                details={"min_age_years": policy.online_min_age_years},
            )
        )
    if compulsory and facts.exams_or_rankings:
        out.append(
            Violation(
                "INST-06",
                "exams_or_rankings",
                "严禁组织义务教育阶段考试、竞赛及以排名、分班为目的的测试。",
            )
        )

    price_group: str | None = None
    band: str | None = None
    top: int | None = None
    if is_subject and compulsory:
        if facts.overseas_curriculum:
            out.append(
                Violation("INST-06", "overseas_curriculum", "严禁学科类培训机构提供境外教育课程。")
            )
        blocked = set(policy.subject_blocked_day_kinds)
        latest = policy.latest_end(facts.mode)
        terms_missing: set[int] = set()
        for index, lesson in lessons:
            d = lesson.date
            if "statutory_holiday" in blocked and calendar.is_statutory_holiday(d):
                out.append(
                    Violation(
                        "INST-06",
                        "statutory_holiday",
                        f"{d.isoformat()} 是法定节假日（{calendar.holiday_name(d)}），"
                        "不得组织学科类培训。",
                        lesson=index,
                        date=d,
                    )
                )
            if "weekend" in blocked and calendar.is_weekend_rest(d):
                out.append(
                    Violation(
                        "INST-06",
                        "weekend",
                        f"{d.isoformat()} 是休息日，不得组织学科类培训。",
                        lesson=index,
                        date=d,
                    )
                )
            if "vacation" in blocked:
                vacation = calendar.in_vacation(d)
                if vacation is not None:
                    name = "寒假" if vacation == "winter" else "暑假"
                    out.append(
                        Violation(
                            "INST-06",
                            "vacation",
                            f"{d.isoformat()} 在本区{name}期间，不得组织学科类培训。",
                            lesson=index,
                            date=d,
                            details={"vacation": vacation},
                        )
                    )
                elif calendar.term_on(d) is None:
                    terms_missing.add(d.year)
            if lesson.end > latest:
                out.append(
                    Violation(
                        "INST-06",
                        "ends_too_late",
                        f"{'线上' if facts.mode == 'online' else '线下'}培训结束时间不得晚于"
                        f"{latest.strftime('%H:%M')}（本节 {lesson.end.strftime('%H:%M')} 结束）。",
                        lesson=index,
                        date=d,
                        details={"latest_end": latest.strftime("%H:%M")},
                    )
                )
        if terms_missing:
            warnings.append(
                "本区校历未覆盖 "
                + "、".join(str(y) for y in sorted(terms_missing))
                + " 年的部分日期，寒暑假未能核对。"
            )
        if facts.mode == "online":
            if facts.lesson_minutes > policy.online_lesson_max_minutes:
                out.append(
                    Violation(
                        "INST-06",
                        "online_lesson_too_long",
                        f"线上学科类培训每课时不超过{policy.online_lesson_max_minutes}分钟"
                        f"（申报 {facts.lesson_minutes} 分钟）。",
                        details={"limit": policy.online_lesson_max_minutes},
                    )
                )
            for (_, prev), (index, lesson) in itertools.pairwise(lessons):
                if prev.date != lesson.date:
                    continue
                gap = _minutes(lesson.start) - _minutes(prev.end)
                if gap < policy.online_min_break_minutes:
                    out.append(
                        Violation(
                            "INST-06",
                            "online_break_too_short",
                            f"线上课程间隔不少于{policy.online_min_break_minutes}分钟"
                            f"（与上一节间隔 {gap} 分钟）。",
                            lesson=index,
                            date=lesson.date,
                            details={
                                "break_minutes": gap,
                                "limit": policy.online_min_break_minutes,
                            },
                        )
                    )
        band = class_size_band(facts.max_class_size)
        gp = policy.guided_price
        price_group, top = guided_max_price_fen(
            profile,
            subject=facts.subject,
            band=band,
            mode=facts.mode,
            lesson_minutes=facts.lesson_minutes,
        )
        within = gp.within_guide(
            facts.price_per_lesson_fen,
            group=price_group,
            band=band,
            mode=facts.mode,
            lesson_minutes=facts.lesson_minutes,
        )
        if not within:
            out.append(
                Violation(
                    "INST-06",
                    "price_above_guide",
                    f"每课时 {facts.price_per_lesson_fen} 分超出政府指导价上限 {top} 分"
                    f"（基准价上浮不超过 {gp.max_markup * 100:.0f}%）。",
                    details={
                        "price_per_lesson_fen": facts.price_per_lesson_fen,
                        "max_price_fen": top,
                        "price_group": price_group,
                        "class_size_band": band,
                    },
                )
            )
    return CourseVerdict(out, warnings, price_group, band, top)


#: Years a schedule may name (the calendar computes festivals for 1901..9998).
LESSON_YEARS: Final = (2000, 9998)


def lesson_input_problems(
    lessons: Sequence[Lesson], *, lesson_minutes: int, lesson_count: int
) -> list[tuple[str, str]]:
    """Shape errors of a schedule (field, message): not policy, just bad input."""
    out: list[tuple[str, str]] = []
    for i, lesson in enumerate(lessons):
        if not LESSON_YEARS[0] <= lesson.date.year <= LESSON_YEARS[1]:
            out.append(
                (
                    f"body.lessons.{i}.date",
                    f"上课日期应在 {LESSON_YEARS[0]}–{LESSON_YEARS[1]} 年之间",
                )
            )
    if out:
        return out
    if len(lessons) != lesson_count:
        out.append(("body.lesson_count", f"课时数 {lesson_count} 与课表节数 {len(lessons)} 不一致"))
    for i, lesson in enumerate(lessons):
        if lesson.end <= lesson.start:
            out.append((f"body.lessons.{i}.end", "结束时间须晚于开始时间"))
        elif lesson.minutes != lesson_minutes:
            out.append(
                (
                    f"body.lessons.{i}",
                    f"本节 {lesson.minutes} 分钟，与每课时分钟数 {lesson_minutes} 不一致",
                )
            )
    ordered = sorted(enumerate(lessons), key=lambda p: (p[1].date, p[1].start))
    for (_, a), (j, b) in itertools.pairwise(ordered):
        if a.date == b.date and b.start < a.end:
            out.append((f"body.lessons.{j}", "与同日另一节课时间重叠"))
    return out


# ---------------------------------------------------------------------------
# INST-07: complaints
# ---------------------------------------------------------------------------

ComplaintStatus = Literal["received", "assigned", "investigating", "resolved", "dismissed"]
ComplaintAction = Literal["assign", "investigate", "resolve", "dismiss"]
ComplaintCategory = Literal[
    "no_licence",
    "in_service_teacher",
    "out_of_hours",
    "advertising",
    "overcharging",
    "refund_refused",
    "other",
]
COMPLAINT_TRANSITIONS: Final[Mapping[tuple[str, str], ComplaintStatus]] = {
    ("received", "assign"): "assigned",
    ("assigned", "investigate"): "investigating",
    ("investigating", "resolve"): "resolved",
    ("investigating", "dismiss"): "dismissed",
}
COMPLAINT_CLOSED: Final = frozenset({"resolved", "dismissed"})


def allowed_complaint_actions(status: str) -> list[str]:
    return sorted(a for (s, a) in COMPLAINT_TRANSITIONS if s == status)


def next_complaint_status(status: str, action: str) -> ComplaintStatus | None:
    return COMPLAINT_TRANSITIONS.get((status, action))


def complaint_department(
    institution_category: Category | None, training_category: Category | None
) -> Department:
    """INST-07: the department a report goes to: the institution's competent
    department, else the one of the kind of training reported, else education
    (教育部门 统筹, 000 §三.26)."""
    category = institution_category or training_category
    return competent_department(category) if category is not None else "education"


def complaint_deadline(received_on: dt.date, profile: PolicyProfile, calendar: Calendar) -> dt.date:
    """INST-07: resolve or dismiss within the profile's number of working days."""
    return calendar.add_working_days(
        received_on, profile.institutions.complaint_deadline_working_days
    )


def complaint_overdue(status: str, deadline: dt.date, today: dt.date) -> bool:
    return status not in COMPLAINT_CLOSED and today > deadline


# ---------------------------------------------------------------------------
# INST-04 / INST-08: credit record and black list
# ---------------------------------------------------------------------------

#: INST-04 credit score (platform default, documented): every institution
#: starts at 100; each record below changes it by the given points; the score
#: is clamped to 0..100 and mapped to A-D by the profile's thresholds
#: (``institutions.credit``: A >= 90, B >= 75, C >= 60, else D).
CREDIT_START: Final = 100
CREDIT_DELTAS: Final[Mapping[str, int]] = {
    "complaint_substantiated": -5,  # a report resolved as substantiated (INST-07)
    "inspection_issues_found": -3,  # inspection found problems (INST-08)
    "inspection_serious_violation": -10,
    "penalty_minor": -5,  # penalties by severity (INST-08)
    "penalty_general": -15,
    "penalty_serious": -30,
    "refund_overdue": -5,  # funds.refund.overdue.v1 (FUND-06)
    "risk_alert": -3,  # funds.risk.alert.v1 (FUND-08)
}


def credit_score(deltas: Iterable[int]) -> int:
    return max(0, min(100, CREDIT_START + sum(deltas)))


def credit_level(score: int, profile: PolicyProfile) -> str:
    return profile.institutions.credit.level(score)


PenaltyKind = Literal["warning", "rectification_order", "fine", "licence_revocation"]
Severity = Literal["minor", "general", "serious"]


def penalty_effects(kind: PenaltyKind, severity: Severity) -> tuple[bool, bool]:
    """INST-08: (revoke the licence, blacklist). A revocation or a serious case
    blacklists [000 §四.23; 003 查处机制 "情节严重的吊销办学许可证"]."""
    revoke = kind == "licence_revocation"
    return revoke, revoke or severity == "serious"
