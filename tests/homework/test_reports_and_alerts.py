"""HW-06: actual-time reports, actual vs estimated, and the burden alert seen
through a real NATS JetStream consumer."""

from __future__ import annotations

import asyncio
import datetime as D
import json

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.homework import rules
from services.homework import service as hw_service
from services.homework.app import SPEC
from tests.homework.conftest import World, startup_jobs_done
from tests.support import eventually

pytestmark = pytest.mark.asyncio

TODAY = D.date(2026, 11, 20)  # a Friday in jinhua's autumn term (demo terms)
WINDOW = (
    D.date(2026, 11, 12),
    D.date(2026, 11, 13),
    D.date(2026, 11, 16),
    D.date(2026, 11, 17),
    D.date(2026, 11, 18),
    D.date(2026, 11, 19),
    D.date(2026, 11, 20),
)


async def report(world: World, assignment_id: str, student: str, minutes: int, headers: dict):
    return await world.client.put(
        f"/assignments/{assignment_id}/reports/{student}",
        json={"minutes": minutes},
        headers=headers,
    )


async def test_hw06_one_report_per_student_editable_only_the_same_day(world: World, fixed_today):
    fixed_today(TODAY)
    a = (await world.publish("C1", world.teacher("TM"), date=TODAY, estimated_minutes=30)).json()
    aid = a["assignment"]["id"]
    first = await report(world, aid, "P1", 40, world.student("P1"))
    assert first.status_code == 200, first.text
    assert (first.json()["minutes"], first.json()["reported_on"]) == (40, TODAY.isoformat())
    # The guardian edits the same report the same day.
    again = await report(world, aid, "P1", 45, world.parent("G1"))
    assert again.status_code == 200 and again.json()["minutes"] == 45
    assert again.json()["created_at"] == first.json()["created_at"]
    fixed_today(TODAY + D.timedelta(days=1))
    late = await report(world, aid, "P1", 50, world.parent("G1"))
    assert late.status_code == 409 and late.json()["reported_on"] == TODAY.isoformat()
    # A first report can still come the next day.
    assert (await report(world, aid, "P2", 35, world.parent("G2"))).status_code == 200


async def test_hw06_only_the_student_or_their_guardian_reports(world: World, fixed_today):
    fixed_today(TODAY)
    aid = (await world.publish("C1", world.teacher("TM"), date=TODAY)).json()["assignment"]["id"]
    assert (await report(world, aid, "P2", 20, world.parent("G1"))).status_code == 404
    assert (await report(world, aid, "P2", 20, world.student("P1"))).status_code == 404
    assert (await report(world, aid, "Q1", 20, world.parent("GQ"))).status_code == 404  # C2
    assert (await report(world, aid, "P1", 20, world.teacher("TM"))).status_code == 404
    assert (await report(world, "missing", "P1", 20, world.parent("G1"))).status_code == 404
    bad = await report(world, aid, "P1", -5, world.parent("G1"))
    assert bad.status_code == 422 and bad.json()["errors"]
    future = (
        await world.publish("C1", world.teacher("TM"), date=TODAY + D.timedelta(days=3))
    ).json()["assignment"]["id"]
    assert (await report(world, future, "P1", 20, world.parent("G1"))).status_code == 422
    personal = (
        await world.publish(
            "C1", world.teacher("TM"), date=TODAY, layer="personalized", target_student_ids=["P1"]
        )
    ).json()["assignment"]["id"]
    assert (await report(world, personal, "P2", 20, world.parent("G2"))).status_code == 404
    assert (await report(world, personal, "P1", 20, world.parent("G1"))).status_code == 200


