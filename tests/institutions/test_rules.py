"""Pure policy checks of institutions (INST-01..INST-08): facts + profile + calendar."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from chassis.calendar import Calendar, festival_date, load_holiday_files, load_school_terms
from chassis.policy import PolicyRegistry
from services.institutions import rules
from services.institutions.rules import (
    ApplicationFacts,
    CourseFacts,
    Lesson,
    TrainerFacts,
    approval_violations,
    course_violations,
)

REGISTRY = PolicyRegistry.load()
JINHUA = REGISTRY.profile("jinhua", on=dt.date(2026, 11, 23))
WEIHAI = REGISTRY.profile("weihai-huancui", on=dt.date(2026, 11, 23))
TERMS = load_school_terms()
HOLIDAYS = load_holiday_files()
CAL_JINHUA = Calendar(HOLIDAYS, TERMS["jinhua"])
CAL_WEIHAI = Calendar(HOLIDAYS, TERMS["weihai-huancui"])
T = dt.time


def codes(violations):
    return [v.code for v in violations]


# ---------------------------------------------------------------- INST-01


@pytest.mark.parametrize(
    "code",
    [
        "91350100M000100Y43",  # the GB 32100 standard's example
        "91110000802100433B",
        rules.complete_credit_code("52330702MJ0000AB"),
    ],
)
def test_inst01_valid_credit_codes_pass_both_checksums(code):
    assert rules.credit_code_problems(code) == []
    assert rules.is_valid_credit_code(code.lower())  # normalized to upper case


def test_inst01_gb32100_check_character_is_verified():
    good = "91350100M000100Y43"
    for ch in rules.CREDIT_CODE_CHARSET:
        if ch == good[-1]:
            continue
        problems = rules.credit_code_problems(good[:-1] + ch)
        assert problems == ["第 18 位校验码不符（GB 32100）"]


def test_inst01_gb11714_organisation_code_is_verified_on_its_own():
    # Change the organisation check character (position 17) and recompute the
    # final GB 32100 character: only the GB 11714 check can catch it.
    body = "91350100M000100Y"
    wrong_org = body + "5"
    code = wrong_org + rules.credit_code_check_char(wrong_org)
    assert rules.credit_code_problems(code) == ["第 9–17 位组织机构代码的校验码不符（GB 11714）"]


def test_inst01_weights_and_check_rule():
    assert rules.CREDIT_CODE_WEIGHTS[:6] == (1, 3, 9, 27, 19, 26)
    # 31 - (sum mod 31) == 31 maps to "0": find a 17-char prefix with sum ≡ 0 (mod 31).
    assert rules.credit_code_check_char("00000000000000000") == "0"


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        ("91350100M000100Y4", "18 位"),
        ("91350100M000100Y4300", "18 位"),
        ("91350100M000I00Y43", "不允许的字符"),  # I is not in the charset
        ("913501A0M000100Y43", "行政区划码"),
    ],
)
def test_inst01_malformed_codes_are_explained(code, fragment):
    problems = rules.credit_code_problems(code)
    assert problems and fragment in problems[0]


def test_inst01_competent_department_by_category():
    assert rules.competent_department("subject") == "education"
    assert rules.competent_department("sports") == "sports"
    assert rules.competent_department("arts") == "culture"
    assert rules.competent_department("science_tech") == "science"


# ---------------------------------------------------------------- INST-02


def facts(category="sports", groups=("compulsory",), profit="for_profit", existing=False):
    return ApplicationFacts(category, frozenset(groups), profit, existing)


def test_inst02_no_new_subject_institution_for_compulsory_or_high_school():
    v = approval_violations(facts("subject", ("compulsory", "high_school"), "non_profit"))
    assert codes(v) == ["new_subject_compulsory", "new_subject_high_school"]
    assert {x.rule for x in v} == {"INST-02"}


@pytest.mark.parametrize("category", ["subject", "sports", "arts", "science_tech"])
def test_inst02_no_new_institution_of_any_category_for_preschool(category):
    assert "preschool" in codes(approval_violations(facts(category, ("preschool",))))


def test_inst02_new_non_subject_institution_for_school_students_is_allowed():
    assert approval_violations(facts("arts", ("compulsory", "high_school"))) == []


def test_inst02_existing_subject_institution_must_reregister_as_non_profit():
    existing = facts("subject", ("compulsory",), "for_profit", existing=True)
    assert approval_violations(existing) == []
    assert rules.reregistration_required(existing)
    assert not rules.may_enroll_and_charge(
        status="licensed", blacklisted=False, reregistration_pending=True
    )
    converted = facts("subject", ("compulsory",), "non_profit", existing=True)
    assert not rules.reregistration_required(converted)
    # An existing subject-type institution for preschool children stays forbidden.
    assert codes(approval_violations(facts("subject", ("preschool",), existing=True))) == [
        "preschool"
    ]


# ---------------------------------------------------------------- INST-03


def test_inst03_state_machine():
    path = [
        ("applied", "start_review", "under_review"),
        ("under_review", "grant", "licensed"),
        ("licensed", "suspend", "suspended"),
        ("suspended", "reinstate", "licensed"),
        ("licensed", "transform", "licensed"),
        ("licensed", "revoke", "revoked"),
    ]
    for status, action, target in path:
        assert rules.next_licence_status(status, action) == target
    assert rules.next_licence_status("under_review", "reject") == "rejected"
    assert rules.next_licence_status("suspended", "revoke") == "revoked"
    assert rules.next_licence_status("suspended", "terminate") == "terminated"
    for status, action in [
        ("applied", "grant"),  # review first
        ("revoked", "reinstate"),
        ("rejected", "grant"),
        ("terminated", "grant"),
        ("licensed", "reinstate"),
    ]:
        assert rules.next_licence_status(status, action) is None
    assert rules.allowed_licence_actions("licensed") == [
        "revoke",
        "suspend",
        "terminate",
        "transform",
    ]
    assert rules.allowed_licence_actions("revoked") == []


def test_inst03_transformation_that_changes_nothing_is_refused():
    assert codes(
        rules.transformation_violations(
            "to_non_profit", category="subject", profit_status="non_profit"
        )
    ) == ["already_non_profit"]
    assert codes(
        rules.transformation_violations(
            "to_non_subject", category="arts", profit_status="for_profit"
        )
    ) == ["already_non_subject"]


# ---------------------------------------------------------------- INST-05


def trainer(**kw):
    base = dict(
        institution_category="subject",
        nationality="CN",
        located_abroad=False,
        teacher_certificate_number="20213300000012345",
        consent_given=True,
        background_check="clear",
        matches_in_service_teacher=False,
    )
    base.update(kw)
    return TrainerFacts(**base)


def test_inst05_clean_trainer_passes():
    assert rules.trainer_violations(trainer()) == []


def test_inst05_all_trainer_violations_at_once():
    v = rules.trainer_violations(
        trainer(
            nationality="US",
            located_abroad=True,
            teacher_certificate_number=None,
            consent_given=False,
            background_check="record_found",
            matches_in_service_teacher=True,
        )
    )
    assert codes(v) == [
        "in_service_teacher",
        "foreign_abroad",
        "teacher_certificate_missing",
        "no_consent",
        "background_record",
    ]


def test_inst05_certificate_only_for_subject_type_and_foreigners_in_china_allowed():
    assert (
        rules.trainer_violations(
            trainer(
                institution_category="sports", teacher_certificate_number=None, nationality="GB"
            )
        )
        == []
    )


# ---------------------------------------------------------------- INST-06


def course(**kw):
    base = dict(
        institution_category="subject",
        institution_target_groups=frozenset({"compulsory"}),
        subject="math",
        mode="offline",
        target_grades=frozenset({5}),
        lesson_minutes=45,
        price_per_lesson_fen=4000,
        lesson_count=1,
        max_class_size=20,
        lessons=(Lesson(dt.date(2026, 12, 1), T(18, 0), T(18, 45)),),  # a Tuesday in term
    )
    base.update(kw)
    if "lessons" in kw and "lesson_count" not in kw:
        base["lesson_count"] = len(base["lessons"])
    return CourseFacts(**base)


def test_inst06_compliant_subject_course_passes():
    verdict = course_violations(course(), JINHUA, CAL_JINHUA)
    assert verdict.ok and verdict.warnings == []
    assert verdict.class_size_band == "10to35" and verdict.price_group == "general"


def test_inst06_weekend_statutory_holiday_and_vacation_each_reported_with_the_lesson():
    lessons = (
        Lesson(dt.date(2026, 12, 1), T(18, 0), T(18, 45)),  # Tue: fine
        Lesson(dt.date(2026, 12, 5), T(9, 0), T(9, 45)),  # Saturday
        Lesson(dt.date(2026, 10, 1), T(9, 0), T(9, 45)),  # 国庆 (loaded 2026 arrangement)
        Lesson(dt.date(2027, 2, 1), T(9, 0), T(9, 45)),  # Monday in jinhua's winter vacation
    )
    v = course_violations(course(lessons=lessons), JINHUA, CAL_JINHUA).violations
    found = {(x.code, x.lesson) for x in v}
    assert found == {("weekend", 2), ("statutory_holiday", 3), ("vacation", 4)}
    assert all(x.rule == "INST-06" for x in v)


def test_inst06_workday_swap_saturday_is_not_a_rest_day():
    # A 调休 working weekend day of the published 2026 arrangement, in term.
    days = (dt.date(2026, 9, 1) + dt.timedelta(days=i) for i in range(120))
    swap = next(d for d in days if CAL_JINHUA.is_workday_swap(d))
    assert swap.isoweekday() >= 6
    v = course_violations(
        course(lessons=(Lesson(swap, T(9, 0), T(9, 45)),)), JINHUA, CAL_JINHUA
    ).violations
    assert "weekend" not in codes(v)


def test_inst06_year_2150_qingming_and_weekend_refused_without_holiday_data():
    """X-05 fallback: no holiday package knows 2150; 清明 is computed."""
    qingming = festival_date(2150, "qingming")
    assert not CAL_JINHUA.has_holiday_data(2150)
    saturday = dt.date(2150, 6, 6)
    assert saturday.isoweekday() == 6
    weekday = dt.date(2150, 6, 9)
    lessons = (
        Lesson(weekday, T(18, 0), T(18, 45)),
        Lesson(qingming, T(18, 0), T(18, 45)),
        Lesson(saturday, T(18, 0), T(18, 45)),
    )
    verdict = course_violations(course(lessons=lessons), JINHUA, CAL_JINHUA)
    found = {(x.code, x.lesson) for x in verdict.violations}
    assert ("statutory_holiday", 2) in found and ("weekend", 3) in found
    assert not any(x.lesson == 1 for x in verdict.violations)
    # Vacations cannot be checked without 2150 school terms: said, not hidden.
    assert any("2150" in w for w in verdict.warnings)


def test_inst06_weihai_5_4_profile_uses_its_own_vacation_and_grade_6_is_compulsory():
    """威海环翠 (5-4): grade 6 is junior high, still compulsory; its winter
    vacation starts on 2027-01-16 while jinhua is still in term."""
    assert WEIHAI.school_system == "5-4"
    lesson = (Lesson(dt.date(2027, 1, 20), T(18, 0), T(18, 45)),)  # a Wednesday
    weihai = course_violations(
        course(target_grades=frozenset({6}), lessons=lesson), WEIHAI, CAL_WEIHAI
    )
    jinhua = course_violations(
        course(target_grades=frozenset({6}), lessons=lesson), JINHUA, CAL_JINHUA
    )
    assert codes(weihai.violations) == ["vacation"]
    assert jinhua.ok


def test_inst06_end_times_offline_2030_online_2100():
    ok = course(lessons=(Lesson(dt.date(2026, 12, 1), T(19, 45), T(20, 30)),))
    late = course(lessons=(Lesson(dt.date(2026, 12, 1), T(19, 46), T(20, 31)),))
    assert course_violations(ok, JINHUA, CAL_JINHUA).ok
    assert codes(course_violations(late, JINHUA, CAL_JINHUA).violations) == ["ends_too_late"]
    online_ok = course(
        mode="online",
        lesson_minutes=30,
        price_per_lesson_fen=2000,
        lessons=(Lesson(dt.date(2026, 12, 1), T(20, 30), T(21, 0)),),
    )
    assert course_violations(online_ok, JINHUA, CAL_JINHUA).ok


def test_inst06_online_lessons_at_most_30_minutes_with_10_minute_breaks():
    day = dt.date(2026, 12, 1)
    lessons = (
        Lesson(day, T(18, 0), T(18, 40)),
        Lesson(day, T(18, 45), T(19, 25)),  # 5-minute break
        Lesson(day, T(19, 35), T(20, 15)),  # 10-minute break: fine
    )
    v = course_violations(
        course(mode="online", lesson_minutes=40, price_per_lesson_fen=2000, lessons=lessons),
        JINHUA,
        CAL_JINHUA,
    ).violations
    assert ("online_lesson_too_long", None) in {(x.code, x.lesson) for x in v}
    breaks = [x for x in v if x.code == "online_break_too_short"]
    assert [(x.lesson, x.details["break_minutes"]) for x in breaks] == [(2, 5)]


def test_inst06_no_online_training_for_under_6_any_category():
    v = course_violations(
        course(
            institution_category="arts",
            institution_target_groups=frozenset({"preschool", "compulsory"}),
            subject="piano",
            mode="online",
            lesson_minutes=30,
            target_grades=frozenset({1}),
            min_age_years=5,
        ),
        JINHUA,
        CAL_JINHUA,
    ).violations
    assert codes(v) == ["online_under_min_age"]


def test_inst06_non_subject_institution_may_not_teach_academic_subjects():
    v = course_violations(
        course(institution_category="sports", subject="english"), JINHUA, CAL_JINHUA
    ).violations
    assert codes(v) == ["non_subject_institution_subject_training"]


def test_inst06_every_violation_reported_at_once():
    day = dt.date(2026, 12, 5)  # Saturday
    verdict = course_violations(
        course(
            mode="online",
            lesson_minutes=45,
            price_per_lesson_fen=999_999,
            target_grades=frozenset({5, 10}),
            overseas_curriculum=True,
            exams_or_rankings=True,
            lessons=(Lesson(day, T(20, 30), T(21, 15)), Lesson(day, T(21, 15), T(22, 0))),
        ),
        JINHUA,
        CAL_JINHUA,
    )
    assert set(codes(verdict.violations)) >= {
        "target_group_not_registered",
        "exams_or_rankings",
        "overseas_curriculum",
        "weekend",
        "ends_too_late",
        "online_lesson_too_long",
        "online_break_too_short",
        "price_above_guide",
    }


@pytest.fixture(scope="module")
def priced_profile(tmp_path_factory):
    """A region whose guided base price is 100.00 yuan per 45-minute offline
    lesson (small classes): exactly +10 % is 110.00, +10.01 % is 110.01."""
    d: Path = tmp_path_factory.mktemp("policy")
    national = (REGISTRY.directory / "national.toml").read_text(encoding="utf-8")
    (d / "national.toml").write_text(national, encoding="utf-8")
    (d / "pricetown.toml").write_text(
        'id = "pricetown"\nname = "指导价测试区"\nextends = "national"\n'
        "effective_from = 2021-09-01\n"
        "[institutions.guided_price.groups.general]\n"
        "lt10 = { offline = 10000, online = 5000 }\n",
        encoding="utf-8",
    )
    return PolicyRegistry.load(d).profile("pricetown", on=dt.date(2026, 11, 23))


@pytest.mark.parametrize(("price", "ok"), [(10000, True), (11000, True), (11001, False), (1, True)])
def test_inst06_guided_price_edges_plus_10_percent_passes_plus_10_01_fails(
    priced_profile, price, ok
):
    verdict = course_violations(
        course(max_class_size=8, price_per_lesson_fen=price), priced_profile, CAL_JINHUA
    )
    assert verdict.ok is ok
    assert verdict.max_price_fen == 11000
    if not ok:
        (v,) = verdict.violations
        assert v.code == "price_above_guide" and v.details["max_price_fen"] == 11000


def test_inst06_guided_price_scales_with_lesson_length_and_band(priced_profile):
    # 90-minute small-class lesson: base doubles, limit 22000.
    lessons = (Lesson(dt.date(2026, 12, 1), T(18, 0), T(19, 30)),)
    assert course_violations(
        course(max_class_size=8, lesson_minutes=90, price_per_lesson_fen=22000, lessons=lessons),
        priced_profile,
        CAL_JINHUA,
    ).ok
    assert not course_violations(
        course(max_class_size=8, lesson_minutes=90, price_per_lesson_fen=22001, lessons=lessons),
        priced_profile,
        CAL_JINHUA,
    ).ok
    # National demo table, 10-35 band: 4000 * 1.1 = 4400.
    assert course_violations(course(price_per_lesson_fen=4400), JINHUA, CAL_JINHUA).ok
    assert not course_violations(course(price_per_lesson_fen=4401), JINHUA, CAL_JINHUA).ok


def test_inst06_non_subject_courses_are_not_time_or_price_restricted():
    v = course_violations(
        course(
            institution_category="sports",
            subject="football",
            price_per_lesson_fen=50000,
            lessons=(Lesson(dt.date(2026, 12, 5), T(20, 0), T(20, 45)),),  # Saturday night
        ),
        JINHUA,
        CAL_JINHUA,
    )
    assert v.ok


def test_inst06_schedule_shape_errors():
    day = dt.date(2026, 12, 1)
    problems = rules.lesson_input_problems(
        [Lesson(day, T(18, 0), T(18, 45)), Lesson(day, T(18, 30), T(19, 0))],
        lesson_minutes=45,
        lesson_count=3,
    )
    fields = [f for f, _ in problems]
    assert "body.lesson_count" in fields and "body.lessons.1" in fields


# ---------------------------------------------------------------- INST-07


def test_inst07_deadline_counts_working_days_over_holidays():
    # Received Wednesday 2026-09-30, just before the 国庆 holiday and its 调休.
    received = dt.date(2026, 9, 30)
    deadline = rules.complaint_deadline(received, JINHUA, CAL_JINHUA)
    assert deadline == CAL_JINHUA.add_working_days(received, 15)
    assert CAL_JINHUA.working_days_between(received, deadline) == 15
    assert (deadline - received).days > 21
    assert rules.complaint_overdue("investigating", deadline, deadline + dt.timedelta(days=1))
    assert not rules.complaint_overdue("resolved", deadline, deadline + dt.timedelta(days=1))
    assert not rules.complaint_overdue("received", deadline, deadline)


def test_inst07_workflow_and_department():
    assert rules.next_complaint_status("received", "assign") == "assigned"
    assert rules.next_complaint_status("received", "resolve") is None
    assert rules.allowed_complaint_actions("investigating") == ["dismiss", "resolve"]
    assert rules.complaint_department("arts", None) == "culture"
    assert rules.complaint_department(None, "science_tech") == "science"
    assert rules.complaint_department(None, None) == "education"


# ---------------------------------------------------------------- INST-04 / INST-08


def test_inst04_credit_score_and_levels():
    assert rules.credit_score([]) == 100
    assert rules.credit_score([-5, -15]) == 80
    assert rules.credit_score([-30] * 5) == 0
    assert rules.credit_level(100, JINHUA) == "A"
    assert rules.credit_level(89, JINHUA) == "B"
    assert rules.credit_level(60, JINHUA) == "C"
    assert rules.credit_level(59, JINHUA) == "D"


def test_inst08_revocation_or_serious_penalty_blacklists():
    assert rules.penalty_effects("licence_revocation", "serious") == (True, True)
    assert rules.penalty_effects("fine", "serious") == (False, True)
    assert rules.penalty_effects("fine", "general") == (False, False)
    assert rules.penalty_effects("warning", "minor") == (False, False)
