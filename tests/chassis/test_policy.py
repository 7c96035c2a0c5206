"""Policy profiles (X-04) and the pure rules helpers built on them (HW-02, INST-06, ...)."""

from __future__ import annotations

import datetime as dt
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from chassis.policy import (
    DEFAULT_POLICY_DIR,
    PolicyError,
    PolicyProfile,
    PolicyRegistry,
    UnknownRegionError,
    class_size_band,
    grade_band,
    max_price_within_guide_fen,
    price_within_guide,
    share_at_least,
    share_at_most,
)

REGIONS = ("changsha-wangcheng", "chongqing-rongchang", "jinhua", "weihai-huancui")
OWN_KEYS = {"id", "name", "extends", "effective_from", "source", "applied_amendments"}


@pytest.fixture(scope="module")
def registry() -> PolicyRegistry:
    return PolicyRegistry.load()


def _tmp_policies(tmp_path: Path, **files: str) -> Path:
    """A policy dir with the real national baseline plus the given files."""
    shutil.copy(DEFAULT_POLICY_DIR / "national.toml", tmp_path / "national.toml")
    for stem, text in files.items():
        (tmp_path / f"{stem.replace('_', '-')}.toml").write_text(text, encoding="utf-8")
    return tmp_path


def _child(pid: str, extends: str = "national", body: str = "") -> str:
    return (
        f'id = "{pid}"\nname = "测试"\nextends = "{extends}"\neffective_from = 2022-01-01\n{body}\n'
    )


# -- the shipped profiles ----------------------------------------------------


def test_x04_every_profile_loads(registry: PolicyRegistry) -> None:
    assert registry.ids() == tuple(sorted(("national", *REGIONS)))
    on = dt.date(2026, 3, 2)
    for rid in registry.ids():
        p = registry.profile(rid, on=on)
        assert p.id == rid
        assert p.name
        assert p.homework.daily_limit_minutes.upper_primary == 60
        assert p.funds.max_charge_fen == 500_000
    for rid in REGIONS:
        assert registry.profile(rid, on=on).extends == "national"
        assert registry.lineage(rid) == ("national", rid)
    assert registry.profile("national", on=on).extends is None


def test_x04_default_directory_is_repo_policy() -> None:
    assert DEFAULT_POLICY_DIR == Path(__file__).resolve().parents[2] / "policy"
    assert (DEFAULT_POLICY_DIR / "national.toml").is_file()


def test_x04_national_baseline_figures(registry: PolicyRegistry) -> None:
    p = registry.profile("national", on=dt.date(2025, 1, 1))
    hw = p.homework
    assert (hw.daily_limit_minutes.lower_primary, hw.daily_limit_minutes.junior) == (0, 90)
    assert hw.no_written_homework_festivals == ("qingming", "duanwu", "midautumn")
    assert {"家长批改", "家长签字检查", "手机打卡", "罚抄"} <= set(hw.forbidden_phrases)
    assert hw.burden_alert_window_school_days == 7
    a = p.afterschool
    assert a.min_daily_minutes == 120
    assert (a.min_end_time_primary, a.min_end_time_junior) == (dt.time(17, 30), dt.time(18))
    assert a.evening_study_latest_end_junior == dt.time(20, 30)
    assert a.max_external_share == Decimal("0.30")
    assert a.served_share_target == Decimal("0.90")
    i = p.institutions
    assert i.latest_end("offline") == dt.time(20, 30)
    assert i.latest_end("online") == dt.time(21)
    assert (i.online_lesson_max_minutes, i.online_min_break_minutes) == (30, 10)
    assert i.online_min_age_years == 6
    assert i.guided_price.max_markup == Decimal("0.10")
    f = p.funds
    assert (f.max_charge_months, f.max_charge_lessons, f.max_charge_fen) == (3, 60, 500_000)
    assert f.auto_confirm_working_days == 7
    assert f.release_mode == "per_lesson"
    assert f.earliest_charge_days_before_start is None


