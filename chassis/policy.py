"""Region policy profiles (X-04).

Every number a rule enforces is a default of a *policy profile*: a national
baseline (``policy/national.toml``) and one profile per region that
``extends`` it and overrides only what the region's own documents say. This
module loads and validates all of them at start and hands a resolved,
immutable ``PolicyProfile`` to whoever asks; rules receive that object as an
argument and never read files or globals.

Profile files (``policy/<id>.toml``; the file name is the id)::

    id = "jinhua"                 # required, equals the file name
    name = "浙江省金华市"           # required, zh-CN
    extends = "national"          # optional parent id
    effective_from = 2021-09-29   # required: when this profile took effect
    source = "..."                # optional citation
    school_system = "6-3"         # inherited when absent
    [homework] / [afterschool] / [school_day] / [institutions] / [funds]
    [[amendments]]                # optional, dated partial overrides
    effective_from = 2023-03-21
    source = "..."
    [amendments.afterschool]
    flexible_leave_required = true

Resolution of ``profile(region, on=d)``: start from the root ancestor; for
each profile from the root down to ``region`` deep-merge its own values, then
its amendments with ``effective_from <= d`` in date order. Tables merge;
scalars and arrays replace. So a child's own value always beats its parent's,
even a parent amendment dated later (the region deliberately set that figure).
``id``, ``name``, ``extends``, ``effective_from`` and ``source`` are never
inherited. A profile's ``effective_from`` is informational (shown to users,
used to order amendments); asking for a date before it still returns the
profile. Optional figures (``None``) can be set by a child but not unset.

Loading fails with ``PolicyError`` listing every problem: unreadable TOML,
unknown keys (with their dotted path and file), a file whose ``id`` differs
from its name, a missing parent, a cycle in ``extends``, an amendment dated
before its profile, and any value that fails validation in any resolved
version of any profile (every amendment date is resolved and checked at
load, so a bad combination cannot appear later at run time).

Money is integer fen; shares are ``Decimal``; comparisons that matter
(guided price +10 %, external share 30 %) are exact (``price_within_guide``,
``share_at_most``), never float arithmetic.
"""

from __future__ import annotations

import bisect
import copy
import datetime as dt
import math
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    WrapSerializer,
    field_validator,
    model_serializer,
    model_validator,
)

from chassis.calendar import FESTIVAL_NAMES_ZH, DayKind

__all__ = [
    "DEFAULT_POLICY_DIR",
    "AfterschoolPolicy",
    "AmendmentRef",
    "BandMinutes",
    "ClassSizeBand",
    "CreditLevel",
    "CreditThresholds",
    "FundsPolicy",
    "GradeBand",
    "GuidedPrice",
    "HomeworkPolicy",
    "InstitutionsPolicy",
    "LessonMode",
    "PolicyError",
    "PolicyProfile",
    "PolicyRegistry",
    "PriceByMode",
    "PriceGroup",
    "ReleaseMode",
    "RiskAlerts",
    "SchoolDayPolicy",
    "SchoolSystem",
    "UnknownRegionError",
    "class_size_band",
    "grade_band",
    "max_price_within_guide_fen",
    "price_within_guide",
    "share_at_least",
    "share_at_most",
]

#: ``policy/`` of this repository.
DEFAULT_POLICY_DIR: Final[Path] = Path(__file__).resolve().parent.parent / "policy"

SchoolSystem = Literal["6-3", "5-4"]
GradeBand = Literal["lower_primary", "upper_primary", "junior"]
ClassSizeBand = Literal["lt10", "10to35", "gt35"]
LessonMode = Literal["offline", "online"]
ReleaseMode = Literal["per_lesson", "staged"]
CreditLevel = Literal["A", "B", "C", "D"]
BlockedDayKind = Literal["weekend", "statutory_holiday", "vacation"]


class PolicyError(ValueError):
    """Policy profiles could not be loaded; the message lists every problem."""


class UnknownRegionError(LookupError):
    """No profile with that region id."""


