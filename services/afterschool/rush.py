"""AS-04 the rush: enrollment attempts decided together (group commit).

Every enrollment attempt joins this process's queue; one worker takes
everything waiting (up to MAX_BATCH, any courses) and decides it in ONE
transaction: the children's roster rows locked (in id order); then, in one
statement, their enrollments and the Idempotency-Keys read and the courses'
rows locked (in id order); each attempt checked in arrival order exactly as
``service.enroll`` would (same refusals, same bodies), then one seat-counter
UPDATE per course, one INSERT of the enrollments, one of the outbox events
and one of the remembered answers (refusals included), one commit — and each
attempt is answered. While a batch commits, the next one gathers.

The database stays the authority: ``0 <= seats_taken <= capacity`` is a CHECK
constraint, live enrollments are unique per (course, student), the counter
UPDATE is conditional, and remembered keys are inserted with ON CONFLICT DO
NOTHING RETURNING — a key another replica answered meanwhile rolls the whole
batch back. A batch that fails for any reason writes nothing (one
transaction); its attempts are then decided one at a time by the classic path
(``idempotency.begin`` + ``service.enroll``), so several replicas, retries and
crashes stay correct.

Sold out: once this process has seen a first-come course full, parents who
do not want the waitlist are answered together from one read instead of a
write transaction (``SoldOutReader``: one statement on PostgreSQL): "full",
written nowhere, only when everything read as committed now — the child, the
key, the course and its seats — says the decision would answer exactly that;
every other asker goes to the write batch. The mark only routes askers to
that read: a read that tells someone "full" renews it, one that finds a seat
free drops it, and so does this process freeing a seat (after its commit),
flagging the course or changing a window.

The batch runs Core statements on its session's connection (no ORM unit of
work or statement plugin here).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog
from fastapi.responses import Response
from sqlalchemy import (
    String,
    any_,
    bindparam,
    cast,
    literal_column,
    null,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chassis import idempotency
from chassis.auth import Principal
from chassis.db import Database, KeptConnection, utcnow
from chassis.errors import PROBLEM_MEDIA_TYPE, Problem, problem_body
from chassis.messaging import emit_many, idempotency_table, stage_events
from contracts import afterschool as ev
from services.afterschool import schemas, service
from services.afterschool.models import ACTIVE_STATUSES, Course, Enrollment, Plan, roster

courses_table = Course.__table__
log = structlog.get_logger("afterschool.rush")

MAX_BATCH = 500
# Kept connections for the write batches: two batches of one course are in
# flight at most (Enroller._work); batches of unrelated courses, which do not
# wait for each other, may be more — kept connections are added for them up
# to MAX_WRITERS (a school opening its whole menu at once), then the pool's.
PIPELINE_DEPTH = 2
MAX_WRITERS = 4
# The connections the rush keeps plan every statement by its index. In a
# rush the enrollments, keys and outbox tables grow far faster than
# autovacuum analyzes them, and PostgreSQL plans on the old statistics: with
# a table it believes tiny it flattens the LATERAL key look-up into a hash
# join over a sequential scan, and scans the enrollments and the
# guardianships whole — per batch, costs growing with the table (auto_explain
# in the bench: most batches' statements over 4 ms, PostgreSQL's CPU per
# enrollment doubling in the bench's later phases). Every statement there is
# a look-up by key that an index serves; `enable_seqscan = off` only makes
# a scan the planner's last resort, so a statement with no index still runs.
INDEX_PLANS = {"enable_seqscan": "off"}
# Sold-out reads (no locks) run side by side: an asker waits for a reader to
# be free, not for the one read in flight to finish.
SOLD_READERS = 2
_TRACE_FILE = os.environ.get("AS_RUSH_TRACE")
_TRACE = open(_TRACE_FILE, "a", buffering=1) if _TRACE_FILE else None
if _TRACE is not None:
    # ... and one line per garbage collection pause: gc, generation, ms.
    _gc_started = [0.0]

    def _gc_trace(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _gc_started[0] = time.perf_counter()
        elif _TRACE is not None:
            ms = (time.perf_counter() - _gc_started[0]) * 1000
            _TRACE.write(f"gc {info['generation']} {ms:.3f}\n")

    gc.callbacks.append(_gc_trace)


@dataclass
class Attempt:
    principal: Principal
    data: schemas.EnrollIn
    join_waitlist: bool
    claim: idempotency.IdempotentRequest
    # Answered with a Response, or a Problem (a refusal, as a value: see
    # api.enroll); set_exception only for failures.
    future: asyncio.Future[Response | Problem] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Mine:
    """A live enrollment as ``service.check_attempt`` reads it."""

    id: str
    course_id: str
    status: str
    name: str
    weekdays: list[int]
    start: Any
    end: Any


class _SinglePath(Exception):
    """Marks an attempt the batch leaves to the one-at-a-time path."""


SINGLE_PATH = _SinglePath()


class BatchLost(Exception):
    """A key of the batch was answered elsewhere meanwhile: undo the batch."""


def _among(db: Database, column: Any, values: list[str]) -> Any:
    """``column IN values``; on PostgreSQL ``column = ANY(:array)``: one SQL
    text whatever the number of values, so the connection's prepared
    statement is reused (an expanding IN is a new statement, parsed, planned
    and prepared in an extra round trip, for every new list length)."""
    if db.is_sqlite:
        return column.in_(values)
    return column == any_(bindparam(None, values, type_=ARRAY(String)))


def _keys_among(table: Any, keys: list[tuple[str, str]]) -> Any:
    """SQLite: the rows of these (client, key) pairs."""
    return tuple_(table.c.client, table.c.key).in_(keys)


# The stored rows of (client, key) pairs on PostgreSQL: one point read of the
# primary key per pair (LATERAL). ``client = ANY(...) AND key = ANY(...)`` was
# planned as a scan of the whole table whenever it had grown since its last
# ANALYZE — as it always has in a rush (ms per batch, growing with the table).
_STORED_KEYS_PG = text(
    "SELECT k.* FROM unnest(CAST(:key_clients AS varchar[]), CAST(:key_names AS varchar[]))"
    " AS a(client, key) CROSS JOIN LATERAL (SELECT * FROM idempotency_keys"
    " WHERE client = a.client AND key = a.key) AS k"
).columns(*idempotency_table.c)


def _tagged_union(*parts: tuple[str, list[Any]]) -> Any:
    """Row sets of different shapes in one statement (one round trip):
    ``kind`` says which set a row is of, the other sets' columns are NULL,
    cast to the column's type (the result's types are the first select's:
    dates parsed on SQLite, as for the columns themselves)."""
    columns = [col for _, cols in parts for col in cols]
    selects = []
    for n, (kind, cols) in enumerate(parts):
        own = {id(col) for col in cols}
        row = []
        for col in columns:
            if id(col) in own:
                row.append(col)
            else:
                # Typed: PostgreSQL types a UNION's columns pairwise, and two
                # bare NULLs make a text column that a json one cannot join.
                typed = cast(null(), col.type)
                row.append(typed.label(col.name) if n == 0 else typed)
        selects.append(select(literal_column(f"'{kind}'", String).label("kind"), *row))
    return union_all(*selects)


def _in_list(is_sqlite: bool, column: Any, name: str) -> Any:
    """``column IN :name`` for a statement built once (see ``_among``)."""
    if is_sqlite:
        return column.in_(bindparam(name, expanding=True))
    return column == any_(bindparam(name, type_=ARRAY(String)))


# The batch's read statements are built once per dialect and bound to each
# batch's values at execution: building and cache-keying such a statement
# anew cost ~0.4-0.8 ms of CPU per batch.
@functools.cache
def _lock_children(is_sqlite: bool) -> Any:
    """Statement 1 of a batch: the children (``:student_ids``) locked in id
    order, a row per guardian."""
    s, g = roster.students, roster.guardianships
    return (
        select(s.c.id, s.c.school_id, s.c.active, g.c.guardian_id)
        .join(g, g.c.student_id == s.c.id)
        .where(_in_list(is_sqlite, s.c.id, "student_ids"))
        .order_by(s.c.id)
        .with_for_update(of=s)
    )


class _LockedCourse(NamedTuple):
    """A course as the batch decides on it (``service.COURSE_FOR_ENROLLMENT``)."""

    id: str
    name: str
    school_id: str
    plan_id: str
    status: str
    weekdays: list[int]
    start: Any
    end: Any
    capacity: int
    seats_taken: int
    waitlist_seq: int
    window_mode: str
    window_opens_at: Any
    window_closes_at: Any


assert _LockedCourse._fields == (
    "id",
    "name",
    *(col.name for col in service.COURSE_FOR_ENROLLMENT),
), "_LockedCourse must follow service.COURSE_FOR_ENROLLMENT"


@functools.cache
def _read_and_lock_courses(is_sqlite: bool) -> Any:
    """Statement 2 of a batch, in one round trip:

    - ``e``: every enrollment of the children (``:student_ids``), the caller
      keeps the live ones — a status filter here let PostgreSQL scan the
      whole partial index uq_enrollments_live whenever the table had grown
      since its last ANALYZE, as it always has in a rush;
    - ``k``: the stored rows of the batch's keys (PostgreSQL ``:key_clients``
      and ``:key_names``; SQLite ``:keys``, as pairs);
    - ``c``: the courses (``:course_ids``) locked in id order, with their
      plan's window — last, so the lock the next batch waits for is held
      for the shortest time; in a MATERIALIZED CTE, as FOR UPDATE is not
      allowed beside UNION.
    """
    theirs = (
        select(
            Enrollment.id.label("e_id"),
            Enrollment.course_id.label("e_course_id"),
            Enrollment.student_id.label("e_student_id"),
            Enrollment.status.label("e_status"),
            Course.name.label("e_name"),
            Course.weekdays.label("e_weekdays"),
            Course.start.label("e_start"),
            Course.end.label("e_end"),
        )
        .join(Course, Course.id == Enrollment.course_id)
        .where(_in_list(is_sqlite, Enrollment.student_id, "student_ids"))
        .subquery("theirs")
    )
    if is_sqlite:
        keys = idempotency_table
        stored = (
            select(keys)
            .where(tuple_(keys.c.client, keys.c.key).in_(bindparam("keys", expanding=True)))
            .subquery("stored")
        )
    else:
        stored = _STORED_KEYS_PG.subquery("stored")
    locked = (
        select(Course.id, Course.name, *service.COURSE_FOR_ENROLLMENT)
        .join(Plan, Plan.id == Course.plan_id)
        .where(_in_list(is_sqlite, Course.id, "course_ids"))
        .order_by(Course.id)
        .with_for_update(of=Course)
        .cte("locked_courses")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    return _tagged_union(
        ("e", list(theirs.c)),
        ("k", [stored.c[name].label(f"k_{name}") for name in _KEY_FIELDS]),
        ("c", [col.label(f"c_{col.name}") for col in locked.c]),
    )


def _read_and_lock_courses_params(
    is_sqlite: bool, course_ids: list[str], student_ids: list[str], keys: list[tuple[str, str]]
) -> dict[str, Any]:
    params: dict[str, Any] = {"course_ids": course_ids, "student_ids": student_ids}
    if is_sqlite:
        params["keys"] = keys
    else:
        params["key_clients"] = [client for client, _ in keys]
        params["key_names"] = [key for _, key in keys]
    return params


_ENROLLMENT_COLUMNS = {
    "id": "varchar",
    "course_id": "varchar",
    "plan_id": "varchar",
    "school_id": "varchar",
    "student_id": "varchar",
    "guardian_id": "varchar",
    "status": "varchar",
    "waitlist_position": "integer",
    "consent_at": "timestamptz",
    "consent_statement": "text",
    "created_at": "timestamptz",
    "held_from": "timestamptz",
    "withdrawn_at": "timestamptz",
}
_OUTBOX_COLUMNS = {
    "event_id": "varchar",
    "type": "varchar",
    "payload": "text",
    "created_at": "timestamptz",
    "attempts": "integer",
}
_KEY_FIELDS = (
    "client",
    "key",
    "fingerprint",
    "status",
    "response_status",
    "response_body",
    "content_type",
    "created_at",
)
_KEY_COLUMNS = {
    "client": "varchar",
    "key": "varchar",
    "fingerprint": "varchar",
    "status": "varchar",
    "response_status": "integer",
    "response_body": "bytea",
    "content_type": "varchar",
    "created_at": "timestamptz",
    "completed_at": "timestamptz",
}


def _unnest(prefix: str, columns: dict[str, str]) -> str:
    return ", ".join(f"CAST(:{prefix}{name} AS {kind}[])" for name, kind in columns.items())


# A batch's writes in one statement of one SQL text (PostgreSQL): the seat
# counters (conditional, as on SQLite), the enrollments, their outbox rows (in
# order: the outbox's position is the publishing order) and the remembered
# answers (a key answered elsewhere meanwhile skipped, so counted short).
_WRITE_PG = text(
    "WITH seats AS ("
    " UPDATE courses AS c SET seats_taken = c.seats_taken + v.taken,"
    " waitlist_seq = c.waitlist_seq + v.queued"
    " FROM unnest(CAST(:seat_course AS varchar[]), CAST(:seat_taken AS integer[]),"
    " CAST(:seat_queued AS integer[])) AS v(id, taken, queued)"
    " WHERE c.id = v.id AND c.seats_taken + v.taken <= c.capacity RETURNING c.id),"
    " held AS (INSERT INTO enrollments (" + ", ".join(_ENROLLMENT_COLUMNS) + ")"
    " SELECT * FROM unnest(" + _unnest("e_", _ENROLLMENT_COLUMNS) + ") RETURNING id),"
    " events AS (INSERT INTO outbox (" + ", ".join(_OUTBOX_COLUMNS) + ")"
    " SELECT " + ", ".join(_OUTBOX_COLUMNS) + " FROM unnest(" + _unnest("o_", _OUTBOX_COLUMNS) + ")"
    " WITH ORDINALITY AS o(" + ", ".join(_OUTBOX_COLUMNS) + ", n) ORDER BY n RETURNING 1)"
    " INSERT INTO idempotency_keys (" + ", ".join(_KEY_COLUMNS) + ")"
    " SELECT * FROM unnest(" + _unnest("k_", _KEY_COLUMNS) + ")"
    " ON CONFLICT DO NOTHING"
    " RETURNING key, (SELECT count(*) FROM seats) AS seats, (SELECT count(*) FROM held) AS held,"
    " (SELECT count(*) FROM events) AS events"
)


async def _write_pg(
    conn: Any,
    changed: dict[str, _Seats],
    rows: list[dict[str, Any]],
    outbox: list[dict[str, Any]],
    remembered: list[dict[str, Any]],
) -> bool:
    """The batch's writes on PostgreSQL; True when the batch is lost (a seat
    counter not updated or a key taken meanwhile): the caller undoes it."""
    params: dict[str, Any] = {
        "seat_course": list(changed),
        "seat_taken": [left.taken for left in changed.values()],
        "seat_queued": [left.queued for left in changed.values()],
    }
    params.update({f"e_{name}": [row[name] for row in rows] for name in _ENROLLMENT_COLUMNS})
    params.update({f"o_{name}": [row[name] for row in outbox] for name in _OUTBOX_COLUMNS})
    params.update({f"k_{name}": [row[name] for row in remembered] for name in _KEY_COLUMNS})
    result = (await conn.execute(_WRITE_PG, params)).all()
    return (
        len(result) != len(remembered)
        or result[0].seats != len(changed)
        or result[0].held != len(rows)
        or result[0].events != len(outbox)
    )


def _problem_response(problem: Problem) -> tuple[int, bytes, str]:
    body = json.dumps(problem_body(None, problem), ensure_ascii=False).encode()
    return problem.status, body, PROBLEM_MEDIA_TYPE


def _answer(attempt: Attempt, answer: Response | BaseException) -> None:
    """A refusal (Problem) as the future's value, other failures raised."""
    if isinstance(answer, Problem) or not isinstance(answer, BaseException):
        attempt.future.set_result(answer)
    else:
        attempt.future.set_exception(answer)