def test_x04_inheritance_and_overrides(registry: PolicyRegistry) -> None:
    on = dt.date(2026, 3, 2)
    national = registry.profile("national", on=on)
    jinhua = registry.profile("jinhua", on=on)
    # Jinhua overrides what 001 says ...
    assert jinhua.school_day.earliest_class_start_primary == dt.time(8, 30)
    assert national.school_day.earliest_class_start_primary == dt.time(8, 20)
    assert jinhua.afterschool.require_interest_period_daily is True
    assert national.afterschool.require_interest_period_daily is False
    # ... and inherits the rest of the same table (tables merge).
    assert jinhua.school_day.earliest_class_start_junior == dt.time(8)
    assert jinhua.afterschool.max_external_share == national.afterschool.max_external_share
    assert jinhua.homework == national.homework
    # Changsha's plan adds no stricter figure: identical apart from its own keys.
    changsha = registry.profile("changsha-wangcheng", on=on)
    assert changsha.model_dump(exclude=OWN_KEYS) == national.model_dump(exclude=OWN_KEYS)
    assert changsha.effective_from == dt.date(2021, 12, 3)


def test_x04_hw02_weihai_is_5_4_grade6_junior(registry: PolicyRegistry) -> None:
    """HW-02: in 环翠 (5-4) grade 6 is junior high (90 min); in 6-3 regions 60 min."""
    on = dt.date(2026, 3, 2)
    weihai = registry.profile("weihai-huancui", on=on)
    assert weihai.school_system == "5-4"
    assert weihai.grade_band(6) == "junior"
    assert weihai.homework_limit_minutes(6) == 90
    assert weihai.homework_limit_minutes(5) == 60
    assert weihai.afterschool.min_end_time(weihai.grade_band(6)) == dt.time(18)
    assert weihai.homework.evening_study_juniors_no_home_written_homework is True
    for rid in ("national", "jinhua", "changsha-wangcheng", "chongqing-rongchang"):
        p = registry.profile(rid, on=on)
        assert p.school_system == "6-3"
        assert p.homework_limit_minutes(6) == 60
        assert p.homework_limit_minutes(7) == 90
        assert p.homework_limit_minutes(2) == 0


@pytest.mark.parametrize(
    ("grade", "system", "band"),
    [
        (1, "6-3", "lower_primary"),
        (2, "5-4", "lower_primary"),
        (3, "6-3", "upper_primary"),
        (5, "5-4", "upper_primary"),
        (6, "6-3", "upper_primary"),
        (6, "5-4", "junior"),
        (7, "6-3", "junior"),
        (9, "5-4", "junior"),
    ],
)
def test_hw02_grade_band(grade: int, system: str, band: str) -> None:
    assert grade_band(grade, system) == band  # type: ignore[arg-type]


@pytest.mark.parametrize("grade", [0, 10, -1])
def test_hw02_grade_band_rejects_non_compulsory_grades(grade: int) -> None:
    with pytest.raises(ValueError, match="grade"):
        grade_band(grade, "6-3")


def test_hw04_limits_by_day_kind(registry: PolicyRegistry) -> None:
    p = registry.profile("national", on=dt.date(2026, 3, 2))
    assert p.homework_limit_minutes(4, "school_day") == 60
    assert p.homework_limit_minutes(4, "weekend") == 60
    assert p.homework_limit_minutes(1, "vacation") == 0
    assert p.homework_limit_minutes(8, "statutory_holiday") == 90