# ---------------------------------------------------------------------------
# Pure helpers (exact arithmetic)
# ---------------------------------------------------------------------------


def grade_band(grade: int, school_system: SchoolSystem) -> GradeBand:
    """Grade band for HW-02 limits.

    Grades 1-2 are ``lower_primary`` in both systems. 6-3: grades 3-6
    ``upper_primary``, 7-9 ``junior``. 5-4 (e.g. 威海环翠, 004 §二.2 "小学三至
    五年级"): grades 3-5 ``upper_primary``, 6-9 ``junior``.
    """
    if isinstance(grade, bool) or not isinstance(grade, int) or not 1 <= grade <= 9:
        raise ValueError(f"grade must be an integer 1..9 (compulsory education), got {grade!r}")
    if school_system == "6-3":
        primary_last = 6
    elif school_system == "5-4":
        primary_last = 5
    else:
        raise ValueError(f"unknown school system {school_system!r}")
    if grade <= 2:
        return "lower_primary"
    return "upper_primary" if grade <= primary_last else "junior"


def class_size_band(students: int) -> ClassSizeBand:
    """Guided-price class-size band: ``lt10`` (<10), ``10to35`` (10-35), ``gt35`` (>35)."""
    if students < 1:
        raise ValueError(f"class size must be positive, got {students}")
    if students < 10:
        return "lt10"
    return "10to35" if students <= 35 else "gt35"


def price_within_guide(
    price_fen: int,
    base_fen: int,
    max_markup: Decimal,
    *,
    lesson_minutes: int | None = None,
    unit_minutes: int | None = None,
) -> bool:
    """INST-06: is ``price_fen`` within the guided price (base, up to +markup)?

    Exact: ``price <= base * (1 + markup)`` in rational arithmetic, so with a
    base of 10000 fen and markup 0.10, 11000 passes and 11001 fails. Going
    below the base is allowed (下浮不限) but the price must be positive. With
    ``lesson_minutes`` and ``unit_minutes`` the base is scaled to the lesson's
    length (base is per unit lesson, e.g. 45 min offline).
    """
    if price_fen <= 0 or base_fen <= 0:
        return False
    allowed = Fraction(base_fen) * (1 + Fraction(max_markup))
    if (lesson_minutes is None) != (unit_minutes is None):
        raise ValueError("give both lesson_minutes and unit_minutes, or neither")
    if lesson_minutes is not None and unit_minutes is not None:
        if lesson_minutes <= 0 or unit_minutes <= 0:
            raise ValueError("lesson and unit minutes must be positive")
        allowed = allowed * lesson_minutes / unit_minutes
    return Fraction(price_fen) <= allowed


def max_price_within_guide_fen(base_fen: int, max_markup: Decimal) -> int:
    """Highest integer fen price that passes ``price_within_guide`` for a unit lesson."""
    return math.floor(Fraction(base_fen) * (1 + Fraction(max_markup)))


def share_at_most(part: int, whole: int, limit: Decimal) -> bool:
    """Exact ``part / whole <= limit`` (e.g. AS-03 external share <= 0.30).

    ``whole == 0`` counts as share 0 (nothing to exceed).
    """
    if whole < 0 or part < 0:
        raise ValueError("counts must be non-negative")
    if whole == 0:
        return True
    return Fraction(part, whole) <= Fraction(limit)


def share_at_least(part: int, whole: int, target: Decimal) -> bool:
    """Exact ``part / whole >= target`` (e.g. AS-08 served share >= 0.90).

    ``whole == 0`` meets only a zero target.
    """
    if whole < 0 or part < 0:
        raise ValueError("counts must be non-negative")
    if whole == 0:
        return Fraction(target) == 0
    return Fraction(part, whole) >= Fraction(target)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(gt=0)]
Fen = Annotated[int, Field(strict=True, ge=0)]
PosFen = Annotated[int, Field(strict=True, gt=0)]
Share = Annotated[Decimal, Field(ge=0, le=1)]


def _freeze_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value))


