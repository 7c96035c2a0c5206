"""Idempotency-Key on money-moving and seat-taking requests (IETF draft semantics)."""

from __future__ import annotations

import asyncio
import json
from datetime import date, timedelta

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, update

from chassis import idempotency
from chassis.auth import Principal
from chassis.db import Database, utcnow
from chassis.errors import Problem, install_problem_handlers
from chassis.messaging import messaging_metadata

pytestmark = pytest.mark.asyncio
metadata = MetaData()
seats = Table(
    "seats",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("left", Integer, nullable=False),
)
taken = Table(
    "taken",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("student", String(20), nullable=False),
)


def make_app(db: Database) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/enroll")
    async def enroll(request: Request) -> Response:
        principal = Principal(
            subject=request.headers["x-user"], kind="user", roles=frozenset({"parent"})
        )
        claim = await idempotency.begin(db, request, principal)
        if isinstance(claim, Response):
            return claim
        student = (await request.json())["student"]

        async def work(session):
            await asyncio.sleep(0.05)  # keep the first request in flight for a moment
            done = await session.execute(
                update(seats).where(seats.c.id == 1, seats.c.left > 0).values(left=seats.c.left - 1)
            )
            if not done.rowcount:
                raise Problem(409, "名额已满。")
            await session.execute(taken.insert().values(student=student))
            return {"student": student, "seat": "ok"}

        return await idempotency.run(db, claim, work, status_code=201)

    return app


@pytest.fixture
async def setup(databases):
    db = Database(await databases.url("idem"))
    async with db.engine.begin() as conn:
        await conn.run_sync(messaging_metadata.create_all)
        await conn.run_sync(metadata.create_all)
        await conn.execute(seats.insert().values(id=1, left=2))
    app = make_app(db)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        yield db, client
    await db.dispose()


async def _count(db) -> int:
    async with db.read() as s:
        return await s.scalar(select(func.count()).select_from(taken))


async def test_missing_key_is_400(setup):
    _, client = setup
    r = await client.post("/enroll", json={"student": "a"}, headers={"x-user": "p1"})
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["detail"]


async def test_repeat_returns_first_response_byte_for_byte_and_takes_one_seat(setup):
    db, client = setup
    headers = {"x-user": "p1", "Idempotency-Key": "k-1"}
    first = await client.post("/enroll", json={"student": "a"}, headers=headers)
    again = await client.post("/enroll", json={"student": "a"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.content == again.content
    assert again.headers["idempotent-replayed"] == "true"
    assert await _count(db) == 1


async def test_same_key_different_body_is_422(setup):
    _, client = setup
    headers = {"x-user": "p1", "Idempotency-Key": "k-2"}
    await client.post("/enroll", json={"student": "a"}, headers=headers)
    r = await client.post("/enroll", json={"student": "b"}, headers=headers)
    assert r.status_code == 422


async def test_keys_are_per_client(setup):
    db, client = setup
    for user in ("p1", "p2"):
        r = await client.post(
            "/enroll", json={"student": user}, headers={"x-user": user, "Idempotency-Key": "same"}
        )
        assert r.status_code == 201
    assert await _count(db) == 2


async def test_concurrent_retries_take_one_seat_and_others_see_409_or_the_replay(setup):
    db, client = setup
    headers = {"x-user": "p1", "Idempotency-Key": "rush"}
    results = await asyncio.gather(
        *(client.post("/enroll", json={"student": "a"}, headers=headers) for _ in range(20))
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(201) >= 1 and set(statuses) <= {201, 409}
    assert await _count(db) == 1


async def test_refusal_is_remembered_too(setup):
    db, client = setup
    for i in range(2):
        await client.post(
            "/enroll",
            json={"student": f"s{i}"},
            headers={"x-user": "p1", "Idempotency-Key": f"fill-{i}"},
        )
    headers = {"x-user": "p9", "Idempotency-Key": "late"}
    full = await client.post("/enroll", json={"student": "z"}, headers=headers)
    assert full.status_code == 409 and full.headers["content-type"] == "application/problem+json"
    async with db.transaction() as s:  # a seat frees up meanwhile
        await s.execute(update(seats).values(left=1))
    retry = await client.post("/enroll", json={"student": "z"}, headers=headers)
    assert retry.status_code == 409 and retry.content == full.content


BODY = b'{"student": "a"}'


async def _age_claim(db, key: str, seconds: float) -> None:
    async with db.transaction() as s:
        await s.execute(
            update(messaging_metadata.tables["idempotency_keys"])
            .where(messaging_metadata.tables["idempotency_keys"].c.key == key)
            .values(created_at=utcnow() - timedelta(seconds=seconds))
        )


async def test_claim_left_by_a_dead_request_is_taken_over_after_its_lease(setup):
    db, client = setup
    headers = {"x-user": "p1", "Idempotency-Key": "orphan"}
    principal = Principal(subject="p1", kind="user", roles=frozenset({"parent"}))
    request = _request("/enroll", BODY, headers)
    claim = await idempotency.begin(db, request, principal)  # ... and the process dies
    assert isinstance(claim, idempotency.IdempotentRequest)
    soon = await client.post("/enroll", content=BODY, headers=headers)
    assert soon.status_code == 409  # still within the lease: maybe it is running
    await _age_claim(db, "orphan", idempotency.CLAIM_LEASE.total_seconds() + 1)
    later = await client.post("/enroll", content=BODY, headers=headers)
    assert later.status_code == 201 and await _count(db) == 1


async def test_request_whose_claim_was_taken_over_rolls_back_its_work(setup):
    """Fencing: the slow original must not move anything once a retry owns the key."""
    db, client = setup
    headers = {"x-user": "p1", "Idempotency-Key": "slow"}
    principal = Principal(subject="p1", kind="user", roles=frozenset({"parent"}))
    request = _request("/enroll", BODY, headers)
    slow_claim = await idempotency.begin(db, request, principal)
    assert isinstance(slow_claim, idempotency.IdempotentRequest)
    await _age_claim(db, "slow", idempotency.CLAIM_LEASE.total_seconds() + 1)
    retry = await client.post("/enroll", content=BODY, headers=headers)
    assert retry.status_code == 201

    async def slow_work(session):
        await session.execute(taken.insert().values(student="a-twice"))
        return {"student": "a"}

    with pytest.raises(Problem) as refused:
        await idempotency.run(db, slow_claim, slow_work, status_code=201)
    assert refused.value.status == 409
    assert await _count(db) == 1  # the slow request's insert rolled back
    replay = await client.post("/enroll", content=BODY, headers=headers)
    assert replay.content == retry.content


async def test_list_of_models_is_remembered_as_json(setup):
    db, _ = setup
    principal = Principal(subject="p1", kind="user", roles=frozenset({"parent"}))
    request = _request("/list", b"{}", {"Idempotency-Key": "list"})
    claim = await idempotency.begin(db, request, principal)
    assert isinstance(claim, idempotency.IdempotentRequest)

    async def work(session):
        return [Seat(student="a", on=date(2026, 9, 1)), Seat(student="b", on=date(2026, 9, 2))]

    response = await idempotency.run(db, claim, work)
    assert json.loads(response.body) == [
        {"student": "a", "on": "2026-09-01"},
        {"student": "b", "on": "2026-09-02"},
    ]


class Seat(BaseModel):
    student: str
    on: date


def _request(path: str, body: bytes, headers: dict[str, str]) -> Request:
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": raw_headers,
    }

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)
