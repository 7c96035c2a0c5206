"""HW-01/HW-07 publicity without login, HW-08 oversight for bureau and school."""

from __future__ import annotations

import csv
import datetime as D
import io

import pytest

from chassis.calendar import Calendar
from services.homework import rules
from tests.homework.conftest import World

pytestmark = pytest.mark.asyncio

MONDAY = D.date(2150, 3, 9)


def school_days(start: D.date, n: int) -> list[D.date]:
    cal, days, d = Calendar(), [], start
    while len(days) < n:
        if rules.is_homework_school_day(cal, d):
            days.append(d)
        d += D.timedelta(days=1)
    return days


async def test_hw01_public_daily_list_without_login_and_without_student_names(world: World):
    await world.publish("C1", world.teacher("TM"), date=MONDAY, estimated_minutes=25)
    await world.publish(
        "C1",
        world.teacher("TM"),
        date=MONDAY,
        layer="personalized",
        target_student_ids=["P1", "P2"],
        content="错题订正",
    )
    gone = await world.publish("C2", world.teacher("TX"), date=MONDAY, content="已撤回")
    await world.client.post(
        f"/assignments/{gone.json()['assignment']['id']}/withdraw",
        json={"reason": "重复"},
        headers=world.teacher("TX"),
    )
    r = await world.client.get(
        "/public/schools/S1/assignments", params={"date": MONDAY.isoformat()}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["school_name"] == "S1学校" and body["no_written_homework"] is None
    assert [c["class_id"] for c in body["classes"]] == ["C1"]
    c1 = body["classes"][0]
    assert (c1["limit"], c1["used"], c1["grade"]) == (60, 25, 4)
    assert [a["teacher_name"] for a in c1["assignments"]] == ["TM老师", "TM老师"]
    assert sorted(a["personalized_students"] for a in c1["assignments"]) == [0, 2]
    text = r.text
    for private in ("P1", "P2", "学生", "target_student_ids"):
        assert private not in text
    assert (
        await world.client.get("/public/schools/NOPE/assignments", params={"date": "2150-03-09"})
    ).status_code == 404
    missing_date = await world.client.get("/public/schools/S1/assignments")
    assert missing_date.status_code == 422


async def test_hw07_weekly_summary_per_grade_and_subject_with_trend(world: World):
    last_week = MONDAY - D.timedelta(days=7)
    await world.publish("C1", world.teacher("TM"), date=last_week, estimated_minutes=20)
    await world.publish("C1", world.teacher("TM"), date=MONDAY, estimated_minutes=20)
    await world.publish(
        "C1", world.teacher("TM"), date=MONDAY + D.timedelta(days=2), estimated_minutes=30
    )
    await world.publish(
        "C2", world.teacher("TX"), date=MONDAY + D.timedelta(days=4), estimated_minutes=10
    )
    await world.publish(
        "C1", world.teacher("TE"), date=last_week, subject="english", estimated_minutes=15
    )
    r = await world.client.get(
        "/public/schools/S1/weekly-summary",
        params={"week_of": (MONDAY + D.timedelta(days=3)).isoformat()},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["week_start"], body["week_end"], body["school_days"]) == (
        "2150-03-09",
        "2150-03-15",
        5,
    )
    rows = {(row["grade"], row["subject"]): row for row in body["rows"]}
    math = rows[(4, "math")]
    assert (math["assignments"], math["total_minutes"], math["classes"]) == (3, 60, 2)
    assert math["avg_daily_minutes"] == 6.0  # 60 minutes / 2 classes / 5 school days
    assert (math["last_week_total_minutes"], math["direction"], math["change_percent"]) == (
        20,
        "up",
        200.0,
    )
    english = rows[(4, "english")]
    assert (english["assignments"], english["total_minutes"], english["direction"]) == (
        0,
        0,
        "down",
    )
    assert (await world.client.get("/public/schools/NOPE/weekly-summary")).status_code == 404


async def seed_oversight(world: World, fixed_today) -> list[D.date]:
    days = school_days(D.date(2150, 3, 2), 10)
    fixed_today(D.date(2150, 3, 31))
    ids = []
    for i, day in enumerate(days):
        r = await world.publish("C1", world.teacher("TM"), date=day, estimated_minutes=10 + 5 * i)
        ids.append(r.json()["assignment"]["id"])
    await world.publish("C2", world.teacher("TX"), date=days[0], estimated_minutes=60)
    await world.publish("C2", world.teacher("TX"), expect=422, date=days[0], estimated_minutes=5)
    await world.publish("C1", world.teacher("TM"), expect=422, flags={"punitive": True})
    for i, aid in enumerate(ids):
        r = await world.client.put(
            f"/assignments/{aid}/reports/P1",
            json={"minutes": 2 * (10 + 5 * i)},
            headers=world.parent("G1"),
        )
        assert r.status_code == 200, r.text
    return days


async def test_hw08_bureau_oversight_per_school(world: World, fixed_today):
    await world.roster.region("weihai-huancui")
    await world.roster.school("S2", "weihai-huancui", "5-4", "junior")
    await seed_oversight(world, fixed_today)
    params = {"from": "2150-03-01", "to": "2150-03-31"}
    r = await world.client.get("/oversight/schools", params=params, headers=world.bureau())
    assert r.status_code == 200, r.text
    schools = r.json()["schools"]
    assert [s["school_id"] for s in schools] == ["S1"]  # not the other region's school
    s1 = schools[0]
    assert (s1["published"], s1["refused"]) == (11, 2)
    assert s1["compliance_rate"] == round(11 / 13, 4)
    assert s1["refusals_by_rule"] == {"HW-02": 1, "HW-05": 1}
    [grade4] = s1["grades"]
    assert grade4["grade"] == 4
    # Estimated: C1's ten class-days 10..55 and C2's 60.
    assert grade4["estimated"] == {"class_days": 11, "avg": 35.0, "p90": 55.0}
    # Reported: C1's ten class-days at twice the estimate.
    assert grade4["reported"] == {"class_days": 10, "avg": 65.0, "p90": 100.0}
    alerts = await world.client.get("/oversight/alerts", headers=world.bureau())
    assert s1["alerts_open"] == sum(a["status"] == "open" for a in alerts.json())
    assert s1["alerts_closed"] == sum(a["status"] == "closed" for a in alerts.json())

    gaps = await world.client.get("/oversight/estimate-gaps", params=params, headers=world.bureau())
    assert gaps.status_code == 200
    assert [(g["teacher_id"], g["reports"], g["ratio"], g["flagged"]) for g in gaps.json()] == [
        ("TM", 10, 2.0, True)
    ]
    assert gaps.json()[0]["teacher_name"] == "TM老师"

    exported = await world.client.get(
        "/oversight/schools.csv", params=params, headers=world.bureau()
    )
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text.lstrip("\ufeff"))))
    assert len(rows) == 1
    assert rows[0]["school_id"] == "S1" and rows[0]["grade"] == "4"
    assert rows[0]["refused_hw02"] == "1" and rows[0]["estimated_p90_minutes"] == "55.0"
    assert rows[0]["reported_avg_minutes"] == "65.0"