def _serialize_mapping(value: Mapping[str, Any], handler: Any) -> Any:
    return handler(dict(value))


class BandMinutes(_Frozen):
    """Minutes per grade band."""

    lower_primary: NonNegInt
    upper_primary: NonNegInt
    junior: NonNegInt

    def for_band(self, band: GradeBand) -> int:
        value: int = getattr(self, band)
        return value


class HomeworkPolicy(_Frozen):
    """HW-*: homework limits and screening."""

    #: HW-02: required (basic) written homework at home, per school day.
    daily_limit_minutes: BandMinutes
    #: HW-04: per-day caps on weekends, statutory holidays, vacations.
    weekend_daily_limit_minutes: BandMinutes
    statutory_holiday_daily_limit_minutes: BandMinutes
    vacation_daily_limit_minutes: BandMinutes
    #: HW-04: festival keys (``chassis.calendar.FESTIVAL_NAMES_ZH``) without written homework.
    no_written_homework_festivals: tuple[str, ...]
    #: HW-04: a school may declare its own 无书面作业日.
    schools_may_declare_no_written_homework_days: bool
    #: Juniors attending evening self-study take no written homework home (004 §二.2).
    evening_study_juniors_no_home_written_homework: bool
    #: HW-05: phrases that make the content screening warn.
    forbidden_phrases: tuple[Annotated[str, Field(min_length=1)], ...]
    #: HW-06: median over this many school days triggers a burden alert.
    burden_alert_window_school_days: PosInt
    #: HW-06: flag a teacher when actual / estimated minutes exceeds this ratio ...
    estimate_gap_ratio: Annotated[Decimal, Field(gt=1)]
    #: ... over at least this many feedback reports.
    estimate_gap_min_reports: PosInt

    @field_validator("no_written_homework_festivals")
    @classmethod
    def _known_festivals(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in value if k not in FESTIVAL_NAMES_ZH]
        if unknown:
            raise ValueError(
                f"unknown festival key(s) {unknown}; known: {', '.join(FESTIVAL_NAMES_ZH)}"
            )
        if len(set(value)) != len(value):
            raise ValueError("festival keys listed twice")
        return value

    @field_validator("forbidden_phrases")
    @classmethod
    def _distinct_phrases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("forbidden phrase listed twice")
        return value

    def limit_minutes(self, band: GradeBand, day_kind: DayKind = "school_day") -> int:
        """The cap for a grade band on a kind of day (``Calendar.day_kind``)."""
        if day_kind == "weekend":
            return self.weekend_daily_limit_minutes.for_band(band)
        if day_kind == "statutory_holiday":
            return self.statutory_holiday_daily_limit_minutes.for_band(band)
        if day_kind == "vacation":
            return self.vacation_daily_limit_minutes.for_band(band)
        return self.daily_limit_minutes.for_band(band)


class AfterschoolPolicy(_Frozen):
    """AS-*: after-school service."""

    #: AS-01: ISO weekdays with service ("5+2": Monday-Friday), holidays excluded.
    service_weekdays: tuple[Annotated[int, Field(ge=1, le=7)], ...]
    min_daily_minutes: PosInt
    min_end_time_primary: dt.time
    min_end_time_junior: dt.time
    evening_study_latest_end_junior: dt.time
    #: AS-02: at least one personal-interest period every service day ("1+1").
    require_interest_period_daily: bool
    #: AS-03: external (institution) courses at most this share of a school's courses.
    max_external_share: Share
    #: AS-08: share of students served.
    served_share_target: Share
    #: AS-01: delayed care (延时托管) for students with special needs must be offered.
    delayed_care_required: bool
    #: AS-06: schools must run flexible leaving (弹性离校).
    flexible_leave_required: bool

    def min_end_time(self, band: GradeBand) -> dt.time:
        return self.min_end_time_junior if band == "junior" else self.min_end_time_primary