def test_x04_amendment_applies_from_its_date(registry: PolicyRegistry) -> None:
    rid = "chongqing-rongchang"
    assert registry.amendment_dates(rid) == (dt.date(2023, 3, 21),)
    before = registry.profile(rid, on=dt.date(2023, 3, 20))
    on_day = registry.profile(rid, on=dt.date(2023, 3, 21))
    later = registry.profile(rid, on=dt.date(2026, 1, 1))
    assert before.afterschool.flexible_leave_required is False
    assert before.applied_amendments == ()
    assert on_day.afterschool.flexible_leave_required is True
    assert later.afterschool.flexible_leave_required is True
    assert [a.effective_from for a in on_day.applied_amendments] == [dt.date(2023, 3, 21)]
    assert on_day.applied_amendments[0].profile_id == rid
    # only the amended figure changed
    assert on_day.model_dump(exclude=OWN_KEYS | {"afterschool"}) == before.model_dump(
        exclude=OWN_KEYS | {"afterschool"}
    )


def test_x04_profile_defaults_to_today(registry: PolicyRegistry) -> None:
    assert registry.profile("chongqing-rongchang") == registry.profile(
        "chongqing-rongchang", on=dt.date.today()
    )


def test_x04_unknown_region(registry: PolicyRegistry) -> None:
    with pytest.raises(UnknownRegionError, match="beijing"):
        registry.profile("beijing")
    assert "jinhua" in registry
    assert "beijing" not in registry


def test_x04_profiles_are_frozen(registry: PolicyRegistry) -> None:
    p = registry.profile("national", on=dt.date(2026, 1, 1))
    with pytest.raises(ValidationError):
        setattr(p.homework, "burden_alert_window_school_days", 3)  # noqa: B010
    with pytest.raises(TypeError):
        p.institutions.guided_price.groups["x"] = p.institutions.guided_price.groups["general"]  # type: ignore[index]


def test_x04_profile_json_round_trip(registry: PolicyRegistry) -> None:
    p = registry.profile("chongqing-rongchang", on=dt.date(2026, 1, 1))
    text = p.model_dump_json()
    assert '"10to35"' in text
    assert PolicyProfile.model_validate_json(text) == p


# -- inheritance semantics in a temporary directory ---------------------------


def test_x04_deep_merge_and_inherited_amendments(tmp_path: Path) -> None:
    parent = _child(
        "province",
        body="""
[funds]
auto_confirm_working_days = 10

[[amendments]]
effective_from = 2024-01-01
source = "province 2024"
[amendments.funds]
auto_confirm_working_days = 12
max_charge_lessons = 40
[amendments.homework]
forbidden_phrases = ["只有这一条"]
""",
    )
    child = _child(
        "city",
        extends="province",
        body="""
[funds]
auto_confirm_working_days = 15
earliest_charge_days_before_start = 30

[funds.risk_alerts]
refund_spike_count = 3

[[amendments]]
effective_from = 2025-06-01
[amendments.funds]
release_mode = "staged"
release_stages = [0.3, 0.3, 0.4]
""",
    )
    reg = PolicyRegistry.load(_tmp_policies(tmp_path, province=parent, city=child))
    assert reg.lineage("city") == ("national", "province", "city")
    assert reg.amendment_dates("city") == (dt.date(2024, 1, 1), dt.date(2025, 6, 1))

    early = reg.profile("city", on=dt.date(2023, 6, 1))
    assert early.funds.auto_confirm_working_days == 15  # child beats parent
    assert early.funds.earliest_charge_days_before_start == 30
    assert early.funds.max_charge_lessons == 60  # national
    assert early.funds.risk_alerts.refund_spike_count == 3
    assert early.funds.risk_alerts.window_days == 7  # table merged, not replaced

    mid = reg.profile("city", on=dt.date(2024, 1, 1))
    assert mid.funds.max_charge_lessons == 40  # parent amendment inherited
    assert mid.funds.auto_confirm_working_days == 15  # child's own value still wins
    assert mid.homework.forbidden_phrases == ("只有这一条",)  # arrays replace
    assert reg.profile("province", on=dt.date(2024, 1, 1)).funds.auto_confirm_working_days == 12

    late = reg.profile("city", on=dt.date(2030, 1, 1))
    assert late.funds.release_mode == "staged"
    assert late.funds.stage_amounts_fen(10_001) == (3000, 3000, 4001)
    assert [a.profile_id for a in late.applied_amendments] == ["province", "city"]
    assert reg.profile("city", on=dt.date(2025, 5, 31)).funds.release_mode == "per_lesson"


