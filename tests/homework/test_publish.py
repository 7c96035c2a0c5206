"""Publishing through the HTTP API: HW-01..HW-05, authorization (GW-03), X-03."""

from __future__ import annotations

import datetime as D
import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from chassis.calendar import festival_date
from chassis.messaging import outbox_table
from chassis.policy import PolicyRegistry
from services.homework.models import Assignment, AssignmentRevision, ClassDayUsage, Refusal
from tests.homework.conftest import SCHOOL_DAY, World

pytestmark = pytest.mark.asyncio
PROBLEM = "application/problem+json"


async def count(world: World, model) -> int:
    async with world.svc.ctx.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(model)))


async def refusals(world: World) -> list[Refusal]:
    async with world.svc.ctx.db.read() as session:
        return list(await session.scalars(select(Refusal).order_by(Refusal.id)))


async def outbox(world: World) -> list[dict]:
    async with world.svc.ctx.db.read() as session:
        # In emission order: PostgreSQL returns rows in physical order, which
        # changes when the relay marks them published.
        query = select(outbox_table.c.payload).order_by(outbox_table.c.position)
        rows = (await session.execute(query)).scalars().all()
    return [json.loads(r) for r in rows]


# ---------------------------------------------------------------- HW-01


async def test_hw01_publish_states_used_and_remaining_and_emits_public_facts(world: World):
    r = await world.publish("C1", world.teacher("TM"), estimated_minutes=25)
    body = r.json()
    a = body["assignment"]
    assert a["class_id"] == "C1" and a["teacher_id"] == "TM" and a["counts_toward_limit"]
    assert a["status"] == "published" and a["version"] == 1
    assert body["usage"] == {
        "class_id": "C1",
        "date": SCHOOL_DAY.isoformat(),
        "day_kind": "school_day",
        "rule": "HW-02",
        "limit": 60,
        "used": 25,
        "remaining": 35,
        "no_written_homework": None,
        "subjects": {"math": 25},
        "quotas": {},
    }
    r2 = await world.publish("C1", world.teacher("TE"), subject="english", estimated_minutes=10)
    assert (r2.json()["usage"]["used"], r2.json()["usage"]["remaining"]) == (35, 25)

    events = [e for e in await outbox(world) if e["type"] == "homework.assignment.published.v1"]
    assert len(events) == 2
    data = events[0]["data"]
    assert set(data) == {
        "id",
        "school_id",
        "class_id",
        "grade",
        "date",
        "subject",
        "kind",
        "layer",
        "location",
        "estimated_minutes",
    }
    assert data["school_id"] == "S1" and data["estimated_minutes"] == 25