class SchoolDayPolicy(_Frozen):
    """School-day figures (morning start, sleep) used by services and reports."""

    earliest_class_start_primary: dt.time
    earliest_class_start_junior: dt.time
    min_sleep_hours_primary: PosInt
    min_sleep_hours_junior: PosInt

    def earliest_class_start(self, band: GradeBand) -> dt.time:
        return (
            self.earliest_class_start_junior
            if band == "junior"
            else self.earliest_class_start_primary
        )


class PriceByMode(_Frozen):
    offline: PosFen
    online: PosFen


class PriceGroup(_Frozen):
    """Base price per unit lesson (fen) by class-size band and mode.

    The TOML/JSON key of the middle band is ``10to35``.
    """

    subjects: tuple[str, ...] = ()
    lt10: PriceByMode
    b10to35: PriceByMode = Field(alias="10to35")
    gt35: PriceByMode

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Always emit the band key as written in TOML/JSON ("10to35"), so a
        # dump validates back (pydantic would otherwise use the field name).
        data = handler(self)
        if isinstance(data, dict) and "b10to35" in data:
            data = {("10to35" if k == "b10to35" else k): v for k, v in data.items()}
        return data

    def for_band(self, band: ClassSizeBand) -> PriceByMode:
        if band == "lt10":
            return self.lt10
        if band == "10to35":
            return self.b10to35
        return self.gt35


class GuidedPrice(_Frozen):
    """INST-06: government guided price (政府指导价) for subject-type training."""

    max_markup: Share
    #: Length of the unit lesson the base prices refer to.
    offline_unit_minutes: PosInt
    online_unit_minutes: PosInt
    default_group: str
    groups: Annotated[
        Mapping[str, PriceGroup],
        AfterValidator(_freeze_mapping),
        WrapSerializer(_serialize_mapping),
    ]

    @model_validator(mode="after")
    def _check(self) -> GuidedPrice:
        if self.default_group not in self.groups:
            raise ValueError(f"default_group {self.default_group!r} is not among the groups")
        owner: dict[str, str] = {}
        for name, group in self.groups.items():
            for subject in group.subjects:
                if subject in owner:
                    raise ValueError(
                        f"subject {subject!r} in both groups {owner[subject]!r} and {name!r}"
                    )
                owner[subject] = name
        return self

    def group_for(self, subject: str) -> str:
        """The price group listing ``subject``, else ``default_group``."""
        for name, group in self.groups.items():
            if subject in group.subjects:
                return name
        return self.default_group

    def unit_minutes(self, mode: LessonMode) -> int:
        return self.offline_unit_minutes if mode == "offline" else self.online_unit_minutes

    def base_price_fen(self, group: str, band: ClassSizeBand, mode: LessonMode) -> int:
        if group not in self.groups:
            raise KeyError(f"unknown price group {group!r}")
        price: int = getattr(self.groups[group].for_band(band), mode)
        return price

    def within_guide(
        self,
        price_fen: int,
        *,
        group: str,
        band: ClassSizeBand,
        mode: LessonMode,
        lesson_minutes: int | None = None,
    ) -> bool:
        """Exact check of a per-lesson price; ``lesson_minutes`` scales the base
        from the unit lesson (omit it for a lesson of the unit length)."""
        base = self.base_price_fen(group, band, mode)
        if lesson_minutes is None:
            return price_within_guide(price_fen, base, self.max_markup)
        return price_within_guide(
            price_fen,
            base,
            self.max_markup,
            lesson_minutes=lesson_minutes,
            unit_minutes=self.unit_minutes(mode),
        )


class CreditThresholds(_Frozen):
    """INST-04: credit level by score (0-100): A >= a, B >= b, C >= c, else D."""

    min_score_a: Annotated[int, Field(ge=0, le=100)]
    min_score_b: Annotated[int, Field(ge=0, le=100)]
    min_score_c: Annotated[int, Field(ge=0, le=100)]

    @model_validator(mode="after")
    def _ordered(self) -> CreditThresholds:
        if not self.min_score_a > self.min_score_b > self.min_score_c:
            raise ValueError(
                "credit thresholds must satisfy min_score_a > min_score_b > min_score_c"
            )
        return self

    def level(self, score: float | Decimal) -> CreditLevel:
        if score >= self.min_score_a:
            return "A"
        if score >= self.min_score_b:
            return "B"
        if score >= self.min_score_c:
            return "C"
        return "D"


