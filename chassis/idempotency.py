"""`Idempotency-Key` for money-moving and seat-taking requests.

Follows the IETF draft (httpapi-idempotency-key-header): a missing key is 400,
the same key with a different request is 422, the same key while the first
request is still running is 409, and a repeat gets the first response, byte
for byte. Keys are scoped per client (the token's client id or subject).

The stored response is written in the use case's own transaction, so "the
money moved" and "the response is remembered" commit together or not at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy import and_, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.auth import Principal
from chassis.db import Database, utcnow
from chassis.errors import PROBLEM_MEDIA_TYPE, Problem, problem_body, url_path
from chassis.messaging import idempotency_table

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


# A claim older than this whose request never finished (its process died) may
# be taken over by a retry. The takeover is fenced: the old request, if it is in
# fact still running, finds its claim gone when it tries to remember its
# response, and its whole transaction — the money it moved — rolls back.
CLAIM_LEASE = timedelta(seconds=60)


@dataclass(frozen=True)
class IdempotentRequest:
    client: str
    key: str
    fingerprint: str
    claimed_at: datetime


async def identify(request: Request, principal: Principal) -> IdempotentRequest:
    """The request's key, client and fingerprint (400 without a usable key);
    nothing is claimed yet — for services that claim keys in their own
    transaction (see ``claim_in``, or many requests decided in one batch)."""
    key = request.headers.get(HEADER)
    if not key:
        raise Problem(400, f"此操作须携带 {HEADER} 请求头（重试时使用同一值）。")
    if len(key) > MAX_KEY_LENGTH:
        raise Problem(400, f"{HEADER} 过长（上限 {MAX_KEY_LENGTH} 个字符）。")
    body = await request.body()
    digest = hashlib.sha256()
    query = request.scope.get("query_string", b"").decode()
    for part in (request.method, url_path(request), query):
        digest.update(part.encode() + b"\0")
    digest.update(body)
    return IdempotentRequest(
        principal.client_id or principal.subject, key, digest.hexdigest(), utcnow()
    )


async def begin(
    db: Database, request: Request, principal: Principal
) -> IdempotentRequest | Response:
    """Claim the request's key, or answer from what the key already holds."""
    return await claim_key(db, await identify(request, principal))


async def claim_key(db: Database, claim: IdempotentRequest) -> IdempotentRequest | Response:
    """`begin` for an identified request: claim its key in a short transaction
    (taking over a claim whose lease ran out), or answer from the key."""
    async with db.transaction() as session:
        answer = await claim_in(session, claim)
    if answer is None:
        return claim
    if isinstance(answer, _TakeOver):
        async with db.transaction() as session:
            if await _take_over(session, claim, answer.row_created_at):
                return claim
        raise _in_flight()
    return answer


@dataclass(frozen=True)
class _TakeOver:
    row_created_at: datetime


def _in_flight() -> Problem:
    return Problem(
        409,
        "同一请求仍在处理中，请稍后重试。",
        slug="idempotency/in-flight",
        headers={"Retry-After": "1"},
    )


async def claim_in(session: AsyncSession, claim: IdempotentRequest) -> Response | _TakeOver | None:
    """Claim the key inside ``session``'s transaction: None when claimed (the
    caller then runs its work and ``remember_in`` in the same transaction, so
    claim, work and stored reply commit together), or the stored reply of a
    finished request. Raises 422 for the key used with another request, 409
    while the first request is still in flight. (_TakeOver: an expired claim,
    see ``claim_or_take_over_in``.)"""
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    insert = sqlite_insert if dialect == "sqlite" else pg_insert
    inserted = await session.execute(
        insert(idempotency_table)
        .values(
            client=claim.client,
            key=claim.key,
            fingerprint=claim.fingerprint,
            status="in_flight",
            created_at=claim.claimed_at,
        )
        .on_conflict_do_nothing()
    )
    if inserted.rowcount:  # type: ignore[attr-defined]
        return None
    row = (
        (
            await session.execute(
                select(idempotency_table).where(
                    idempotency_table.c.client == claim.client,
                    idempotency_table.c.key == claim.key,
                )
            )
        )
        .mappings()
        .one()
    )
    if row["fingerprint"] != claim.fingerprint:
        raise Problem(422, f"该 {HEADER} 已用于另一个不同的请求。", slug="idempotency/mismatch")
    if row["status"] != "done" and row["created_at"] <= claim.claimed_at - CLAIM_LEASE:
        return _TakeOver(row["created_at"])
    return stored_answer(row, claim)