async def test_hw08_scope_school_admin_own_school_others_404(world: World, fixed_today):
    await world.roster.region("weihai-huancui")
    await world.roster.school("S2", "weihai-huancui", "5-4", "junior")
    await seed_oversight(world, fixed_today)
    params = {"from": "2150-03-01", "to": "2150-03-31"}
    own = await world.client.get("/oversight/schools", params=params, headers=world.school_admin())
    assert [s["school_id"] for s in own.json()["schools"]] == ["S1"]
    other = await world.client.get(
        "/oversight/schools", params={**params, "school_id": "S2"}, headers=world.school_admin()
    )
    assert other.status_code == 404
    foreign_region = await world.client.get(
        "/oversight/schools",
        params={**params, "region_id": "jinhua"},
        headers=world.bureau("weihai-huancui"),
    )
    assert foreign_region.status_code == 404
    huancui = await world.client.get(
        "/oversight/schools", params=params, headers=world.bureau("weihai-huancui")
    )
    assert [s["school_id"] for s in huancui.json()["schools"]] == ["S2"]
    assert huancui.json()["schools"][0]["compliance_rate"] is None
    for headers in (world.teacher("TM"), world.parent("G1")):
        assert (await world.client.get("/oversight/schools", headers=headers)).status_code == 403
    assert (await world.client.get("/oversight/schools")).status_code == 401
    bad = await world.client.get(
        "/oversight/schools",
        params={"from": "2150-03-31", "to": "2150-03-01"},
        headers=world.bureau(),
    )
    assert bad.status_code == 422 and bad.headers["content-type"].startswith(
        "application/problem+json"
    )


async def open_alert_as_of(world: World, day: D.date) -> str | None:
    """Evaluate C1's burden with its window ending ``day`` (the seeded days)."""
    from services.homework import service as hw_service

    async with world.svc.ctx.db.transaction() as session:
        facts = await hw_service.class_facts(session, "C1")
        assert facts is not None
        return await hw_service.evaluate_burden(session, world.svc.ctx, facts, day)