class InstitutionsPolicy(_Frozen):
    """INST-*: off-campus training."""

    subject_offline_latest_end: dt.time
    subject_online_latest_end: dt.time
    online_lesson_max_minutes: PosInt
    online_min_break_minutes: NonNegInt
    online_min_age_years: NonNegInt
    #: INST-06: day kinds without subject-type training for compulsory students.
    subject_blocked_day_kinds: tuple[BlockedDayKind, ...]
    #: INST-07: a report must be resolved or dismissed within this many working days.
    complaint_deadline_working_days: PosInt
    credit: CreditThresholds
    guided_price: GuidedPrice

    def latest_end(self, mode: LessonMode) -> dt.time:
        return (
            self.subject_offline_latest_end if mode == "offline" else self.subject_online_latest_end
        )


class RiskAlerts(_Frozen):
    """FUND-08: risk monitoring thresholds."""

    window_days: PosInt
    refund_spike_count: PosInt
    refund_spike_ratio: Share
    complaint_spike_count: PosInt
    large_movement_fen: PosFen


class FundsPolicy(_Frozen):
    """FUND-*: prepaid-fee escrow."""

    max_charge_months: PosInt
    max_charge_lessons: PosInt
    max_charge_fen: PosFen
    #: Optional: no charge earlier than this many days before the course starts.
    earliest_charge_days_before_start: NonNegInt | None = None
    #: Optional: renewal only when at most this many lessons remain unconsumed.
    min_remaining_lessons_before_renewal: NonNegInt | None = None
    #: FUND-04: a delivered lesson is confirmed automatically after this many working days.
    auto_confirm_working_days: PosInt
    #: FUND-06: institution answers a refund request within ...
    refund_response_working_days: PosInt
    #: ... and the refund is paid within this many working days of the request.
    refund_deadline_working_days: PosInt
    #: FUND-05: reserve = max(ceil(share * outstanding), min).
    risk_reserve_share: Share
    risk_reserve_min_fen: Fen
    release_mode: ReleaseMode
    #: Shares of the price released per stage when ``release_mode = "staged"``; sum 1.
    release_stages: tuple[Annotated[Decimal, Field(gt=0, le=1)], ...] = ()
    train_first_pay_later_allowed: bool
    risk_alerts: RiskAlerts

    @model_validator(mode="after")
    def _check(self) -> FundsPolicy:
        if self.release_mode == "staged":
            if not self.release_stages:
                raise ValueError('release_mode "staged" needs release_stages')
            if sum(self.release_stages, Decimal(0)) != 1:
                raise ValueError(
                    f"release_stages must sum to exactly 1, got {sum(self.release_stages)}"
                )
        elif self.release_stages:
            raise ValueError('release_stages only apply to release_mode "staged"')
        if self.refund_deadline_working_days < self.refund_response_working_days:
            raise ValueError("refund_deadline_working_days is shorter than the response time")
        return self

    def risk_reserve_fen(self, outstanding_fen: int) -> int:
        """FUND-05: fen that must stay in escrow for ``outstanding_fen`` of liabilities."""
        if outstanding_fen < 0:
            raise ValueError("outstanding amount must be non-negative")
        by_share = math.ceil(Fraction(outstanding_fen) * Fraction(self.risk_reserve_share))
        return max(by_share, self.risk_reserve_min_fen)

    def stage_amounts_fen(self, total_fen: int) -> tuple[int, ...]:
        """Split ``total_fen`` over the release stages in whole fen (last stage
        takes the rounding remainder); ``(total_fen,)`` for per-lesson release."""
        if not self.release_stages:
            return (total_fen,)
        parts = [math.floor(Fraction(total_fen) * Fraction(s)) for s in self.release_stages[:-1]]
        return (*parts, total_fen - sum(parts))