async def test_hw06_actual_vs_estimated_per_class_subject_and_teacher(world: World, fixed_today):
    fixed_today(TODAY)
    math = (await world.publish("C1", world.teacher("TM"), date=TODAY, estimated_minutes=20)).json()
    eng = (
        await world.publish(
            "C1", world.teacher("TE"), date=TODAY, subject="english", estimated_minutes=10
        )
    ).json()
    for student, guardian, m_math, m_eng in (("P1", "G1", 30, 10), ("P2", "G2", 50, 20)):
        await report(world, math["assignment"]["id"], student, m_math, world.parent(guardian))
        await report(world, eng["assignment"]["id"], student, m_eng, world.parent(guardian))
    r = await world.client.get(
        "/classes/C1/actual-vs-estimated",
        params={"from": TODAY.isoformat(), "to": TODAY.isoformat()},
        headers=world.teacher("HT", head=True),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["overall"]["reports"] == 4 and body["overall"]["ratio"] == round(110 / 60, 3)
    by_subject = {row["subject"]: row for row in body["by_subject"]}
    assert by_subject["math"]["actual_minutes_avg"] == 40.0
    assert by_subject["math"]["estimated_minutes_avg"] == 20.0
    assert by_subject["math"]["ratio"] == 2.0
    by_teacher = {row["teacher_id"]: row for row in body["by_teacher"]}
    assert by_teacher["TE"]["ratio"] == 1.5
    # Families do not see the comparison.
    denied = await world.client.get("/classes/C1/actual-vs-estimated", headers=world.parent("G1"))
    assert denied.status_code == 404


async def test_hw06_burden_alert_opens_once_and_closes_through_nats(
    world: World, fixed_today, nats_server
):
    fixed_today(TODAY)
    ids = []
    for day in WINDOW:
        r = await world.publish("C1", world.teacher("TM"), date=day, estimated_minutes=50)
        ids.append(r.json()["assignment"]["id"])
    parent1 = world.parent("G1")

    async def alerts(status: str | None = None) -> list[dict]:
        params = {"status": status} if status else {}
        r = await world.client.get("/oversight/alerts", params=params, headers=world.bureau())
        assert r.status_code == 200, r.text
        return r.json()

    for aid in ids[:3]:
        assert (await report(world, aid, "P1", 90, parent1)).status_code == 200
    assert await alerts() == []  # 3 of 7 school days over: median is 50
    assert (await report(world, ids[3], "P1", 90, parent1)).status_code == 200
    opened = await alerts("open")
    assert len(opened) == 1
    alert = opened[0]
    assert (alert["class_id"], alert["limit_minutes"], alert["open_median_minutes"]) == (
        "C1",
        60,
        90.0,
    )
    assert (alert["open_window_start"], alert["open_window_end"]) == ("2026-11-12", "2026-11-20")
    # More reports while open: no second alert.
    assert (await report(world, ids[0], "P2", 95, world.parent("G2"))).status_code == 200
    assert len(await alerts()) == 1
    # The same-day correction brings the median back under the limit: closed.
    assert (await report(world, ids[3], "P1", 30, parent1)).status_code == 200
    closed = await alerts("closed")
    assert len(closed) == 1 and closed[0]["close_median_minutes"] == 50.0
    assert await alerts("open") == []

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        seen: list[dict] = []

        async def both_events() -> bool:
            try:
                await js.add_consumer(
                    "HOMEWORK",
                    ConsumerConfig(
                        durable_name="test-burden",
                        deliver_policy=DeliverPolicy.ALL,
                        ack_policy=AckPolicy.EXPLICIT,
                        filter_subject="homework.burden.>",
                    ),
                )
                psub = await js.pull_subscribe_bind(durable="test-burden", stream="HOMEWORK")
                msgs = await psub.fetch(10, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError, nats.js.errors.NotFoundError):
                return False
            for msg in msgs:
                seen.append(json.loads(msg.data))
                await msg.ack()
            return len(seen) >= 2

        await eventually(both_events, timeout=20)
    finally:
        await nc.close()
    assert [e["type"] for e in seen] == [
        "homework.burden.alert.opened.v1",
        "homework.burden.alert.closed.v1",
    ]
    opened_event, closed_event = (e["data"] for e in seen)
    assert opened_event["alert_id"] == closed_event["alert_id"] == alert["id"]
    assert opened_event == {
        "alert_id": alert["id"],
        "school_id": "S1",
        "region_id": "jinhua",
        "class_id": "C1",
        "grade": 4,
        "median_minutes": 90.0,
        "limit_minutes": 60,
        "window_start": "2026-11-12",
        "window_end": "2026-11-20",
        "window_school_days": 7,
    }
    assert closed_event["median_minutes"] == 50.0
    assert all("P1" not in json.dumps(e) for e in seen)  # no student data in events


async def test_hw06_window_moves_with_new_school_days(world: World, fixed_today):
    """An open alert also closes when later, lighter days push the heavy ones out."""
    fixed_today(TODAY)
    for day in WINDOW:
        aid = (
            await world.publish("C1", world.teacher("TM"), date=day, estimated_minutes=50)
        ).json()
        await report(world, aid["assignment"]["id"], "P1", 80, world.parent("G1"))
    bureau = world.bureau()
    r = await world.client.get("/oversight/alerts", params={"status": "open"}, headers=bureau)
    assert len(r.json()) == 1
    later = [D.date(2026, 11, d) for d in (23, 24, 25, 26)]
    fixed_today(later[-1])
    for day in later:
        aid = (
            await world.publish("C1", world.teacher("TM"), date=day, estimated_minutes=40)
        ).json()
        await report(world, aid["assignment"]["id"], "P1", 40, world.parent("G1"))
    r = await world.client.get("/oversight/alerts", headers=bureau)
    assert [a["status"] for a in r.json()] == ["closed"]
    assert r.json()[0]["close_window_end"] == "2026-11-26"
    window = rules.school_days_window(
        __import__("chassis.calendar", fromlist=["Calendar"]).Calendar(), later[-1], 7
    )
    assert r.json()[0]["close_window_start"] == window[0].isoformat()


async def test_hw06_open_alert_closes_on_later_publishing_without_reports(
    world: World, fixed_today
):
    """Families stop reporting: the next publication re-evaluates the moved
    window (estimates where nobody reported) and closes the alert."""
    fixed_today(TODAY)
    for day in WINDOW:
        aid = (
            await world.publish("C1", world.teacher("TM"), date=day, estimated_minutes=50)
        ).json()
        await report(world, aid["assignment"]["id"], "P1", 80, world.parent("G1"))
    bureau = world.bureau()
    r = await world.client.get("/oversight/alerts", params={"status": "open"}, headers=bureau)
    assert len(r.json()) == 1
    # Three later school days with light homework, nobody reports: still open
    # (4 of the last 7 school days are the heavy ones).
    later = [D.date(2026, 11, d) for d in (23, 24, 25, 26)]
    for day in later[:3]:
        fixed_today(day)
        await world.publish("C1", world.teacher("TM"), date=day, estimated_minutes=30)
    r = await world.client.get("/oversight/alerts", params={"status": "open"}, headers=bureau)
    assert len(r.json()) == 1
    # The fourth pushes the heavy days to a minority: closed, with no report.
    fixed_today(later[3])
    await world.publish("C1", world.teacher("TM"), date=later[3], estimated_minutes=30)
    r = await world.client.get("/oversight/alerts", headers=bureau)
    assert [(a["status"], a["close_median_minutes"]) for a in r.json()] == [("closed", 30.0)]


async def burden_events(nats_server, durable: str, expected: int) -> list[dict]:
    """The burden events in the HOMEWORK stream, read by a real JetStream consumer."""
    nc = await nats.connect(nats_server.url)
    seen: list[dict] = []
    try:
        js = nc.jetstream()

        async def enough() -> bool:
            try:
                await js.add_consumer(
                    "HOMEWORK",
                    ConsumerConfig(
                        durable_name=durable,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_policy=AckPolicy.EXPLICIT,
                        filter_subject="homework.burden.>",
                    ),
                )
                psub = await js.pull_subscribe_bind(durable=durable, stream="HOMEWORK")
                msgs = await psub.fetch(10, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError, nats.js.errors.NotFoundError):
                return False
            for msg in msgs:
                seen.append(json.loads(msg.data))
                await msg.ack()
            return len(seen) >= expected

        await eventually(enough, timeout=20)
        # Nothing more arrives (no duplicate of a transition).
        psub = await js.pull_subscribe_bind(durable=durable, stream="HOMEWORK")
        try:
            extra = await psub.fetch(10, timeout=1.5)
        except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either
            extra = []
        seen.extend(json.loads(m.data) for m in extra)
    finally:
        await nc.close()
    return seen


async def test_hw06_daily_recheck_closes_the_alert_without_any_new_report(
    world: World, fixed_today, nats_server, start_service
):
    """The 7-school-day window slides with time: the daily job (driven here
    with an explicit "as of" date) closes the alert once the heavy days leave
    the window, with no report and no publication; two replicas running it at
    once, and a re-run, emit the close exactly once (X-02)."""
    assert [j.name for j in SPEC.periodic_jobs] == ["burden_recheck"]
    # The running service has the job, and its start-up (catch-up) run succeeded.
    runner = world.svc.ctx.jobs["burden_recheck"]
    assert (runner.runs, runner.failures) == (1, 0)
    fixed_today(TODAY)
    for day in WINDOW:
        aid = (
            await world.publish("C1", world.teacher("TM"), date=day, estimated_minutes=50)
        ).json()["assignment"]["id"]
        assert (await report(world, aid, "P1", 80, world.parent("G1"))).status_code == 200
    bureau = world.bureau()

    async def alerts() -> list[dict]:
        r = await world.client.get("/oversight/alerts", headers=bureau)
        assert r.status_code == 200, r.text
        return r.json()

    assert [a["status"] for a in await alerts()] == ["open"]
    # Same day again: the class was evaluated for TODAY by the reports; nothing to do.
    same_day = await hw_service.recheck_burden(world.svc.ctx, TODAY)
    assert (same_day.checked, same_day.opened, same_day.closed) == (0, 0, 0)
    # Tuesday 24th: 16,17,18,19,20,23,24 -> five heavy days of seven, still open.
    tuesday = await hw_service.recheck_burden(world.svc.ctx, D.date(2026, 11, 24))
    assert (tuesday.checked, tuesday.closed) == (1, 0)
    assert [a["status"] for a in await alerts()] == ["open"]
    # Thursday 26th: 18,19,20,23,24,25,26 -> three heavy days: the median is 0.
    second = await start_service("homework")  # a second replica, same database
    await startup_jobs_done(second)
    thursday = D.date(2026, 11, 26)
    results = await asyncio.gather(
        hw_service.recheck_burden(world.svc.ctx, thursday),
        hw_service.recheck_burden(second.ctx, thursday),
    )
    assert sum(r.closed for r in results) == 1
    again = await hw_service.recheck_burden(world.svc.ctx, thursday)
    assert (again.checked, again.closed) == (0, 0)
    [closed] = await alerts()
    assert closed["status"] == "closed" and closed["close_median_minutes"] == 0.0
    assert (closed["close_window_start"], closed["close_window_end"]) == (
        "2026-11-18",
        "2026-11-26",
    )
    seen = await burden_events(nats_server, "test-recheck", 2)
    assert [e["type"] for e in seen] == [
        "homework.burden.alert.opened.v1",
        "homework.burden.alert.closed.v1",
    ]
    assert seen[1]["data"]["alert_id"] == closed["id"]
    assert (seen[1]["data"]["window_end"], seen[1]["data"]["median_minutes"]) == (
        "2026-11-26",
        0.0,
    )


async def test_hw06_daily_recheck_opens_an_alert_when_the_calendar_changes(
    world: World, fixed_today, nats_server
):
    """No report is needed to open either: an operator loads days off (X-05)
    that take light days out of the window, the heavy days become the
    majority, and the next daily run opens the alert (once)."""
    from services.homework.models import roster as roster_tables

    fixed_today(D.date(2026, 11, 27))
    for day in (D.date(2026, 11, d) for d in (17, 18, 19, 20)):
        aid = (
            await world.publish("C1", world.teacher("TM"), date=day, estimated_minutes=50)
        ).json()["assignment"]["id"]
        assert (await report(world, aid, "P1", 80, world.parent("G1"))).status_code == 200
    # Window 19..27: two heavy days of seven, no alert.
    r = await world.client.get("/oversight/alerts", headers=world.bureau())
    assert r.json() == []
    for d in (23, 24, 25):
        await world.roster._put(
            roster_tables.holidays,
            {"year": 2026, "day": D.date(2026, 11, d), "name": "停课", "is_workday_swap": False},
        )
    # Monday 30th: the window is 17,18,19,20,26,27,30 (it would have been
    # 20,23..27,30 with one heavy day): four heavy days of seven.
    monday = D.date(2026, 11, 30)
    first = await hw_service.recheck_burden(world.svc.ctx, monday)
    again = await hw_service.recheck_burden(world.svc.ctx, monday)
    assert (first.opened, again.opened, again.checked) == (1, 0, 0)
    [alert] = (await world.client.get("/oversight/alerts", headers=world.bureau())).json()
    assert (alert["status"], alert["open_median_minutes"]) == ("open", 80.0)
    assert (alert["open_window_start"], alert["open_window_end"]) == ("2026-11-17", "2026-11-30")
    seen = await burden_events(nats_server, "test-recheck-open", 1)
    assert [e["type"] for e in seen] == ["homework.burden.alert.opened.v1"]


async def test_hw06_daily_recheck_skips_classes_without_homework_in_the_window(
    world: World, fixed_today
):
    """Only classes with an open alert or counted homework in the window are
    evaluated; a school day past a vacation-free week with no homework changes nothing."""
    fixed_today(TODAY)
    await world.publish("C1", world.teacher("TM"), date=WINDOW[0], estimated_minutes=30)
    in_window = await hw_service.recheck_burden(world.svc.ctx, TODAY)
    assert in_window.checked == 1  # C1 only (C2 has no homework)
    later = await hw_service.recheck_burden(world.svc.ctx, D.date(2026, 12, 31))
    assert (later.checked, later.opened, later.closed) == (0, 0, 0)


async def test_hw08_reports_follow_an_assignment_moved_to_another_date(world: World, fixed_today):
    """Oversight reads reports by the assignment's date; moving the date moves them."""
    fixed_today(TODAY)
    a = (
        await world.publish("C1", world.teacher("TM"), date=WINDOW[0], estimated_minutes=20)
    ).json()["assignment"]
    assert (await report(world, a["id"], "P1", 40, world.parent("G1"))).status_code == 200
    moved = await world.client.patch(
        f"/assignments/{a['id']}", json={"date": "2026-11-17"}, headers=world.teacher("TM")
    )
    assert moved.status_code == 200, moved.text

    async def reported(day: str) -> dict:
        r = await world.client.get(
            "/oversight/schools", params={"from": day, "to": day}, headers=world.bureau()
        )
        assert r.status_code == 200, r.text
        grades = r.json()["schools"][0]["grades"]
        return grades[0]["reported"] if grades else {}

    assert await reported("2026-11-12") == {}
    assert await reported("2026-11-17") == {"class_days": 1, "avg": 40.0, "p90": 40.0}