def parse_csv(response) -> list[dict[str, str]]:
    """An HW-08 export: UTF-8 with BOM, text/csv, an attachment with a .csv name."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="homework-')
    assert disposition.endswith('.csv"')
    assert response.content.startswith(b"\xef\xbb\xbf")
    text = response.content.decode("utf-8")
    # no student is ever named or identified in an export.
    for minor in ("P1", "P2", "Q1", "学生"):
        assert minor not in text
    return list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"))))


async def test_hw08_every_oversight_view_exports_as_csv(world: World, fixed_today):
    """Compliance per school, refusals by rule, daily minutes by grade
    (estimated and reported), open and closed alerts, teachers whose estimates
    run far below the reports, acknowledged warnings: each as CSV."""
    days = await seed_oversight(world, fixed_today)
    warned = await world.publish(
        "C1",
        world.teacher("TM"),
        date=days[0],
        kind="reading",
        content="=朗读课文，请家长签字检查",
        acknowledged_warnings=["家长签字检查", "家长签字"],
    )
    # As of the last seeded day, 7 heavy reported days: open.
    assert await open_alert_as_of(world, days[-1]) == "open"
    params = {"from": "2150-03-01", "to": "2150-03-31"}
    bureau = world.bureau()
    get = world.client.get

    [school] = parse_csv(await get("/oversight/schools.csv", params=params, headers=bureau))
    assert (school["school_id"], school["school_name"], school["published"]) == (
        "S1",
        "S1学校",
        "12",
    )
    assert (school["refused"], school["refused_hw02"], school["refused_hw05"]) == ("2", "1", "1")
    assert school["compliance_rate"] == str(round(12 / 14, 4))
    assert (school["alerts_open"], school["alerts_closed"]) == ("1", "0")

    refusals = parse_csv(await get("/oversight/refusals.csv", params=params, headers=bureau))
    assert [(r["school_id"], r["rule"], r["refused"]) for r in refusals] == [
        ("S1", "HW-02", "1"),
        ("S1", "HW-05", "1"),
    ]

    [grade4] = parse_csv(await get("/oversight/grades.csv", params=params, headers=bureau))
    assert grade4["grade"] == "4"
    assert (grade4["estimated_avg_minutes"], grade4["estimated_p90_minutes"]) == ("35.0", "55.0")
    assert (grade4["reported_avg_minutes"], grade4["reported_p90_minutes"]) == ("65.0", "100.0")
    assert grade4["reported_class_days"] == "10"

    [alert] = parse_csv(await get("/oversight/alerts.csv", headers=bureau))
    assert (alert["status"], alert["class_id"], alert["limit_minutes"]) == ("open", "C1", "60")
    assert alert["open_median_minutes"] == "80.0" and alert["closed_at"] == ""
    assert (
        parse_csv(await get("/oversight/alerts.csv", params={"status": "closed"}, headers=bureau))
        == []
    )

    [gap] = parse_csv(await get("/oversight/estimate-gaps.csv", params=params, headers=bureau))
    assert (gap["teacher_id"], gap["teacher_name"], gap["ratio"], gap["flagged"]) == (
        "TM",
        "TM老师",
        "2.0",
        "1",
    )

    [warning] = parse_csv(
        await get("/oversight/acknowledged-warnings.csv", params=params, headers=bureau)
    )
    assert warning["assignment_id"] == warned.json()["assignment"]["id"]
    assert warning["acknowledged_warnings"] == "家长签字检查；家长签字"
    # A teacher's text that a spreadsheet would run as a formula is neutralized.
    assert warning["content"] == "'=朗读课文，请家长签字检查"


CSV_PATHS = (
    "/oversight/schools.csv",
    "/oversight/refusals.csv",
    "/oversight/grades.csv",
    "/oversight/alerts.csv",
    "/oversight/estimate-gaps.csv",
    "/oversight/acknowledged-warnings.csv",
)


@pytest.mark.parametrize("path", CSV_PATHS)
async def test_hw08_csv_exports_have_the_json_views_scope(world: World, fixed_today, path: str):
    """Bureau: its region only; school admin: its own school only (another
    school 404); teachers and parents 403; no token 401; bad range 422."""
    await world.roster.region("weihai-huancui")
    await world.roster.school("S2", "weihai-huancui", "5-4", "junior")
    days = await seed_oversight(world, fixed_today)
    await world.publish(
        "C1",
        world.teacher("TM"),
        date=days[0],
        kind="reading",
        content="请家长检查朗读",
        acknowledged_warnings=["家长检查"],
    )
    assert await open_alert_as_of(world, days[-1]) == "open"
    params = {"from": "2150-03-01", "to": "2150-03-31"}
    get = world.client.get

    mine = parse_csv(await get(path, params=params, headers=world.bureau()))
    assert mine and {row["school_id"] for row in mine} == {"S1"}
    own = parse_csv(await get(path, params=params, headers=world.school_admin()))
    assert own == mine
    other_region = parse_csv(await get(path, params=params, headers=world.bureau("weihai-huancui")))
    assert all(row["school_id"] == "S2" for row in other_region)
    other_school = await get(
        path, params={**params, "school_id": "S2"}, headers=world.school_admin()
    )
    assert other_school.status_code == 404
    for headers in (world.teacher("TM"), world.parent("G1")):
        assert (await get(path, params=params, headers=headers)).status_code == 403
    assert (await get(path, params=params)).status_code == 401
    if path != "/oversight/alerts.csv":
        bad = await get(
            path, params={"from": "2150-03-31", "to": "2150-03-01"}, headers=world.bureau()
        )
        assert bad.status_code == 422
        assert bad.headers["content-type"].startswith("application/problem+json")
