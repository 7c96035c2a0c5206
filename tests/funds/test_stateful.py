"""Hypothesis stateful test of the money rules against a simple model (FUND-04..09).

Random purchases, bank payments, lesson reports, confirmations, disputes,
auto-confirmations, refunds (requested, answered, executed), freezes and
unfreezes, payout batches and their execution run through the service's use
cases on a real database (SQLite, or PostgreSQL under ``make test-pg``).
After every step: every journal transaction sums to zero (and so does the
whole journal), no escrow/reserve/institution balance is negative, every
cached balance equals the sum of its entries, money in = money held +
released + refunded, and per institution the books match the model's
payments. At least 2,000 steps run in total.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import uuid
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy import func, select, text

from chassis.auth import Principal
from chassis.db import Database
from chassis.errors import Problem
from chassis.migrations import upgrade_async
from chassis.policy import PolicyRegistry
from chassis.roster import upsert
from contracts import institutions as inst
from contracts.base import Envelope
from services.funds import ledger, service
from services.funds.app import SPEC
from services.funds.models import Contract, Lesson, Payout, Refund, roster
from tests.funds.harness import facts

MIN_TOTAL_STEPS = 2000
STEPS_PER_RUN = 50
TODAY = service.today_in_china()
COUNTER = itertools.count()
STEPS = {"total": 0, "checked": 0}


class Env:
    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(upgrade_async(SPEC.migrations_dir, url))
        self.db = Database(url, service="funds")
        self.policies = PolicyRegistry.load()
        self.paid_in = 0  # the model's money in, over every run

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.run_until_complete(self.db.dispose())
        self.loop.close()


ENV: Env | None = None


class FundsMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        assert ENV is not None
        self.env = ENV
        n = next(COUNTER)
        self.inst_id = f"h{n}"
        self.bank = Principal(
            subject="bank", kind="user", roles=frozenset({"bank"}), tenants=frozenset({"bank:hb"})
        )
        self.institution = Principal(
            subject="inst",
            kind="user",
            roles=frozenset({"institution"}),
            tenants=frozenset({f"institution:{self.inst_id}"}),
        )
        self.guardian = f"g{n}"
        self.parent = Principal(
            subject=self.guardian, kind="user", roles=frozenset({"parent"}), person_id=self.guardian
        )
        self.prices = {f"{self.inst_id}-a": 997, f"{self.inst_id}-b": 3333}
        self.contracts: list[str] = []
        self.paid: dict[str, int] = {}
        self.frozen = False
        self.env.run(self._setup())

    async def _setup(self) -> None:
        await self._event(inst.LicenceGranted(**facts(self.inst_id)))
        async with self.env.db.transaction() as s:
            for course_id, price in self.prices.items():
                env = Envelope.wrap(
                    inst.CourseFiled(
                        institution_id=self.inst_id,
                        region_id="jinhua",
                        course_id=course_id,
                        name="课程",
                        subject="art",
                        subject_category="arts",
                        mode="offline",
                        target_grades=[3],
                        price_per_lesson_fen=price,
                        lesson_count=60,
                        lesson_minutes=45,
                        class_size_band="10to35",
                        period_start=TODAY - dt.timedelta(days=10),
                        period_end=TODAY + dt.timedelta(days=200),
                        filed_at=dt.datetime.now(dt.UTC),
                    ),
                    source="institutions",
                )
                await service.on_course_filed(s, env)
            for k in range(3):
                await upsert(
                    s,
                    roster.guardianships,
                    {
                        "guardian_id": self.guardian,
                        "student_id": f"{self.guardian}-s{k}",
                        "relation": "parent",
                        "synced_at": dt.datetime.now(dt.UTC),
                    },
                )
            await service.open_account(s, self.bank, "hb", self.inst_id, f"6222{self.inst_id}")

    async def _event(self, event: Any) -> None:
        async with self.env.db.transaction() as s:
            await service.on_institution_facts(s, Envelope.wrap(event, source="institutions"))

    def _try(self, coro: Any) -> Any:
        STEPS["total"] += 1
        try:
            return self.env.run(coro)
        except Problem as problem:
            assert problem.status < 500, problem.detail
            return None

    def _pick(self, i: int) -> str:
        return self.contracts[i % len(self.contracts)]

    async def _tx(self, fn: Any, *args: Any, **kw: Any) -> Any:
        async with self.env.db.transaction() as s:
            return await fn(s, *args, **kw)

    # -- rules -----------------------------------------------------------------

    @rule(
        lessons=st.integers(1, 8),
        course=st.sampled_from(["a", "b"]),
        kid=st.integers(0, 2),
        train_first=st.booleans(),
    )
    def purchase(self, lessons: int, course: str, kid: int, train_first: bool) -> None:
        course_id = f"{self.inst_id}-{course}"
        data = service.PurchaseInput(
            institution_id=self.inst_id,
            course_id=course_id,
            student_id=f"{self.guardian}-s{kid}",
            lessons=lessons,
            price_per_lesson_fen=self.prices[course_id],
            starts_on=TODAY,
            ends_on=TODAY + dt.timedelta(days=60),
            mode="train_first" if train_first else "prepaid",
        )
        contract = self._try(
            self._tx(service.purchase, self.env.policies, self.parent, data, TODAY)
        )
        if contract is not None:
            self.contracts.append(contract.id)
            self.paid[contract.id] = 0

    @precondition(lambda self: self.contracts)
    @rule(i=st.integers(0, 999), part=st.integers(1, 3))
    def pay(self, i: int, part: int) -> None:
        cid = self._pick(i)

        async def go() -> Any:
            async with self.env.db.read() as s:
                c = await s.get(Contract, cid)
            assert c is not None
            amount = c.total_fen if c.mode == "prepaid" else max(c.price_per_lesson_fen * part, 1)
            data = service.PaymentInput(
                cid, amount, f"B-{uuid.uuid4().hex[:16]}", "6217000011112222"
            )
            return await self._tx(service.confirm_payment, self.env.policies, "hb", data)

        payment = self._try(go())
        if payment is not None:
            self.paid[cid] += payment.amount_fen
            self.env.paid_in += payment.amount_fen

    @precondition(lambda self: self.contracts)
    @rule(i=st.integers(0, 999))
    def report(self, i: int) -> None:
        self._try(
            self._tx(
                service.report_lesson,
                self.env.policies,
                self.institution,
                self._pick(i),
                TODAY,
                TODAY,
            )
        )

    async def _reported(self, cid: str) -> str | None:
        async with self.env.db.read() as s:
            return await s.scalar(
                select(Lesson.id)
                .where(Lesson.contract_id == cid, Lesson.status == "reported")
                .order_by(Lesson.seq)
                .limit(1)
            )

    @precondition(lambda self: self.contracts)
    @rule(i=st.integers(0, 999), confirm=st.booleans())
    def answer(self, i: int, confirm: bool) -> None:
        lesson_id = self.env.run(self._reported(self._pick(i)))
        if lesson_id is None:
            return
        self._try(
            self._tx(
                service.answer_lesson,
                self.env.policies,
                self.parent,
                lesson_id,
                confirm=confirm,
                reason=None if confirm else "未上课",
                today=TODAY,
            )
        )

    @precondition(lambda self: self.contracts)
    @rule(i=st.integers(0, 999))
    def auto_confirm(self, i: int) -> None:
        lesson_id = self.env.run(self._reported(self._pick(i)))
        if lesson_id is None:
            return
        self._try(
            self._tx(
                service.answer_lesson,
                self.env.policies,
                None,
                lesson_id,
                confirm=True,
                reason=None,
                today=TODAY,
            )
        )

    @precondition(lambda self: self.contracts)
    @rule(i=st.integers(0, 999))
    def request_refund(self, i: int) -> None:
        self._try(
            self._tx(
                service.request_refund, self.env.policies, self.parent, self._pick(i), None, TODAY
            )
        )

    async def _open_refund(self, cid: str) -> str | None:
        async with self.env.db.read() as s:
            return await s.scalar(select(Refund.id).where(Refund.open_contract_id == cid))

    @precondition(lambda self: self.contracts)
    @rule(i=st.integers(0, 999), agree=st.booleans())
    def answer_refund(self, i: int, agree: bool) -> None:
        refund_id = self.env.run(self._open_refund(self._pick(i)))
        if refund_id is not None:
            self._try(self._tx(service.respond_refund, self.institution, refund_id, agree, None))

    @precondition(lambda self: self.contracts)
    @rule(i=st.integers(0, 999))
    def execute_refund(self, i: int) -> None:
        refund_id = self.env.run(self._open_refund(self._pick(i)))
        if refund_id is not None:
            self._try(
                self._tx(
                    service.execute_refund,
                    self.env.policies,
                    "hb",
                    refund_id,
                    f"R-{uuid.uuid4().hex[:16]}",
                    TODAY,
                )
            )

    @rule()
    def freeze(self) -> None:
        STEPS["total"] += 1
        self.env.run(
            self._event(
                inst.LicenceSuspended(
                    **facts(self.inst_id, status="suspended", can_charge=False, reason="整改")
                )
            )
        )
        self.frozen = True

    @precondition(lambda self: self.frozen)
    @rule()
    def unfreeze(self) -> None:
        STEPS["total"] += 1
        self.env.run(self._event(inst.LicenceReinstated(**facts(self.inst_id, reason="整改完成"))))
        self.frozen = False

    @rule()
    def payouts(self) -> None:
        payouts = self._try(self._tx(service.create_payouts, self.env.policies, "hb", TODAY))
        for payout in payouts or []:
            self._try(self._tx(service.execute_payout, "hb", payout.id, f"P-{uuid.uuid4().hex}"))

    @rule()
    def catch_up(self) -> None:
        """The sweep's catch-up releases (after an unfreeze) for this institution."""

        async def go() -> None:
            async with self.env.db.transaction() as s:
                ids = (
                    (
                        await s.execute(
                            select(Contract.id).where(Contract.institution_id == self.inst_id)
                        )
                    )
                    .scalars()
                    .all()
                )
                for cid in ids:
                    c = await service._lock_contract(s, cid)
                    assert c is not None
                    account = await service._account_shared(s, c.account_id)
                    policy = await service.funds_policy(s, self.env.policies, c.region_id, TODAY)
                    await service.settle(s, c, account, policy)

        self._try(go())

    # -- invariants ------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        if not hasattr(self, "env"):
            return
        STEPS["checked"] += 1
        self.env.run(self._check())

    async def _check(self) -> None:
        async with self.env.db.read() as s:
            tb = await ledger.trial_balance(s)
            assert tb.total_fen == 0, tb
            assert not tb.mismatched, tb.mismatched
            assert not tb.negative, tb.negative
            unbalanced = await s.execute(
                text("SELECT seq FROM journal_entries GROUP BY seq HAVING SUM(amount_fen) <> 0")
            )
            assert unbalanced.first() is None
            by_kind = dict(
                (
                    await s.execute(
                        text("SELECT kind, SUM(balance_fen) FROM ledger_accounts GROUP BY kind")
                    )
                ).all()
            )
            k = {key: int(v or 0) for key, v in by_kind.items()}
            money_in = -k.get(ledger.PARENT_PAYMENTS, 0)
            held = k.get(ledger.ESCROW, 0) + k.get(ledger.RESERVE, 0)
            released = (
                k.get(ledger.RELEASABLE, 0)
                + k.get(ledger.PAYOUT_INSTRUCTED, 0)
                + k.get(ledger.PAID_OUT, 0)
            )
            refunded = k.get(ledger.REFUNDS_PAID, 0)
            assert money_in == held + released + refunded
            assert money_in == self.env.paid_in
            # Per institution: its books hold exactly what parents paid into its contracts.
            codes = [ledger.escrow(c) for c in self.contracts] + [
                ledger.reserve(c) for c in self.contracts
            ]
            i = self.inst_id
            inst_codes = [
                ledger.releasable(i),
                ledger.payout_instructed(i),
                ledger.paid_out(i),
                ledger.refunds_paid(i),
            ]
            bal = await ledger.balances(s, codes + inst_codes)
            assert sum(bal.values()) == sum(self.paid.values())
            # Never more released than confirmed lessons earned, never more refunded than paid.
            rows = (await s.execute(select(Contract).where(Contract.institution_id == i))).scalars()
            for c in rows:
                assert c.released_gross_fen <= c.confirmed_lessons * c.price_per_lesson_fen
                assert c.released_gross_fen <= c.paid_fen
                assert c.refunded_fen <= c.paid_fen
                # What the contract still holds: never negative, never more than paid.
                held_c = bal[ledger.escrow(c.id)] + bal[ledger.reserve(c.id)]
                assert 0 <= held_c <= c.paid_fen - c.refunded_fen
                assert c.paid_fen == self.paid[c.id]
                assert c.confirmed_lessons + c.reported_lessons + c.refunded_lessons <= c.lessons
            open_refunds = await s.scalar(
                select(func.count())
                .select_from(Payout)
                .where(Payout.institution_id == i, Payout.status == "instructed")
            )
            assert open_refunds == 0


FundsMachine.TestCase.settings = settings(
    max_examples=MIN_TOTAL_STEPS // STEPS_PER_RUN + 20,
    stateful_step_count=STEPS_PER_RUN,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def test_fund09_stateful_money_model(databases: Any) -> None:
    global ENV
    loop = asyncio.new_event_loop()
    url = loop.run_until_complete(databases.url("funds"))
    loop.close()
    ENV = Env(url)
    try:
        FundsMachine.TestCase().runTest()
    finally:
        ENV.close()
        ENV = None
    # Steps after which every invariant was checked (each rule run counts).
    assert STEPS["checked"] >= MIN_TOTAL_STEPS, STEPS