class AmendmentRef(_Frozen):
    """An amendment applied to a resolved profile."""

    profile_id: str
    effective_from: dt.date
    source: str


class PolicyProfile(_Frozen):
    """A complete, resolved region profile (what rules receive)."""

    id: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")]
    name: Annotated[str, Field(min_length=1)]
    extends: str | None = None
    school_system: SchoolSystem
    effective_from: dt.date
    source: str = ""
    homework: HomeworkPolicy
    afterschool: AfterschoolPolicy
    school_day: SchoolDayPolicy
    institutions: InstitutionsPolicy
    funds: FundsPolicy
    #: Amendments (own and inherited) in force for the date asked, oldest first.
    applied_amendments: tuple[AmendmentRef, ...] = ()

    def grade_band(self, grade: int) -> GradeBand:
        return grade_band(grade, self.school_system)

    def homework_limit_minutes(self, grade: int, day_kind: DayKind = "school_day") -> int:
        """HW-02/HW-04: daily cap for a grade on a kind of day."""
        return self.homework.limit_minutes(self.grade_band(grade), day_kind)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

# Keys of a profile file that are the profile's own and never inherited.
_OWN_KEYS: Final = ("id", "name", "extends", "effective_from", "source")
_FILE_KEYS: Final = (frozenset(PolicyProfile.model_fields) - {"applied_amendments"}) | {
    "amendments"
}
_AMENDABLE_KEYS: Final = frozenset(PolicyProfile.model_fields) - {
    "applied_amendments",
    *_OWN_KEYS,
}


@dataclass(frozen=True)
class _RawAmendment:
    effective_from: dt.date
    source: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class _RawProfile:
    id: str
    path: Path
    extends: str | None
    values: dict[str, Any]  # everything but the amendments
    amendments: tuple[_RawAmendment, ...]


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def _as_model(annotation: Any) -> type[BaseModel] | None:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unknown_keys(model: type[BaseModel], data: Mapping[str, Any], path: str) -> list[str]:
    """Dotted paths of keys in ``data`` that ``model`` does not know (recursive)."""
    accepted = {(f.alias or name): name for name, f in model.model_fields.items()}
    problems: list[str] = []
    for key, value in data.items():
        if key not in accepted:
            problems.append(f"unknown key '{path}{key}' (allowed: {', '.join(sorted(accepted))})")
            continue
        if not isinstance(value, dict):
            continue
        annotation = _unwrap(model.model_fields[accepted[key]].annotation)
        sub = _as_model(annotation)
        if sub is not None:
            problems += _unknown_keys(sub, value, f"{path}{key}.")
        elif get_origin(annotation) in (dict, Mapping):
            item = _as_model(get_args(annotation)[1])
            if item is not None:
                for k2, v2 in value.items():
                    if isinstance(v2, dict):
                        problems += _unknown_keys(item, v2, f"{path}{key}.{k2}.")
    return problems


