"""Group commit of money-moving requests (FUND-09 throughput).

Every journal posting locks the single ledger head, so postings are serial;
paying one database commit (and one more for the Idempotency-Key claim) per
request caps the service at the commit rate. The ``PostingWriter`` takes
every money-moving request waiting in this process and runs them in ONE
database transaction, in arrival order:

* each request runs inside its own SAVEPOINT: its Idempotency-Key claim
  (``chassis.idempotency.claim_in``), its use case (rows, journal postings
  chained after the previous request's, outbox events) and its stored reply
  (``remember_in``); a refusal (4xx problem) rolls back only that savepoint
  and is then remembered like any reply; an unexpected error (a bug, a
  deadlock with another replica) rolls back only that savepoint and the
  request is run once more alone, after the group, in its own transaction;
* one commit for the whole group, then every request is answered. Nothing is
  answered as done before its commit; a reply is only ever one the database
  holds.
* If the group fails as a whole (the commit, a lost connection, a deadlock
  with another replica's group or with the periodic sweep), nothing of it is
  committed — the database rolls the whole transaction back, so there is no
  partial posting — and every request of the group is run again alone, in
  its own transaction; a request that fails alone gets a 503 problem telling
  the client to retry with the same key (its claim was never committed).

Requests that say how (``SetWise``, e.g. parents' single lesson
confirmations) are answered set-wise within the group — a handful of
statements for the whole set instead of a score per request — with exactly
the reply each would have had alone; if the set fails, each runs the
ordinary way.

The database stays the authority: the ledger head row is locked and the
chain continued from what the database holds, so several replicas (each with
its own writer) stay correct; they simply take turns on the head lock.

The worker task exists only while there is work (started by the first
request, it ends when the queue is empty), so the service needs no shutdown
step for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from chassis import idempotency
from chassis.db import Database
from chassis.errors import PROBLEM_MEDIA_TYPE, Problem, problem_body

log = structlog.get_logger("funds.writer")

Work = Callable[[AsyncSession], Awaitable[Any]]

#: Upper bound of requests per group (bounds the transaction's length).
MAX_GROUP = 256
#: Event-loop turns the writer yields before taking a group.
LINGER_TURNS = 4


@dataclass(frozen=True)
class SetWise:
    """How a request can be answered together with others of the same
    ``key``: ``run_many(session, [(claim, payload), ...])`` claims their keys,
    does the work set-wise, stores the replies, and returns per request its
    reply, a Problem, or None for "run it the ordinary way" (e.g. its key
    was already taken)."""

    key: str
    payload: Any
    run_many: Callable[
        [AsyncSession, list[tuple[idempotency.IdempotentRequest, Any]]],
        Awaitable[list[Response | Problem | None]],
    ]


@dataclass
class _Request:
    claim: idempotency.IdempotentRequest | None  # None: plain work (``run``)
    work: Work
    status_code: int
    future: asyncio.Future[Any] = field(repr=False)
    setwise: SetWise | None = None


@dataclass
class WriterStats:
    groups: int = 0
    requests: int = 0
    failed_groups: int = 0
    largest_group: int = 0
    setwise: int = 0  # requests answered set-wise


class PostingWriter:
    def __init__(self, db: Database, *, max_group: int = MAX_GROUP) -> None:
        self.db = db
        self.max_group = max_group
        self.stats = WriterStats()
        self._queue: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None

    async def submit(
        self,
        claim: idempotency.IdempotentRequest,
        work: Work,
        status_code: int = 200,
        *,
        setwise: SetWise | None = None,
    ) -> Response:
        """Queue one idempotent request; its reply once its group has committed."""
        reply: Response = await self._enqueue(_Request(claim, work, status_code, None, setwise))  # type: ignore[arg-type]
        return reply

    async def run(self, work: Work) -> Any:
        """Run ``work(session)`` (no Idempotency-Key: e.g. the periodic sweep)
        in the next group, in its own savepoint; its result once committed.
        Keeps every ledger writer of this process on the one writer, so the
        sweep never deadlocks with a group here."""
        value: _Value = await self._enqueue(_Request(None, work, 200, None))  # type: ignore[arg-type]
        return value.result

    async def _enqueue(self, request: _Request) -> Any:
        request.future = asyncio.get_running_loop().create_future()
        self._queue.append(request)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="funds-posting-writer")
        return await asyncio.shield(request.future)

    async def _drain(self) -> None:
        while self._queue:
            # Let requests already on their way (parsed, verified, about to
            # submit) join this group: a few turns of the event loop, no timer.
            for _ in range(LINGER_TURNS):
                await asyncio.sleep(0)
            group, self._queue = self._queue[: self.max_group], self._queue[self.max_group :]
            try:
                await self._write(group)
            except BaseException as exc:  # never leave a caller waiting
                for request in group:
                    if not request.future.done():
                        request.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    async def _write(self, group: list[_Request]) -> None:
        self.stats.groups += 1
        self.stats.requests += len(group)
        self.stats.largest_group = max(self.stats.largest_group, len(group))
        try:
            replies = await self._run_group(group)
        except Exception as exc:
            # Nothing of the group was committed. Run each request alone.
            self.stats.failed_groups += 1
            if len(group) > 1:
                log.warning("posting_group_failed", size=len(group), error=repr(exc))
                for request in group:
                    await self._write([request])
                return
            log.warning("posting_failed", error=repr(exc))
            if group[0].claim is None:
                group[0].future.set_exception(exc)
            else:
                group[0].future.set_result(_unavailable())
            return
        again: list[_Request] = []
        for request, reply in zip(group, replies, strict=True):
            if isinstance(reply, Problem) or not isinstance(reply, BaseException):
                if isinstance(reply, Problem):
                    request.future.set_exception(reply)
                else:
                    request.future.set_result(reply)
            elif len(group) > 1:
                again.append(request)  # maybe transient (a deadlock): once more, alone
            else:
                request.future.set_exception(reply)
        for request in again:
            await self._write([request])

    async def _run_group(self, group: list[_Request]) -> list[Any]:
        replies: dict[int, Any] = {}
        sets: dict[str, list[int]] = {}
        for i, request in enumerate(group):
            if request.setwise is not None:
                sets.setdefault(request.setwise.key, []).append(i)
        async with self.db.transaction() as session:
            for members in sets.values():
                if len(members) > 1:
                    replies.update(
                        await self._run_set(session, [group[i] for i in members], members)
                    )
            for i, request in enumerate(group):
                if i not in replies:
                    replies[i] = await self._run_one(session, request)
        return [replies[i] for i in range(len(group))]

    async def _run_set(
        self, session: AsyncSession, requests: list[_Request], positions: list[int]
    ) -> dict[int, Response | BaseException]:
        """Requests answerable set-wise, in one savepoint; if anything goes
        wrong there, none of it stays and each runs the ordinary way."""
        setwise = requests[0].setwise
        assert setwise is not None
        events: list[Any] = session.info.setdefault("outbox_events", [])
        mark = len(events)
        try:
            async with session.begin_nested():
                answers = await setwise.run_many(
                    session,
                    [
                        (r.claim, r.setwise.payload)
                        for r in requests
                        if r.setwise is not None and r.claim is not None
                    ],
                )
        except Exception as exc:
            del events[mark:]
            log.warning("setwise_failed", size=len(requests), error=repr(exc))
            return {}
        self.stats.setwise += sum(1 for a in answers if a is not None)
        return {i: a for i, a in zip(positions, answers, strict=True) if a is not None}

    async def _run_one(self, session: AsyncSession, request: _Request) -> Any:
        events: list[Any] = session.info.setdefault("outbox_events", [])
        mark = len(events)
        if request.claim is None:
            try:
                async with session.begin_nested():
                    return _Value(await request.work(session))
            except Exception as exc:
                del events[mark:]
                return exc
        try:
            async with session.begin_nested():
                stored = await idempotency.claim_or_take_over_in(session, request.claim)
                if stored is not None:
                    return stored
                body = idempotency.encode(await request.work(session))
                await idempotency.remember_in(
                    session, request.claim, request.status_code, body, "application/json"
                )
            return Response(body, status_code=request.status_code, media_type="application/json")
        except Problem as problem:
            del events[mark:]  # the rolled-back savepoint's events never happened
            if problem.status >= 500 or problem.slug.startswith("idempotency/"):
                # Not remembered: a retry with the same key may succeed.
                return problem
            body = json.dumps(problem_body(None, problem), ensure_ascii=False).encode()
            try:
                async with session.begin_nested():
                    stored = await idempotency.claim_or_take_over_in(session, request.claim)
                    if stored is not None:
                        return stored
                    await idempotency.remember_in(
                        session, request.claim, problem.status, body, PROBLEM_MEDIA_TYPE
                    )
            except Problem as other:
                return other
            return Response(body, status_code=problem.status, media_type=PROBLEM_MEDIA_TYPE)
        except Exception as exc:
            # This request's own failure (a bug, a constraint): rolled back to
            # its savepoint, the rest of the group goes on. If the transaction
            # itself is broken, the commit fails and the group is re-run.
            del events[mark:]
            return exc


@dataclass(frozen=True)
class _Value:
    result: Any


def _unavailable() -> Response:
    problem = Problem(
        503,
        "记账暂时未能完成，本次请求未生效；请使用同一 Idempotency-Key 重试。",
        headers={"Retry-After": "1"},
    )
    body = json.dumps(problem_body(None, problem), ensure_ascii=False).encode()
    return Response(
        body, status_code=503, media_type=PROBLEM_MEDIA_TYPE, headers={"Retry-After": "1"}
    )