async def test_hw01_edits_and_withdrawals_keep_history(world: World):
    a = (await world.publish("C1", world.teacher("TM"), estimated_minutes=30)).json()["assignment"]
    edited = await world.client.patch(
        f"/assignments/{a['id']}",
        json={"estimated_minutes": 40, "content": "练习册第13页", "reason": "增加一题"},
        headers=world.teacher("TM"),
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["assignment"]["version"] == 2
    assert edited.json()["usage"]["used"] == 40
    withdrawn = await world.client.post(
        f"/assignments/{a['id']}/withdraw",
        json={"reason": "改为课堂练习"},
        headers=world.teacher("TM"),
    )
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["assignment"]["status"] == "withdrawn"
    assert withdrawn.json()["usage"]["used"] == 0
    history = await world.client.get(
        f"/assignments/{a['id']}/history", headers=world.teacher("HT", head=True)
    )
    assert history.status_code == 200
    steps = history.json()
    assert [s["action"] for s in steps] == ["published", "edited", "withdrawn"]
    assert steps[0]["snapshot"]["estimated_minutes"] == 30
    assert steps[1]["snapshot"]["content"] == "练习册第13页" and steps[1]["reason"] == "增加一题"
    assert steps[2]["reason"] == "改为课堂练习"
    # A withdrawn assignment can be neither edited nor withdrawn again.
    again = await world.client.post(
        f"/assignments/{a['id']}/withdraw", json={"reason": "x"}, headers=world.teacher("TM")
    )
    assert again.status_code == 404
    types = [e["type"] for e in await outbox(world)]
    assert types.count("homework.assignment.revised.v1") == 1
    assert types.count("homework.assignment.withdrawn.v1") == 1


async def test_hw01_families_see_their_class_list_only(world: World):
    await world.publish("C1", world.teacher("TM"))
    await world.publish("C2", world.teacher("TX"))
    mine = await world.client.get(
        "/classes/C1/assignments",
        params={"date": SCHOOL_DAY.isoformat()},
        headers=world.parent("G1"),
    )
    assert mine.status_code == 200 and len(mine.json()) == 1
    other = await world.client.get(
        "/classes/C2/assignments",
        params={"date": SCHOOL_DAY.isoformat()},
        headers=world.parent("G1"),
    )
    assert other.status_code == 404
    classes = await world.client.get("/me/classes", headers=world.parent("G1"))
    assert [c["class_id"] for c in classes.json()] == ["C1"]
    assert classes.json()[0]["student_ids"] == ["P1"]
    student = await world.client.get(
        "/classes/C1/assignments",
        params={"date": SCHOOL_DAY.isoformat()},
        headers=world.student("P2"),
    )
    assert student.status_code == 200 and len(student.json()) == 1


async def test_hw01_personalized_targets_are_hidden_from_other_families(world: World):
    await world.publish(
        "C1",
        world.teacher("TM"),
        layer="personalized",
        target_student_ids=["P1"],
        content="错题订正",
    )
    p1 = await world.client.get(
        "/classes/C1/assignments",
        params={"date": SCHOOL_DAY.isoformat()},
        headers=world.parent("G1"),
    )
    assert [a["target_student_ids"] for a in p1.json()] == [["P1"]]
    p2 = await world.client.get(
        "/classes/C1/assignments",
        params={"date": SCHOOL_DAY.isoformat()},
        headers=world.parent("G2"),
    )
    assert p2.json() == []
    # Targets must be students of the class.
    bad = await world.publish(
        "C1", world.teacher("TM"), expect=422, layer="personalized", target_student_ids=["Q1"]
    )
    assert bad.json()["errors"][0]["field"] == "body.target_student_ids"


# ---------------------------------------------------------------- HW-02


async def test_hw02_over_the_daily_limit_is_refused_with_limit_and_used(world: World):
    await world.publish("C1", world.teacher("TM"), estimated_minutes=45)
    r = await world.publish(
        "C1", world.teacher("TE"), expect=422, subject="english", estimated_minutes=20
    )
    assert r.headers["content-type"].startswith(PROBLEM)
    p = r.json()
    assert (p["rule"], p["limit"], p["used"], p["remaining"]) == ("HW-02", 60, 45, 15)
    assert p["requested_minutes"] == 20 and "60" in p["detail"]
    # Nothing half-written: one assignment, usage unchanged; the refusal is recorded.
    assert await count(world, Assignment) == 1
    async with world.svc.ctx.db.read() as session:
        usage = await session.get(ClassDayUsage, ("C1", SCHOOL_DAY))
    assert usage.used == 45
    recorded = await refusals(world)
    assert [(x.rule, x.limit_minutes, x.used_minutes, x.teacher_id) for x in recorded] == [
        ("HW-02", 60, 45, "TE")
    ]
    # Exactly up to the limit is fine.
    ok = await world.publish("C1", world.teacher("TE"), subject="english", estimated_minutes=15)
    assert ok.json()["usage"]["remaining"] == 0


async def test_hw02_grade6_is_junior_high_in_a_5_4_school(world: World):
    """环翠 (5-4): grade 6 is junior high, 90 minutes; in a 6-3 school grade 6
    is still primary, 60 minutes (the grade band follows the school's system)."""
    await world.roster.region("weihai-huancui")
    await world.roster.school("W1", "weihai-huancui", "5-4", "nine_year")
    await world.roster.teacher("TW", "W1")
    await world.roster.klass("W6", "W1", 6, None, [("TW", "math")])
    await world.roster.teacher("TS", "S1")
    await world.roster.klass("S6", "S1", 6, None, [("TS", "math")])
    junior = await world.publish("W6", world.teacher("TW", school="W1"), estimated_minutes=80)
    usage = junior.json()["usage"]
    assert (usage["rule"], usage["limit"], usage["used"], usage["remaining"]) == (
        "HW-02",
        90,
        80,
        10,
    )
    over = await world.publish(
        "W6", world.teacher("TW", school="W1"), expect=422, estimated_minutes=15
    )
    assert (over.json()["rule"], over.json()["limit"], over.json()["used"]) == ("HW-02", 90, 80)
    primary = await world.publish("S6", world.teacher("TS"), expect=422, estimated_minutes=80)
    assert (primary.json()["rule"], primary.json()["limit"], primary.json()["used"]) == (
        "HW-02",
        60,
        0,
    )
    await world.publish("S6", world.teacher("TS"), estimated_minutes=60)


async def test_hw02_huancui_evening_study_keeps_written_homework_at_school(world: World):
    """环翠 (004 §二.2): the school admin records the weekdays a junior class
    attends evening self-study; on those school days written homework cannot
    be given home (HW-02, limit 0) but can be done in the self-study."""
    await world.roster.region("weihai-huancui")
    await world.roster.school("W1", "weihai-huancui", "5-4", "nine_year")
    await world.roster.teacher("TW", "W1")
    await world.roster.klass("W7", "W1", 7, None, [("TW", "math")])
    await world.roster.klass("W5", "W1", 5, None, [("TW", "math")])
    admin = world.school_admin("W1")
    url = "/classes/W7/evening-study"
    r = await world.client.put(url, json={"weekdays": [2, 4]}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "class_id": "W7",
        "weekdays": [2, 4],
        "written_homework_stays_at_school": True,
    }
    teacher = world.teacher("TW", school="W1")
    # SCHOOL_DAY is a Tuesday.
    home = await world.publish("W7", teacher, expect=422, estimated_minutes=30)
    assert (home.json()["rule"], home.json()["limit"]) == ("HW-02", 0)
    assert "晚自习" in home.json()["detail"]
    extended = await world.publish("W7", teacher, expect=422, layer="extended")
    assert extended.json()["rule"] == "HW-02"
    at_school = await world.publish("W7", teacher, location="in_school", estimated_minutes=40)
    assert at_school.json()["usage"]["limit"] == 0
    # Wednesday: no self-study, the junior limit.
    wednesday = SCHOOL_DAY + D.timedelta(days=1)
    ok = await world.publish("W7", teacher, date=wednesday, estimated_minutes=80)
    assert (ok.json()["usage"]["limit"], ok.json()["usage"]["used"]) == (90, 80)
    usage = await world.client.get(
        "/classes/W7/usage", params={"date": SCHOOL_DAY.isoformat()}, headers=teacher
    )
    assert usage.json()["no_written_homework"] and usage.json()["limit"] == 0
    # The public list shows the class's 0 limit, but the day is not school-wide.
    public = await world.client.get(
        "/public/schools/W1/assignments", params={"date": SCHOOL_DAY.isoformat()}
    )
    assert public.json()["no_written_homework"] is None
    assert public.json()["classes"][0]["limit"] == 0
    # Grade 5 is primary in a 5-4 school: no evening self-study.
    primary = await world.client.put(
        "/classes/W5/evening-study", json={"weekdays": [1]}, headers=admin
    )
    assert primary.status_code == 422 and primary.json()["errors"]
    # Only the school's admin sets it; other schools' admins and teachers see 404.
    for headers in (world.school_admin("S1"), teacher):
        denied = await world.client.put(url, json={"weekdays": [1]}, headers=headers)
        assert denied.status_code == 404
    bad = await world.client.put(url, json={"weekdays": [0, 8]}, headers=admin)
    assert bad.status_code == 422
    # Removing it lifts the restriction.
    cleared = await world.client.put(url, json={"weekdays": []}, headers=admin)
    assert cleared.json()["written_homework_stays_at_school"] is False
    await world.publish("W7", teacher, estimated_minutes=30)
    # In jinhua (national rule) the same record does not restrict homework.
    await world.roster.teacher("TJ", "S1")
    await world.roster.klass("J8", "S1", 8, None, [("TJ", "math")])
    r = await world.client.put(
        "/classes/J8/evening-study", json={"weekdays": [2]}, headers=world.school_admin()
    )
    assert r.json()["written_homework_stays_at_school"] is False
    await world.publish("J8", world.teacher("TJ"), estimated_minutes=30)


async def test_hw02_optional_reading_and_in_school_work_do_not_count(world: World):
    await world.publish("C1", world.teacher("TM"), estimated_minutes=60)
    for fields in (
        {"layer": "extended"},
        {"kind": "reading"},
        {"location": "in_school"},
        {"layer": "personalized", "target_student_ids": ["P2"]},
    ):
        r = await world.publish("C1", world.teacher("TM"), estimated_minutes=30, **fields)
        assert r.json()["usage"]["used"] == 60
        assert not r.json()["assignment"]["counts_toward_limit"]


async def test_hw02_edit_past_the_limit_is_refused_and_nothing_changes(world: World):
    a = (await world.publish("C1", world.teacher("TM"), estimated_minutes=30)).json()["assignment"]
    await world.publish("C1", world.teacher("TE"), subject="english", estimated_minutes=20)
    r = await world.client.patch(
        f"/assignments/{a['id']}", json={"estimated_minutes": 45}, headers=world.teacher("TM")
    )
    assert r.status_code == 422 and r.json()["rule"] == "HW-02"
    assert (r.json()["used"], r.json()["limit"]) == (20, 60)  # used by the others
    async with world.svc.ctx.db.read() as session:
        stored = await session.get(Assignment, a["id"])
        usage = await session.get(ClassDayUsage, ("C1", SCHOOL_DAY))
        revisions = await session.scalar(select(func.count()).select_from(AssignmentRevision))
    assert (stored.estimated_minutes, stored.version, usage.used, revisions) == (30, 1, 50, 2)
    ok = await world.client.patch(
        f"/assignments/{a['id']}", json={"estimated_minutes": 40}, headers=world.teacher("TM")
    )
    assert ok.status_code == 200 and ok.json()["usage"]["used"] == 60
    stale = await world.client.patch(
        f"/assignments/{a['id']}",
        json={"content": "x", "expected_version": 1},
        headers=world.teacher("TM"),
    )
    assert stale.status_code == 409


async def test_hw02_moving_to_another_date_releases_the_old_day(world: World):
    a = (await world.publish("C1", world.teacher("TM"), estimated_minutes=50)).json()["assignment"]
    next_day = SCHOOL_DAY + D.timedelta(days=1)
    r = await world.client.patch(
        f"/assignments/{a['id']}", json={"date": next_day.isoformat()}, headers=world.teacher("TM")
    )
    assert r.status_code == 200 and r.json()["usage"]["date"] == next_day.isoformat()
    old = await world.client.get(
        "/classes/C1/usage", params={"date": SCHOOL_DAY.isoformat()}, headers=world.teacher("TM")
    )
    assert old.json()["used"] == 0 and old.json()["remaining"] == 60


# ---------------------------------------------------------------- HW-03


async def test_hw03_head_teacher_quotas_per_subject(world: World):
    head = world.teacher("HT", head=True)
    r = await world.client.put(
        "/classes/C1/quotas",
        json={
            "quotas": [{"subject": "math", "minutes": 30}, {"subject": "chinese", "minutes": 20}]
        },
        headers=head,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "class_id": "C1",
        "limit": 60,
        "total": 50,
        "quotas": {"math": 30, "chinese": 20},
    }
    await world.publish("C1", world.teacher("TM"), estimated_minutes=25)
    over = await world.publish("C1", world.teacher("TM"), expect=422, estimated_minutes=10)
    assert (over.json()["rule"], over.json()["limit"], over.json()["used"]) == ("HW-03", 30, 25)
    assert over.json()["subject"] == "math"
    # English has no quota: the head teacher allocated the whole day.
    none = await world.publish("C1", world.teacher("TE"), expect=422, subject="english")
    assert (none.json()["rule"], none.json()["limit"]) == ("HW-03", 0)
    ok = await world.publish("C1", head, subject="chinese", estimated_minutes=20)
    assert ok.json()["usage"]["quotas"] == {"math": 30, "chinese": 20}
    assert [x.rule for x in await refusals(world)] == ["HW-03", "HW-03"]
    # Clearing the quotas: first come, first served again within the class limit.
    cleared = await world.client.put("/classes/C1/quotas", json={"quotas": []}, headers=head)
    assert cleared.json()["quotas"] == {}
    await world.publish("C1", world.teacher("TE"), subject="english", estimated_minutes=15)


async def test_hw03_only_the_head_teacher_of_the_class_sets_quotas(world: World):
    body = {"quotas": [{"subject": "math", "minutes": 30}]}
    for headers in (
        world.teacher("TM"),  # a subject teacher of the class
        world.teacher("TX", head=True),  # head teacher of another class
        world.school_admin(),
    ):
        r = await world.client.put("/classes/C1/quotas", json=body, headers=headers)
        assert r.status_code == 404, headers
    over = await world.client.put(
        "/classes/C1/quotas",
        json={
            "quotas": [{"subject": "math", "minutes": 40}, {"subject": "chinese", "minutes": 30}]
        },
        headers=world.teacher("HT", head=True),
    )
    assert over.status_code == 422
    assert (over.json()["rule"], over.json()["limit"], over.json()["used"]) == ("HW-03", 60, 70)
    unknown = await world.client.put(
        "/classes/C1/quotas",
        json={"quotas": [{"subject": "physics", "minutes": 10}]},
        headers=world.teacher("HT", head=True),
    )
    assert unknown.status_code == 422 and unknown.json()["errors"]


# ---------------------------------------------------------------- HW-04


async def test_hw04_no_written_homework_on_duanwu_2150(world: World):
    duanwu = festival_date(2150, "duanwu")
    assert duanwu == D.date(2150, 5, 31)
    r = await world.publish("C1", world.teacher("TM"), expect=422, date=duanwu)
    p = r.json()
    assert (p["rule"], p["limit"], p["used"], p["no_written_homework"]) == ("HW-04", 0, 0, "duanwu")
    assert "端午" in p["detail"]
    # Optional written homework at home is written homework too; reading is not.
    await world.publish("C1", world.teacher("TM"), expect=422, date=duanwu, layer="extended")
    ok = await world.publish("C1", world.teacher("TM"), date=duanwu, kind="reading")
    assert ok.json()["usage"]["no_written_homework"] == "端午节"
    for key in ("qingming", "midautumn"):
        day = festival_date(2150, key)
        r = await world.publish("C1", world.teacher("TM"), expect=422, date=day)
        assert r.json()["no_written_homework"] == key
    assert [x.rule for x in await refusals(world)] == ["HW-04"] * 4


async def test_hw04_school_declared_no_written_homework_day(world: World):
    url = f"/schools/S1/no-written-homework-days/{SCHOOL_DAY.isoformat()}"
    assert (
        await world.client.put(
            url, json={"reason": "读书节"}, headers=world.teacher("HT", head=True)
        )
    ).status_code == 404
    assert (
        await world.client.put(url, json={"reason": "读书节"}, headers=world.school_admin("S9"))
    ).status_code == 404
    r = await world.client.put(url, json={"reason": "读书节"}, headers=world.school_admin())
    assert r.status_code == 200 and r.json()["reason"] == "读书节"
    refused = await world.publish("C1", world.teacher("TM"), expect=422)
    assert refused.json()["rule"] == "HW-04" and "读书节" in refused.json()["detail"]
    public = await world.client.get("/public/schools/S1/no-written-homework-days")
    assert [d["date"] for d in public.json()] == [SCHOOL_DAY.isoformat()]
    assert (await world.client.delete(url, headers=world.school_admin())).status_code == 204
    await world.publish("C1", world.teacher("TM"))


async def test_hw04_weekend_holiday_and_vacation_caps_from_the_region_profile(
    world: World, tmp_path: Path
):
    policy = tmp_path / "policy"
    policy.mkdir()
    shutil.copy(Path("policy/national.toml"), policy / "national.toml")
    (policy / "testland.toml").write_text(
        'id = "testland"\nname = "测试区"\nextends = "national"\neffective_from = 2021-09-01\n'
        "[homework]\n"
        "weekend_daily_limit_minutes = { lower_primary = 0, upper_primary = 30, junior = 45 }\n"
        "statutory_holiday_daily_limit_minutes = { lower_primary = 0, upper_primary = 20,"
        " junior = 30 }\n"
        "vacation_daily_limit_minutes = { lower_primary = 0, upper_primary = 10, junior = 20 }\n",
        encoding="utf-8",
    )
    world.svc.ctx.policies = PolicyRegistry.load(policy)
    await world.roster.region("jinhua", "testland")  # the region's profile is testland
    saturday = D.date(2150, 3, 14)
    r = await world.publish(
        "C1", world.teacher("TM"), expect=422, date=saturday, estimated_minutes=31
    )
    assert (r.json()["rule"], r.json()["limit"], r.json()["day_kind"]) == ("HW-04", 30, "weekend")
    ok = await world.publish("C1", world.teacher("TM"), date=saturday, estimated_minutes=30)
    assert ok.json()["usage"]["rule"] == "HW-04"
    national_day = D.date(2150, 10, 2)
    r = await world.publish(
        "C1", world.teacher("TM"), expect=422, date=national_day, estimated_minutes=21
    )
    assert (r.json()["limit"], r.json()["day_kind"]) == (20, "statutory_holiday")
    # jinhua's terms (policy/calendar/terms/jinhua.toml): summer vacation from 2026-07-01.
    r = await world.publish(
        "C1", world.teacher("TM"), expect=422, date=D.date(2026, 7, 15), estimated_minutes=11
    )
    assert (r.json()["rule"], r.json()["limit"], r.json()["day_kind"]) == ("HW-04", 10, "vacation")
    weekday = await world.publish("C1", world.teacher("TM"), date=SCHOOL_DAY, estimated_minutes=60)
    assert weekday.json()["usage"]["rule"] == "HW-02"


# ---------------------------------------------------------------- HW-05


@pytest.mark.parametrize(
    "flag",
    [
        "assigned_to_parents",
        "parents_must_check",
        "students_self_grade",
        "requires_phone",
        "punitive",
        "repetitive",
    ],
)
async def test_hw05_forbidden_flags_are_refused(world: World, flag: str):
    r = await world.publish("C1", world.teacher("TM"), expect=422, flags={flag: True})
    assert r.json()["rule"] == "HW-05" and r.json()["flags"] == [flag]
    assert await count(world, Assignment) == 0
    assert [x.rule for x in await refusals(world)] == ["HW-05"]


async def test_hw05_screening_warnings_must_be_acknowledged_and_are_visible_to_the_bureau(
    world: World,
):
    content = "抄写生字，完成后请家长签字检查"
    r = await world.publish("C1", world.teacher("TM"), expect=422, content=content)
    p = r.json()
    assert p["rule"] == "HW-05"
    assert set(p["warnings"]) == {"家长签字检查", "家长签字"}
    assert await count(world, Assignment) == 0
    partial = await world.publish(
        "C1", world.teacher("TM"), expect=422, content=content, acknowledged_warnings=["家长签字"]
    )
    assert partial.json()["unacknowledged"] == ["家长签字检查"]
    ok = await world.publish(
        "C1", world.teacher("TM"), content=content, acknowledged_warnings=p["warnings"]
    )
    assert set(ok.json()["assignment"]["acknowledged_warnings"]) == set(p["warnings"])
    seen = await world.client.get(
        "/oversight/acknowledged-warnings",
        params={"from": "2150-03-01", "to": "2150-03-31"},
        headers=world.bureau(),
    )
    assert seen.status_code == 200
    assert [w["assignment_id"] for w in seen.json()] == [ok.json()["assignment"]["id"]]
    assert set(seen.json()[0]["acknowledged_warnings"]) == set(p["warnings"])


# ---------------------------------------------------------------- authorization, X-03


async def test_hw01_teachers_publish_only_for_classes_and_subjects_they_teach(world: World):
    other_class = await world.publish("C2", world.teacher("TM"), expect=404)
    assert other_class.json()["status"] == 404
    missing = await world.publish("NOPE", world.teacher("TM"), expect=404)
    assert missing.json()["detail"] == other_class.json()["detail"]  # same answer (GW-03)
    await world.publish("C1", world.teacher("TM"), expect=403, subject="english")
    other_school = world.mint("teacher", tenants=["school:S9"], person_id="TM")
    await world.publish("C1", {"Authorization": f"Bearer {other_school}"}, expect=404)
    await world.publish("C1", world.parent("G1"), expect=404)
    await world.publish("C1", world.school_admin(), expect=404)
    # The head teacher publishes only the subjects they teach in the class.
    await world.publish(
        "C1", world.teacher("HT", head=True), subject="chinese", estimated_minutes=5
    )
    await world.publish("C1", world.teacher("HT", head=True), expect=403, subject="english")
    await world.publish("C1", world.teacher("HT", head=True), expect=403, subject="physics")
    # Only the publisher or the head teacher edits; others get 404.
    a = (await world.publish("C1", world.teacher("TM"))).json()["assignment"]
    r = await world.client.patch(
        f"/assignments/{a['id']}", json={"content": "x"}, headers=world.teacher("TE")
    )
    assert r.status_code == 404
    r = await world.client.patch(
        f"/assignments/{a['id']}", json={"content": "改"}, headers=world.teacher("HT", head=True)
    )
    assert r.status_code == 200
    assert (await world.client.post("/classes/C1/assignments", json={})).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"estimated_minutes": 0},
        {"estimated_minutes": "many"},
        {"kind": "essay"},
        {"layer": "personalized"},  # no targets
        {"target_student_ids": ["P1"]},  # targets on basic homework
        {"date": "2150-02-30"},
        {"subject": ""},
        {"unexpected": True},
        {"flags": {"unknown_flag": True}},
    ],
)
async def test_x03_bad_input_is_problem_json_and_writes_nothing(world: World, body: dict):
    r = await world.publish("C1", world.teacher("TM"), expect=422, **body)
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["errors"] and "rule" not in r.json()
    assert await count(world, Assignment) == 0
    assert await refusals(world) == []


async def test_x03_malformed_json_and_bad_query_are_problems(world: World):
    r = await world.client.post(
        "/classes/C1/assignments",
        content=b"{not json",
        headers={**world.teacher("TM"), "content-type": "application/json"},
    )
    assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM)
    r = await world.client.get(
        "/classes/C1/usage", params={"date": "tomorrow"}, headers=world.teacher("TM")
    )
    assert r.status_code == 422
    r = await world.client.patch("/assignments/x", json={"date": None}, headers=world.teacher("TM"))
    assert r.status_code == 422
