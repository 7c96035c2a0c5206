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