def stored_answer(row: Any, claim: IdempotentRequest) -> Response:
    """What a key's stored row answers to a repeat of ``claim``: 422 for a
    different request, 409 while the first is in flight, else the first
    response byte for byte."""
    if row["fingerprint"] != claim.fingerprint:
        raise Problem(422, f"该 {HEADER} 已用于另一个不同的请求。", slug="idempotency/mismatch")
    if row["status"] != "done":
        raise _in_flight()
    return Response(
        row["response_body"],
        status_code=row["response_status"],
        media_type=row["content_type"],
        headers={"Idempotent-Replayed": "true"},
    )


async def _take_over(session: AsyncSession, claim: IdempotentRequest, created_at: datetime) -> bool:
    taken = await session.execute(
        update(idempotency_table)
        .where(
            idempotency_table.c.client == claim.client,
            idempotency_table.c.key == claim.key,
            idempotency_table.c.status == "in_flight",
            idempotency_table.c.created_at == created_at,
        )
        .values(created_at=claim.claimed_at)
    )
    return bool(taken.rowcount)  # type: ignore[attr-defined]


async def claim_or_take_over_in(session: AsyncSession, claim: IdempotentRequest) -> Response | None:
    """``claim_in`` that also takes over an expired claim, in the same transaction."""
    answer = await claim_in(session, claim)
    if isinstance(answer, _TakeOver):
        if await _take_over(session, claim, answer.row_created_at):
            return None
        raise _in_flight()
    return answer


async def remember_in(
    session: AsyncSession, claim: IdempotentRequest, status: int, body: bytes, content_type: str
) -> None:
    """Store the reply under the claim (in the claim holder's transaction)."""
    await _remember(session, claim, status, body, content_type)


def encode(result: Any) -> bytes:
    return _encode(result)


async def _remember(
    session: AsyncSession, claim: IdempotentRequest, status: int, body: bytes, content_type: str
) -> None:
    remembered = await session.execute(
        update(idempotency_table)
        .where(
            and_(
                idempotency_table.c.client == claim.client,
                idempotency_table.c.key == claim.key,
                idempotency_table.c.status == "in_flight",
                idempotency_table.c.created_at == claim.claimed_at,
            )
        )
        .values(
            status="done",
            response_status=status,
            response_body=body,
            content_type=content_type,
            completed_at=utcnow(),
        )
    )
    if not remembered.rowcount:  # type: ignore[attr-defined]
        # The claim's lease ran out and a retry took it over: undo this work.
        raise ClaimLost


async def _release(db: Database, claim: IdempotentRequest) -> None:
    async with db.transaction() as session:
        await session.execute(
            delete(idempotency_table).where(
                idempotency_table.c.client == claim.client,
                idempotency_table.c.key == claim.key,
                idempotency_table.c.status == "in_flight",
                idempotency_table.c.created_at == claim.claimed_at,
            )
        )


class ClaimLost(Exception):
    pass


def _encode(result: Any) -> bytes:
    if isinstance(result, BaseModel):
        return result.model_dump_json().encode()
    return json.dumps(jsonable_encoder(result), ensure_ascii=False).encode()


async def run(
    db: Database,
    claim: IdempotentRequest,
    work: Callable[[AsyncSession], Awaitable[Any]],
    *,
    status_code: int = 200,
) -> Response:
    """Run `work(session)` in one transaction that also remembers its response.

    A refusal (4xx problem) is remembered too: the client's retry gets the same
    answer. A crash or 5xx releases the key so the client may retry.
    """
    try:
        return await _run_once(db, claim, work, status_code)
    except ClaimLost:
        raise Problem(
            409,
            "该请求处理超时，已由使用同一幂等键的重试接管；本次处理未生效。",
            slug="idempotency/in-flight",
        ) from None


async def _run_once(
    db: Database,
    claim: IdempotentRequest,
    work: Callable[[AsyncSession], Awaitable[Any]],
    status_code: int,
) -> Response:
    try:
        async with db.transaction() as session:
            body = _encode(await work(session))
            await _remember(session, claim, status_code, body, "application/json")
        return Response(body, status_code=status_code, media_type="application/json")
    except Problem as problem:
        if problem.status >= 500:
            await _release(db, claim)
            raise
        body = json.dumps(problem_body(None, problem), ensure_ascii=False).encode()
        async with db.transaction() as session:
            await _remember(session, claim, problem.status, body, PROBLEM_MEDIA_TYPE)
        return Response(body, status_code=problem.status, media_type=PROBLEM_MEDIA_TYPE)
    except ClaimLost:
        raise
    except BaseException:
        await _release(db, claim)
        raise