def _section_keys(data: Mapping[str, Any], allowed: frozenset[str], where: str) -> list[str]:
    problems: list[str] = []
    for key in data:
        if key not in allowed:
            problems.append(f"{where}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
    sections = {k: v for k, v in data.items() if k in allowed and k in PolicyProfile.model_fields}
    for msg in _unknown_keys(PolicyProfile, sections, ""):
        problems.append(f"{where}: {msg}")
    return problems


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge recursively; scalars and arrays replace. Inputs are not modified."""
    result = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _format_validation(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{loc}: {err['msg']}")
    return lines


def _parse_file(path: Path, problems: list[str]) -> _RawProfile | None:
    where = path.name
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        problems.append(f"{where}: cannot read TOML: {exc}")
        return None
    before = len(problems)
    problems += _section_keys(data, _FILE_KEYS, where)
    pid = data.get("id")
    if not isinstance(pid, str):
        problems.append(f"{where}: 'id' is required (a string equal to the file name)")
    elif pid != path.stem:
        problems.append(f"{where}: id '{pid}' does not match the file name '{path.stem}'")
    if not isinstance(data.get("name"), str) or not data.get("name"):
        problems.append(f"{where}: 'name' is required (zh-CN)")
    effective = data.get("effective_from")
    if not isinstance(effective, dt.date) or isinstance(effective, dt.datetime):
        problems.append(f"{where}: 'effective_from' is required (a TOML date, e.g. 2021-07-24)")
    extends = data.get("extends")
    if extends is not None and not isinstance(extends, str):
        problems.append(f"{where}: 'extends' must be a profile id string")

    amendments: list[_RawAmendment] = []
    raw_amendments = data.get("amendments", [])
    if not isinstance(raw_amendments, list):
        problems.append(f"{where}: 'amendments' must be an array of tables ([[amendments]])")
        raw_amendments = []
    seen_dates: set[dt.date] = set()
    for i, am in enumerate(raw_amendments):
        am_where = f"{where}: amendments[{i}]"
        if not isinstance(am, dict):
            problems.append(f"{am_where}: must be a table")
            continue
        allowed = _AMENDABLE_KEYS | {"effective_from", "source"}
        overrides = {k: v for k, v in am.items() if k not in ("effective_from", "source")}
        problems += _section_keys(am, allowed, am_where)
        am_date = am.get("effective_from")
        if not isinstance(am_date, dt.date) or isinstance(am_date, dt.datetime):
            problems.append(f"{am_where}: 'effective_from' is required (a TOML date)")
            continue
        if isinstance(effective, dt.date) and am_date < effective:
            problems.append(
                f"{am_where}: effective_from {am_date} is before the profile's {effective}"
            )
        if am_date in seen_dates:
            problems.append(f"{am_where}: two amendments dated {am_date}; merge them")
        seen_dates.add(am_date)
        if not overrides:
            problems.append(f"{am_where}: changes nothing")
        source = am.get("source", "")
        amendments.append(_RawAmendment(am_date, str(source), overrides))
    if len(problems) > before or not isinstance(pid, str):
        return None
    values = {k: v for k, v in data.items() if k != "amendments"}
    amendments.sort(key=lambda a: a.effective_from)
    return _RawProfile(pid, path, extends, values, tuple(amendments))


class PolicyRegistry:
    """All profiles of a directory, validated at load; resolves by region and date."""

    __slots__ = ("_directory", "_lineage", "_timelines")

    def __init__(
        self,
        directory: Path,
        timelines: Mapping[str, tuple[tuple[dt.date, ...], tuple[PolicyProfile, ...]]],
        lineage: Mapping[str, tuple[str, ...]],
    ) -> None:
        self._directory = directory
        self._timelines = types.MappingProxyType(dict(timelines))
        self._lineage = types.MappingProxyType(dict(lineage))

    @classmethod
    def load(cls, directory: Path | None = None) -> PolicyRegistry:
        """Load and validate every ``*.toml`` directly in ``directory``
        (default: this repository's ``policy/``). Raises ``PolicyError``."""
        directory = DEFAULT_POLICY_DIR if directory is None else Path(directory)
        if not directory.is_dir():
            raise PolicyError(f"policy directory {directory} does not exist")
        problems: list[str] = []
        raws: dict[str, _RawProfile] = {}
        paths = sorted(directory.glob("*.toml"))
        if not paths:
            raise PolicyError(f"no policy profiles (*.toml) in {directory}")
        for path in paths:
            raw = _parse_file(path, problems)
            if raw is not None:
                raws[raw.id] = raw

        lineage: dict[str, tuple[str, ...]] = {}
        for pid, raw in raws.items():
            chain = [pid]
            current = raw
            while current.extends is not None:
                parent = current.extends
                if parent in chain:
                    cycle = " -> ".join([*chain[chain.index(parent) :], parent])
                    problems.append(f"{raw.path.name}: cycle in 'extends': {cycle}")
                    break
                if parent not in raws:
                    if (directory / f"{parent}.toml").exists():
                        problems.append(
                            f"{raw.path.name}: parent '{parent}' (of '{current.id}') is invalid"
                        )
                    else:
                        problems.append(
                            f"{raw.path.name}: '{current.id}' extends '{parent}', which does not"
                            f" exist (known: {', '.join(sorted(raws))})"
                        )
                    break
                chain.append(parent)
                current = raws[parent]
            else:
                lineage[pid] = tuple(reversed(chain))  # root first

        timelines: dict[str, tuple[tuple[dt.date, ...], tuple[PolicyProfile, ...]]] = {}
        failed: set[str] = set()
        for pid in sorted(lineage, key=lambda p: (len(lineage[p]), p)):  # parents first
            broken_parent = next((p for p in lineage[pid][:-1] if p in failed), None)
            if broken_parent is not None:
                problems.append(f"{raws[pid].path.name}: parent '{broken_parent}' is invalid")
                failed.add(pid)
                continue
            layers = [raws[p] for p in lineage[pid]]
            dates = sorted({a.effective_from for layer in layers for a in layer.amendments})
            versions: list[PolicyProfile] = []
            ok = True
            for on in [None, *dates]:
                try:
                    versions.append(_resolve(layers, on))
                except ValidationError as exc:
                    when = "base" if on is None else f"as of {on}"
                    files = " + ".join(layer.path.name for layer in layers)
                    for line in _format_validation(exc):
                        problems.append(f"{raws[pid].path.name} ({when}; from {files}): {line}")
                    ok = False
                    break
            if ok:
                timelines[pid] = (tuple(dates), tuple(versions))
            else:
                failed.add(pid)

        if problems:
            raise PolicyError(
                f"invalid policy profiles in {directory}:\n"
                + "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
            )
        return cls(directory, timelines, lineage)

    @property
    def directory(self) -> Path:
        return self._directory

    def ids(self) -> tuple[str, ...]:
        """Every region id (incl. ``national``), sorted."""
        return tuple(sorted(self._timelines))

    def __contains__(self, region_id: object) -> bool:
        return region_id in self._timelines

    def lineage(self, region_id: str) -> tuple[str, ...]:
        """Ids from the root to ``region_id``, e.g. ``("national", "jinhua")``."""
        self._timeline(region_id)
        return self._lineage[region_id]

    def amendment_dates(self, region_id: str) -> tuple[dt.date, ...]:
        """Dates on which the resolved profile changes (own and inherited amendments)."""
        return self._timeline(region_id)[0]

    def profile(self, region_id: str, on: dt.date | None = None) -> PolicyProfile:
        """The profile of ``region_id`` with the amendments in force on ``on``
        (default: today)."""
        dates, versions = self._timeline(region_id)
        day = dt.date.today() if on is None else on
        return versions[bisect.bisect_right(dates, day)]

    def _timeline(self, region_id: str) -> tuple[tuple[dt.date, ...], tuple[PolicyProfile, ...]]:
        try:
            return self._timelines[region_id]
        except KeyError:
            raise UnknownRegionError(
                f"unknown region {region_id!r}; known: {', '.join(self.ids())}"
            ) from None


def _resolve(layers: Sequence[_RawProfile], on: dt.date | None) -> PolicyProfile:
    data: dict[str, Any] = {}
    applied: list[AmendmentRef] = []
    for layer in layers:
        data = _deep_merge(data, layer.values)
        for am in layer.amendments:
            if on is not None and am.effective_from <= on:
                data = _deep_merge(data, am.overrides)
                applied.append(
                    AmendmentRef(
                        profile_id=layer.id, effective_from=am.effective_from, source=am.source
                    )
                )
    leaf = layers[-1]
    for key in _OWN_KEYS:
        data.pop(key, None)
        if key in leaf.values:
            data[key] = leaf.values[key]
    applied.sort(key=lambda a: a.effective_from)
    data["applied_amendments"] = applied
    return PolicyProfile.model_validate(data)