def _load_error(tmp_path: Path, **files: str) -> str:
    with pytest.raises(PolicyError) as info:
        PolicyRegistry.load(_tmp_policies(tmp_path, **files))
    return str(info.value)


def test_x04_rejects_unknown_top_level_key(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, city=_child("city", body="colour = 'red'"))
    assert "city.toml" in msg and "unknown key 'colour'" in msg


def test_x04_rejects_unknown_nested_key(tmp_path: Path) -> None:
    body = "[homework.daily_limit_minutes]\nsenior = 120\n"
    msg = _load_error(tmp_path, city=_child("city", body=body))
    assert "city.toml" in msg and "homework.daily_limit_minutes.senior" in msg


def test_x04_rejects_unknown_key_in_price_group(tmp_path: Path) -> None:
    body = "[institutions.guided_price.groups.general.lt10]\nhybrid = 100\n"
    msg = _load_error(tmp_path, city=_child("city", body=body))
    assert "institutions.guided_price.groups.general.lt10.hybrid" in msg


def test_x04_rejects_unknown_key_in_amendment(tmp_path: Path) -> None:
    body = "[[amendments]]\neffective_from = 2023-01-01\n[amendments.funds]\nmax_months = 2\n"
    msg = _load_error(tmp_path, city=_child("city", body=body))
    assert "amendments[0]" in msg and "funds.max_months" in msg


def test_x04_rejects_amendment_changing_identity(tmp_path: Path) -> None:
    body = "[[amendments]]\neffective_from = 2023-01-01\nextends = 'city'\n"
    msg = _load_error(tmp_path, city=_child("city", body=body))
    assert "unknown key 'extends'" in msg


def test_x04_rejects_amendment_before_profile(tmp_path: Path) -> None:
    body = (
        "[[amendments]]\neffective_from = 2021-01-01\n[amendments.funds]\nmax_charge_months = 2\n"
    )
    msg = _load_error(tmp_path, city=_child("city", body=body))
    assert "before the profile's 2022-01-01" in msg


def test_x04_rejects_cycle(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, a=_child("a", extends="b"), b=_child("b", extends="a"))
    assert "cycle in 'extends'" in msg
    assert "a -> b -> a" in msg or "b -> a -> b" in msg


def test_x04_rejects_self_extension(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, a=_child("a", extends="a"))
    assert "cycle in 'extends': a -> a" in msg


def test_x04_rejects_missing_parent(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, city=_child("city", extends="province"))
    assert "'city' extends 'province', which does not exist" in msg


def test_x04_rejects_id_not_matching_file(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, city=_child("town"))
    assert "id 'town' does not match the file name 'city'" in msg


def test_x04_rejects_bad_values_with_location(tmp_path: Path) -> None:
    body = '[funds]\nrelease_mode = "staged"\nrelease_stages = [0.3, 0.3, 0.3]\n'
    msg = _load_error(tmp_path, city=_child("city", body=body))
    assert "city.toml" in msg and "sum to exactly 1" in msg
    msg = _load_error(tmp_path, town=_child("town", body="school_system = '6-6'"))
    assert "town.toml" in msg and "school_system" in msg


def test_x04_rejects_bad_value_only_in_force_later(tmp_path: Path) -> None:
    """A broken amendment is found at load time, not when its date arrives."""
    body = "[[amendments]]\neffective_from = 2099-01-01\n[afterschool]\n"
    body += "[amendments.afterschool]\nmax_external_share = 1.5\n"
    msg = _load_error(tmp_path, city=_child("city", body=body))
    assert "as of 2099-01-01" in msg and "max_external_share" in msg