class Enroller:
    """The enrollment queue of one process (kept in the service context)."""

    def __init__(self, db: Database, gate: asyncio.Semaphore) -> None:
        self.db = db
        self.gate = gate
        self.queue: list[Attempt] = []
        self.worker: asyncio.Task[None] | None = None
        self.sold_queue: list[Attempt] = []
        self.sold_readers = 0
        self.sold_tasks: set[asyncio.Task[None]] = set()
        self.pg_reader = None if db.is_sqlite else SoldOutReader(db)
        self.writers = [KeptConnection(db, settings=INDEX_PLANS) for _ in range(PIPELINE_DEPTH)]
        self.idle_writers = list(self.writers)
        self.batch_tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        # Batches undone and decided one by one: a few under faults (a key
        # answered by another replica, a lost connection); a steady count
        # means the batch path itself is broken and every parent pays for it.
        self.batch_failures = 0

    async def submit(self, attempt: Attempt) -> Response | Problem:
        self._enqueue(attempt)
        return await asyncio.shield(attempt.future)

    def _enqueue(self, attempt: Attempt) -> None:
        self.queue.append(attempt)
        if self.worker is None:
            self.worker = asyncio.create_task(self._work())

    async def ask_sold_out(self, attempt: Attempt) -> Response | Problem:
        """A no-waitlist attempt for a course known full: answered with the
        other such attempts waiting from one read, or else by the write batch."""
        self.sold_queue.append(attempt)
        if self.sold_readers < (1 if self.pg_reader is not None else SOLD_READERS):
            self.sold_readers += 1
            reader = asyncio.create_task(self._sold_work())
            self.sold_tasks.add(reader)
            reader.add_done_callback(self.sold_tasks.discard)
        return await asyncio.shield(attempt.future)

    async def _sold_work(self) -> None:
        try:
            while self.sold_queue:
                batch = self.sold_queue[:MAX_BATCH]
                del self.sold_queue[:MAX_BATCH]
                try:
                    if self.pg_reader is not None:
                        answers = await self.pg_reader.answers(batch)
                    else:
                        async with self.gate:
                            answers = await sold_out_answers(self.db, batch)
                except Exception:
                    answers = [None] * len(batch)
                for attempt, answer in zip(batch, answers, strict=True):
                    if attempt.future.done():
                        continue
                    if answer is None:
                        self._enqueue(attempt)
                    else:
                        _answer(attempt, answer)
        finally:
            # No await between the empty queue seen and this: an asker who
            # comes next starts a reader.
            self.sold_readers -= 1

    async def close(self) -> None:
        """Give back the sold-out reader's and the batches' connections (at
        shutdown, once the batches in flight are answered)."""
        if self.batch_tasks:
            await asyncio.wait(set(self.batch_tasks), timeout=5)
        if self.pg_reader is not None:
            await self.pg_reader.close()
        for writer in self.writers:
            await writer.close()

    async def _work(self) -> None:
        """Batches in arrival order, pipelined: the next batch starts as soon
        as this one holds its row locks (children, then courses), so its
        BEGIN and key look-up overlap this one's writes and commit, and it
        waits in the database for the course behind this one — never ahead
        of it: its attempts came later, and first come stays first served.
        Taking its locks only after this one holds all of its own, it can
        wait for this one but never the reverse (no deadlock). Each
        round trip of a batch waits behind the requests the busy event loop
        serves meanwhile, so a batch's wall time is the rush's latency."""
        try:
            while self.queue:
                batch = self.queue[:MAX_BATCH]
                del self.queue[:MAX_BATCH]
                locked = asyncio.Event()
                task = asyncio.create_task(self._run(batch, locked))
                self.batch_tasks.add(task)
                task.add_done_callback(self.batch_tasks.discard)
                await locked.wait()
        finally:
            self.worker = None

    async def _run(self, batch: list[Attempt], locked: asyncio.Event) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            await self._run_batch(batch, locked)
        finally:
            locked.set()  # a batch that failed or took no lock holds up no other
        if _TRACE is not None:
            t1 = time.perf_counter()
            _TRACE.write(
                f"{time.time():.3f} {len(batch)} {(t0 - batch[0].queued_at) * 1000:.2f}"
                f" {(t1 - t0) * 1000:.2f} {(time.process_time() - c0) * 1000:.2f}"
                f" {len(self.queue)}\n"
            )

    async def _run_batch(self, batch: list[Attempt], locked: asyncio.Event) -> None:
        generations = {
            a.data.course_id: service.sold_out_generation(a.data.course_id) for a in batch
        }
        writer = self._idle_writer()
        try:
            for tries_left in (1, 0):
                try:
                    async with self.gate:
                        answers, now_full = await decide(self.db, batch, writer, locked)
                    self.batches += 1
                    break
                except Exception as exc:
                    self.batch_failures += 1
                    lost = isinstance(exc, BatchLost)
                    log.warning(
                        "rush_batch_failed",
                        attempts=len(batch),
                        error=f"{type(exc).__name__}: {exc}",
                        again_as_batch=lost and tries_left > 0,
                    )
                    if lost and tries_left:
                        # One of its keys was answered meanwhile (a tap retried
                        # across two batches, another replica): decided again
                        # it reads that answer and replays it, instead of every
                        # attempt of the batch taking the single path.
                        continue
                    # Nothing of the batch was written: decide one at a time
                    # (the next batch waits for these, unless this one held
                    # its locks).
                    for attempt in batch:
                        await self._one(attempt)
                    return
        finally:
            if writer is not None:
                self.idle_writers.append(writer)
        for course_id in now_full:
            service.mark_sold_out(course_id, generations[course_id])
        for attempt, answer in zip(batch, answers, strict=True):
            if attempt.future.done():
                continue
            if answer is SINGLE_PATH:
                await self._one(attempt)
            else:
                _answer(attempt, answer)

    def _idle_writer(self) -> KeptConnection | None:
        if self.idle_writers:
            return self.idle_writers.pop()
        if len(self.writers) < MAX_WRITERS:
            writer = KeptConnection(self.db, settings=INDEX_PLANS)
            self.writers.append(writer)
            return writer
        return None  # the pool's: planned on its statistics, still correct

    async def _one(self, attempt: Attempt) -> None:
        async def work(session: AsyncSession) -> Any:
            return await service.enroll(
                session, attempt.principal, attempt.data, join_waitlist=attempt.join_waitlist
            )

        try:
            async with self.gate:
                claim = await idempotency.claim_key(self.db, attempt.claim)
                if isinstance(claim, Response):
                    answer = claim
                else:
                    answer = await idempotency.run(self.db, claim, work, status_code=201)
        except BaseException as exc:  # answered to the waiting request
            if not attempt.future.done():
                _answer(attempt, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not attempt.future.done():
            attempt.future.set_result(answer)


class SoldOutReader:
    """PostgreSQL: the sold-out askers waiting, answered from ONE statement on
    a connection kept for it — no pool checkout, pre-ping or BEGIN/COMMIT per
    read (each a round trip and PostgreSQL CPU paid per read: they were most
    of a sold-out answer's database cost).

    The statement reads, per asker, everything "full" depends on as it is
    committed now: the child (the caller's own? active? of which school?),
    whether the child holds any live enrollment, whether the
    Idempotency-Key already holds something, and the course with its
    window (school, status, seats, mode). "Full" only when the decision
    would say exactly that (``service.check_attempt`` passes and no seat is
    free); anything else — a stored key (replayed by the write batch), a
    stranger, a free seat, a child with live enrollments (already enrolled
    or a slot clash come first) — goes to the write batch. A read that tells
    someone "full" renews this process's mark, so a mark never lapses into a
    write transaction while the course stays full; one read with a free seat
    drops it. Reads only; any failure drops the connection and hands the askers to
    the write batch."""

    # Each lookup is a LATERAL point read by an index, whatever the planner's
    # statistics say: in a rush the keys and enrollments tables grow faster
    # than autovacuum analyzes them, and an EXISTS was planned as a hashed
    # scan of the whole keys table (ms per read). The live enrollments are
    # counted over the student's rows (ix_enrollments_student_id), not
    # filtered by status in the WHERE, which picked a full scan of the
    # partial index uq_enrollments_live.
    SQL = """
        SELECT s.school_id, coalesce(s.active, false), g.own IS NOT NULL,
               e.live > 0, k.stored IS NOT NULL,
               c.school_id, c.status, c.seats_taken >= c.capacity,
               p.window_mode, p.window_opens_at, p.window_closes_at
        FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[],
                    $5::varchar[]) WITH ORDINALITY AS a(student, guardian, client, key, course, i)
        LEFT JOIN roster_students s ON s.id = a.student
        LEFT JOIN LATERAL (SELECT true AS own FROM roster_guardianships
                           WHERE student_id = a.student AND guardian_id = a.guardian
                           LIMIT 1) g ON true
        LEFT JOIN LATERAL (SELECT count(*) FILTER (
                                  WHERE status IN ('applied', 'held', 'waitlisted')) AS live
                           FROM enrollments WHERE student_id = a.student) e ON true
        LEFT JOIN LATERAL (SELECT true AS stored FROM idempotency_keys
                           WHERE client = a.client AND key = a.key
                           LIMIT 1) k ON true
        LEFT JOIN courses c ON c.id = a.course
        LEFT JOIN plans p ON p.id = c.plan_id
        ORDER BY a.i
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Any = None
        self._statement: Any = None

    async def answers(self, batch: Sequence[Attempt]) -> list[Problem | None]:
        generations = _generations(batch)
        rows = await self._fetch(batch)
        courses = {
            a.data.course_id: _CourseNow(*row[5:]) for a, row in zip(batch, rows, strict=True)
        }
        askers = [_Asker(*row[:5]) for row in rows]
        return _told_full_or_not(batch, askers, courses, generations)

    async def _fetch(self, batch: Sequence[Attempt]) -> list[Any]:
        if self._statement is None:
            conn = await self.db.engine.connect()
            try:
                raw = await conn.get_raw_connection()
                for name, value in INDEX_PLANS.items():
                    await raw.driver_connection.execute(f"SET {name} = {value}")
                self._statement = await raw.driver_connection.prepare(self.SQL)
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                raise
            self._conn = conn
        try:
            return list(
                await self._statement.fetch(
                    [a.data.student_id for a in batch],
                    [a.principal.person_id or "" for a in batch],
                    [a.claim.client for a in batch],
                    [a.claim.key for a in batch],
                    [a.data.course_id for a in batch],
                )
            )
        except BaseException:
            conn, self._conn, self._statement = self._conn, None, None
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise

    async def close(self) -> None:
        conn, self._conn, self._statement = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()  # its INDEX_PLANS must not reach the pool


@dataclass
class _Asker:
    """What "full" depends on of one sold-out asker, as committed now."""

    school_id: str | None
    active: bool
    own_child: bool
    has_live_enrollment: bool
    key_stored: bool


def _generations(batch: Sequence[Attempt]) -> dict[str, tuple[int, int]]:
    return {a.data.course_id: service.sold_out_generation(a.data.course_id) for a in batch}


class _CourseNow(NamedTuple):
    """The course as a sold-out read finds it (all None: no such course)."""

    school_id: str | None
    status: str | None
    full: bool | None
    window_mode: str | None
    window_opens_at: Any
    window_closes_at: Any


def _told_full_or_not(
    batch: Sequence[Attempt],
    askers: Sequence[_Asker],
    courses: dict[str, _CourseNow],
    generations: dict[str, tuple[int, int]],
) -> list[Problem | None]:
    """ "Full" where the decision would say exactly that — the caller's own
    active child with no live enrollment, a key holding nothing,
    ``service.check_attempt`` passing, a first-come course with no seat free —
    else None: the write batch decides. A course someone was told full of
    keeps its mark; one read with a seat free, or not first-come, loses it."""
    now = utcnow()
    told: set[str] = set()
    answers: list[Problem | None] = []
    for a, asker in zip(batch, askers, strict=True):
        course = courses[a.data.course_id]
        full = (
            bool(course.full)
            and course.window_mode != "lottery"
            and asker.own_child
            and asker.active
            and not asker.has_live_enrollment
            and not asker.key_stored
            and a.principal.has_role("parent")
            and _passes_checks(asker.school_id, course, a.data, now)
        )
        if full:
            told.add(a.data.course_id)
        answers.append(service.full() if full else None)
    for course_id, course in courses.items():
        if course_id in told:
            service.mark_sold_out(course_id, generations[course_id])
        elif not course.full or course.window_mode == "lottery":
            service.forget_sold_out_course(course_id)
    return answers


def _passes_checks(
    school_id: str | None, course: _CourseNow, data: schemas.EnrollIn, now: Any
) -> bool:
    """``service.check_attempt`` for a child with no live enrollment (so no
    duplicate or clash): the course exists at the child's school, consent,
    the window open, the course active."""
    try:
        service.check_attempt(school_id or "", course, data, (), now)
    except Problem:
        return False
    return True


async def sold_out_answers(db: Database, batch: Sequence[Attempt]) -> list[Problem | None]:
    """SQLite: the same reads as ``SoldOutReader``'s statement, as a few Core
    queries in one read transaction (SQLite has no unnest)."""
    s, g, k, e = roster.students, roster.guardianships, idempotency_table, Enrollment.__table__
    generations = _generations(batch)
    keys = list({(a.claim.client, a.claim.key) for a in batch})
    student_ids = list({a.data.student_id for a in batch})
    course_ids = list({a.data.course_id for a in batch})
    async with db.read() as session:
        conn = await session.connection()
        stored = {
            (row.client, row.key)
            for row in await conn.execute(select(k.c.client, k.c.key).where(_keys_among(k, keys)))
        }
        students: dict[str, Any] = {}
        guardians: dict[str, set[str]] = {}
        for row in await conn.execute(
            select(s.c.id, s.c.school_id, s.c.active, g.c.guardian_id)
            .join(g, g.c.student_id == s.c.id)
            .where(_among(db, s.c.id, student_ids))
        ):
            students[row.id] = row
            guardians.setdefault(row.id, set()).add(row.guardian_id)
        enrolled = {
            row.student_id
            for row in await conn.execute(
                select(e.c.student_id, e.c.status).where(_among(db, e.c.student_id, student_ids))
            )
            if row.status in ACTIVE_STATUSES  # (as in decide: the student's index)
        }
        course_rows = {
            row.id: _CourseNow(*row[1:])
            for row in await conn.execute(
                select(
                    Course.id,
                    Course.school_id,
                    Course.status,
                    Course.seats_taken >= Course.capacity,
                    Plan.window_mode,
                    Plan.window_opens_at,
                    Plan.window_closes_at,
                )
                .join(Plan, Plan.id == Course.plan_id)
                .where(_among(db, Course.id, course_ids))
            )
        }
    askers = []
    for a in batch:
        student = students.get(a.data.student_id)
        askers.append(
            _Asker(
                student.school_id if student is not None else None,
                bool(student is not None and student.active),
                a.principal.person_id in guardians.get(a.data.student_id, ()),
                a.data.student_id in enrolled,
                (a.claim.client, a.claim.key) in stored,
            )
        )
    missing = _CourseNow(None, None, None, None, None, None)
    courses = {cid: course_rows.get(cid, missing) for cid in course_ids}
    return _told_full_or_not(batch, askers, courses, generations)


@dataclass
class _Seats:
    """A course's seats as the batch hands them out."""

    free: int
    seq: int
    taken: int = 0
    queued: int = 0


async def decide(
    db: Database,
    batch: Sequence[Attempt],
    writer: KeptConnection | None = None,
    locked: asyncio.Event | None = None,
) -> tuple[list[Response | BaseException], dict[str, Any]]:
    """Decide a batch of attempts (any courses) in one transaction (on the
    writer's kept connection when given); returns each attempt's answer and
    the first-come courses full afterwards (with their rows as read: school,
    status, window). `locked` is set once the batch holds its row locks."""
    answers: list[Response | BaseException | None] = [None] * len(batch)
    keyed: dict[tuple[str, str], int] = {}  # (client, key) -> first attempt index
    fresh: list[int] = []
    for i, a in enumerate(batch):
        k = (a.claim.client, a.claim.key)
        if k in keyed:
            continue  # a repeat inside the batch: answered like the first, below
        keyed[k] = i
    now = utcnow()
    async with writer.transaction() if writer is not None else db.transaction() as session:
        # Core statements on the session's connection: the ORM's unit of work
        # and its per-statement plugin are not needed on this path.
        conn = await session.connection()
        # 1. The children of every attempt locked, in id order (then the
        #    courses: the order every enrollment transaction takes its locks in).
        student_ids = sorted({a.data.student_id for a in batch})
        students: dict[str, dict[str, Any]] = {}
        guardians: dict[str, set[str]] = {}
        for row in await conn.execute(_lock_children(db.is_sqlite), {"student_ids": student_ids}):
            students[row.id] = {"id": row.id, "school_id": row.school_id, "active": row.active}
            guardians.setdefault(row.id, set()).add(row.guardian_id)
        # 2. In one statement, read after those locks are held: the
        #    children's enrollments and the batch's stored keys, then the
        #    courses locked. Still current when the courses' lock is granted
        #    (it may wait for the batch before this one): every change to a
        #    child's enrollments, and every answer stored for a child's
        #    request, is made holding the child's lock — so a key retried
        #    while its first attempt was in the batch before is seen here as
        #    answered, not claimed twice.
        course_ids = sorted({a.data.course_id for a in batch})
        courses: dict[str, Any] = {}
        mine: dict[str, list[Any]] = {sid: [] for sid in student_ids}
        existing: dict[tuple[str, str], dict[str, Any]] = {}
        params = _read_and_lock_courses_params(db.is_sqlite, course_ids, student_ids, list(keyed))
        for row in await conn.execute(_read_and_lock_courses(db.is_sqlite), params):
            if row.kind == "c":
                courses[row.c_id] = _LockedCourse(
                    *(getattr(row, f"c_{name}") for name in _LockedCourse._fields)
                )
            elif row.kind == "k":
                existing[(row.k_client, row.k_key)] = {
                    name: getattr(row, f"k_{name}") for name in _KEY_FIELDS
                }
            elif row.e_status in ACTIVE_STATUSES:
                mine[row.e_student_id].append(
                    _Mine(
                        row.e_id,
                        row.e_course_id,
                        row.e_status,
                        row.e_name,
                        row.e_weekdays,
                        row.e_start,
                        row.e_end,
                    )
                )
        if locked is not None:
            locked.set()
        # Keys this batch does not own: replays and refusals, written nowhere.
        for k, i in keyed.items():
            stored = existing.get(k)
            if stored is None:
                fresh.append(i)
                continue
            claim = batch[i].claim
            if (
                stored["status"] != "done"
                and stored["fingerprint"] == claim.fingerprint
                and stored["created_at"] <= claim.claimed_at - idempotency.CLAIM_LEASE
            ):
                # A claim left by a request that died: the single path takes it over.
                answers[i] = SINGLE_PATH
                continue
            try:
                answers[i] = idempotency.stored_answer(stored, claim)
            except Problem as problem:
                answers[i] = problem
        seats = {
            cid: _Seats(max(0, c.capacity - c.seats_taken), c.waitlist_seq)
            for cid, c in courses.items()
        }
        # 3. Each attempt in arrival order, as service.enroll decides it.
        rows: list[dict[str, Any]] = []
        events: list[ev.EnrollmentChanged] = []
        remembered: list[dict[str, Any]] = []
        for i in fresh:
            a = batch[i]
            data = a.data
            course_id = data.course_id
            course = courses.get(course_id)
            try:
                student = students.get(data.student_id)
                if (
                    student is None
                    or not student["active"]
                    or not a.principal.has_role("parent")
                    or a.principal.person_id not in guardians.get(data.student_id, ())
                ):
                    raise Problem(404, "学生不存在。")
                service.check_attempt(
                    student["school_id"], course, data, mine[data.student_id], now
                )
                assert course is not None
                left = seats[course_id]
                position: int | None = None
                held_from = None
                if course.window_mode == "lottery":
                    status = "applied"
                elif left.taken < left.free:
                    status, held_from = "held", now
                    left.taken += 1
                elif not a.join_waitlist:
                    raise service.full()
                else:
                    left.queued += 1
                    status, position = "waitlisted", left.seq + left.queued
                enrollment_id = service.new_id()
                rows.append(
                    {
                        "id": enrollment_id,
                        "course_id": course_id,
                        "plan_id": course.plan_id,
                        "school_id": course.school_id,
                        "student_id": data.student_id,
                        "guardian_id": a.principal.person_id or "",
                        "status": status,
                        "waitlist_position": position,
                        "consent_at": now,
                        "consent_statement": data.consent_statement,
                        "created_at": now,
                        "held_from": held_from,
                        "withdrawn_at": None,
                    }
                )
                events.append(
                    ev.EnrollmentChanged(
                        id=enrollment_id,
                        course_id=course_id,
                        school_id=course.school_id,
                        student_id=data.student_id,
                        status=status,  # type: ignore[arg-type]
                        waitlist_position=position,
                        occurred_at=now,
                    )
                )
                mine[data.student_id].append(
                    _Mine(
                        enrollment_id,
                        course_id,
                        status,
                        course.name,
                        course.weekdays,
                        course.start,
                        course.end,
                    )
                )
                out = schemas.EnrollmentOut(
                    id=enrollment_id,
                    course_id=course_id,
                    student_id=data.student_id,
                    status=status,
                    waitlist_position=position,
                    consent_at=now,
                    created_at=now,
                )
                code, body, media = 201, out.model_dump_json().encode(), "application/json"
            except Problem as problem:
                code, body, media = _problem_response(problem)
            answers[i] = Response(body, status_code=code, media_type=media)
            remembered.append(
                {
                    "client": a.claim.client,
                    "key": a.claim.key,
                    "fingerprint": a.claim.fingerprint,
                    "status": "done",
                    "response_status": code,
                    "response_body": body,
                    "content_type": media,
                    "created_at": a.claim.claimed_at,
                    "completed_at": now,
                }
            )
        # 4. One write of each kind (on PostgreSQL the seats, enrollments,
        #    outbox rows and answers in one statement: one round trip).
        changed = {cid: left for cid, left in seats.items() if left.taken or left.queued}
        if not db.is_sqlite and remembered:
            if await _write_pg(conn, changed, rows, stage_events(session, events), remembered):
                raise BatchLost
        else:
            for course_id, left in changed.items():
                done = await conn.execute(
                    update(courses_table)
                    .where(
                        courses_table.c.id == course_id,
                        courses_table.c.seats_taken + left.taken <= courses_table.c.capacity,
                    )
                    .values(
                        seats_taken=courses_table.c.seats_taken + left.taken,
                        waitlist_seq=courses_table.c.waitlist_seq + left.queued,
                    )
                )
                if done.rowcount != 1:  # type: ignore[attr-defined]
                    raise BatchLost
            if rows:
                await conn.execute(Enrollment.__table__.insert(), rows)
                await emit_many(session, events)
            if remembered:
                inserted = (
                    await conn.execute(
                        sqlite_insert(idempotency_table)
                        .on_conflict_do_nothing()
                        .returning(idempotency_table.c.key),
                        remembered,
                    )
                ).all()
                if len(inserted) != len(remembered):
                    raise BatchLost  # another request took one of these keys meanwhile
    # Repeats of a key inside the batch get the first answer, as replays.
    for i, a in enumerate(batch):
        if answers[i] is not None:
            continue
        first = keyed[(a.claim.client, a.claim.key)]
        answer = answers[first]
        if first in fresh and a.claim.fingerprint == batch[first].claim.fingerprint:
            assert isinstance(answer, Response)
            answers[i] = Response(
                answer.body,
                status_code=answer.status_code,
                media_type=answer.media_type,
                headers={"Idempotent-Replayed": "true"},
            )
        elif first in fresh:
            answers[i] = Problem(
                422,
                f"该 {idempotency.HEADER} 已用于另一个不同的请求。",
                slug="idempotency/mismatch",
            )
        elif isinstance(answer, Response):
            answers[i] = Response(
                answer.body,
                status_code=answer.status_code,
                media_type=answer.media_type,
                headers={"Idempotent-Replayed": "true"},
            )
        else:
            answers[i] = answer
    now_full = {
        cid: courses[cid]
        for cid, left in seats.items()
        if courses[cid].window_mode != "lottery" and left.taken >= left.free
    }
    return [a for a in answers if a is not None], now_full


def sold_out_now(course_id: str) -> bool:
    return service.is_sold_out(course_id, time.monotonic())
