"""HW-08 CSV exports: the oversight views as spreadsheet rows (pure shaping).

Every export is built from the same use case as its JSON view, so it has the
same scope (the bureau's regions, a school admin's own school). No export
carries a student's id or name (X-06): the rows are schools, grades, classes,
teachers, rules and alerts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from services.homework import schemas

RULES: Final = ("HW-02", "HW-03", "HW-04", "HW-05")


def _stats(s: schemas.MinutesStats) -> list[Any]:
    return [s.class_days, s.avg, s.p90]


def _school(s: schemas.SchoolOversight) -> list[Any]:
    return [s.school_id, s.school_name, s.region_id]


# ------------------------------------------------------------ compliance per school

SCHOOLS_COLUMNS: Final = (
    "school_id",
    "school_name",
    "region_id",
    "published",
    "refused",
    "compliance_rate",
    "refused_hw02",
    "refused_hw03",
    "refused_hw04",
    "refused_hw05",
    "alerts_open",
    "alerts_closed",
    "grade",
    "estimated_class_days",
    "estimated_avg_minutes",
    "estimated_p90_minutes",
    "reported_class_days",
    "reported_avg_minutes",
    "reported_p90_minutes",
)


def schools_rows(report: schemas.OversightReport) -> list[list[Any]]:
    """One row per school and grade (a school without homework: one row, no grade)."""
    rows: list[list[Any]] = []
    for s in report.schools:
        head = [
            *_school(s),
            s.published,
            s.refused,
            s.compliance_rate,
            *(s.refusals_by_rule.get(rule, 0) for rule in RULES),
            s.alerts_open,
            s.alerts_closed,
        ]
        if not s.grades:
            rows.append([*head, None, None, None, None, None, None, None])
        for g in s.grades:
            rows.append([*head, g.grade, *_stats(g.estimated), *_stats(g.reported)])
    return rows


# ------------------------------------------------------------ refused attempts by rule

REFUSALS_COLUMNS: Final = ("school_id", "school_name", "region_id", "rule", "refused")


def refusals_rows(report: schemas.OversightReport) -> list[list[Any]]:
    """One row per school and rule that refused at least once."""
    return [
        [*_school(s), rule, count]
        for s in report.schools
        for rule, count in sorted(s.refusals_by_rule.items())
    ]


# ------------------------------------------------------------ daily minutes by grade

GRADES_COLUMNS: Final = (
    "school_id",
    "school_name",
    "region_id",
    "grade",
    "estimated_class_days",
    "estimated_avg_minutes",
    "estimated_p90_minutes",
    "reported_class_days",
    "reported_avg_minutes",
    "reported_p90_minutes",
)


def grades_rows(report: schemas.OversightReport) -> list[list[Any]]:
    """Average and 90th-percentile daily minutes per school and grade."""
    return [
        [*_school(s), g.grade, *_stats(g.estimated), *_stats(g.reported)]
        for s in report.schools
        for g in s.grades
    ]


# ------------------------------------------------------------ burden alerts

ALERTS_COLUMNS: Final = (
    "alert_id",
    "status",
    "region_id",
    "school_id",
    "class_id",
    "grade",
    "limit_minutes",
    "opened_at",
    "open_median_minutes",
    "open_window_start",
    "open_window_end",
    "closed_at",
    "close_median_minutes",
    "close_window_start",
    "close_window_end",
)


def alerts_rows(alerts: Iterable[schemas.AlertOut]) -> list[list[Any]]:
    return [
        [
            a.id,
            a.status,
            a.region_id,
            a.school_id,
            a.class_id,
            a.grade,
            a.limit_minutes,
            a.opened_at.isoformat(),
            a.open_median_minutes,
            a.open_window_start,
            a.open_window_end,
            a.closed_at.isoformat() if a.closed_at else None,
            a.close_median_minutes,
            a.close_window_start,
            a.close_window_end,
        ]
        for a in alerts
    ]


# ------------------------------------------------------------ estimates far below reports

GAPS_COLUMNS: Final = (
    "school_id",
    "teacher_id",
    "teacher_name",
    "reports",
    "estimated_minutes_total",
    "actual_minutes_total",
    "ratio",
    "threshold",
    "flagged",
)


def gaps_rows(gaps: Iterable[schemas.EstimateGapOut]) -> list[list[Any]]:
    return [
        [
            g.school_id,
            g.teacher_id,
            g.teacher_name,
            g.reports,
            g.estimated_minutes_total,
            g.actual_minutes_total,
            g.ratio,
            g.threshold,
            g.flagged,
        ]
        for g in gaps
    ]


# ------------------------------------------------------------ acknowledged warnings (HW-05)

WARNINGS_COLUMNS: Final = (
    "assignment_id",
    "school_id",
    "class_id",
    "date",
    "subject",
    "teacher_id",
    "status",
    "acknowledged_warnings",
    "content",
)


def warnings_rows(items: Iterable[schemas.WarningOut]) -> list[list[Any]]:
    return [
        [
            w.assignment_id,
            w.school_id,
            w.class_id,
            w.date,
            w.subject,
            w.teacher_id,
            w.status,
            w.acknowledged_warnings,
            w.content,
        ]
        for w in items
    ]