def test_x04_rejects_unknown_festival_key(tmp_path: Path) -> None:
    body = '[homework]\nno_written_homework_festivals = ["qingming", "christmas"]\n'
    msg = _load_error(tmp_path, city=_child("city", body=body))
    assert "christmas" in msg


def test_x04_rejects_invalid_toml_and_empty_dir(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, city="id = \n")
    assert "city.toml: cannot read TOML" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PolicyError, match="no policy profiles"):
        PolicyRegistry.load(empty)


def test_x04_child_of_invalid_parent_is_reported_once(tmp_path: Path) -> None:
    msg = _load_error(
        tmp_path,
        province=_child("province", body="[funds]\nmax_charge_fen = -1\n"),
        city=_child("city", extends="province"),
    )
    assert "province.toml" in msg and "max_charge_fen" in msg
    assert "city.toml: parent 'province' is invalid" in msg


# -- exact helpers -------------------------------------------------------------


def test_inst06_guided_price_exactly_ten_percent_passes() -> None:
    """INST-06: base + 10 % passes, + 10.01 % fails, in integer fen."""
    markup = Decimal("0.10")
    assert price_within_guide(11_000, 10_000, markup)  # +10 %
    assert not price_within_guide(11_001, 10_000, markup)  # +10.01 %
    assert price_within_guide(3_300, 3_000, markup)
    assert not price_within_guide(3_301, 3_000, markup)
    assert price_within_guide(1, 10_000, markup)  # 下浮不限
    assert not price_within_guide(0, 10_000, markup)
    assert max_price_within_guide_fen(10_000, markup) == 11_000
    assert max_price_within_guide_fen(3_333, markup) == 3_666  # 3666.3 -> floor


def test_inst06_guided_price_from_profile(registry: PolicyRegistry) -> None:
    gp = registry.profile("jinhua", on=dt.date(2026, 1, 1)).institutions.guided_price
    group = gp.group_for("数学")
    assert group == "general"
    base = gp.base_price_fen(group, class_size_band(20), "offline")
    assert base == 4000
    assert gp.within_guide(4400, group=group, band="10to35", mode="offline")
    assert not gp.within_guide(4401, group=group, band="10to35", mode="offline")
    # A 60-minute offline lesson: base scales from the 45-minute unit (5866.67 max).
    assert gp.within_guide(5866, group=group, band="10to35", mode="offline", lesson_minutes=60)
    assert not gp.within_guide(5867, group=group, band="10to35", mode="offline", lesson_minutes=60)
    with pytest.raises(KeyError):
        gp.base_price_fen("nope", "lt10", "online")


@pytest.mark.parametrize(
    ("students", "band"), [(1, "lt10"), (9, "lt10"), (10, "10to35"), (35, "10to35"), (36, "gt35")]
)
def test_inst06_class_size_band(students: int, band: str) -> None:
    assert class_size_band(students) == band


def test_as03_as08_shares_are_exact() -> None:
    assert share_at_most(3, 10, Decimal("0.30"))
    assert not share_at_most(31, 100, Decimal("0.30"))
    assert share_at_most(0, 0, Decimal("0.30"))
    assert share_at_least(9, 10, Decimal("0.90"))
    assert not share_at_least(899, 1000, Decimal("0.90"))
    assert not share_at_least(0, 0, Decimal("0.90"))


def test_fund05_reserve_and_inst04_credit(registry: PolicyRegistry) -> None:
    p = registry.profile("national", on=dt.date(2026, 1, 1))
    assert p.funds.risk_reserve_fen(100_001) == 10_001  # ceil(10 %)
    assert p.funds.risk_reserve_fen(0) == 0
    assert p.funds.stage_amounts_fen(12_345) == (12_345,)
    credit = p.institutions.credit
    assert [credit.level(s) for s in (100, 90, 89.9, 75, 60, 59)] == ["A", "A", "B", "B", "C", "D"]
