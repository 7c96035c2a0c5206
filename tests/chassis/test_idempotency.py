"""Idempotency-Key on money-moving and seat-taking requests (IETF draft semantics)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, update

from chassis import idempotency
from chassis.auth import Principal
from chassis.db import Database
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
