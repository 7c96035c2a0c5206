"""A funds service under test, fed with real institutions events through JetStream."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

import httpx
from sqlalchemy import select

from chassis.events import Bus
from chassis.roster import upsert
from contracts import institutions as inst
from contracts.base import Envelope, stream_of
from services.funds import ledger
from services.funds.api import sign
from services.funds.app import DEV_BANK_SECRET
from services.funds.models import Course, EscrowAccount, Institution, roster
from services.funds.service import today_in_china
from tests.support import auth, eventually

# The service's dates are China's (UTC+8); the machine's may be a day behind.
TODAY = today_in_china()


def facts(institution_id: str, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "institution_id": institution_id,
        "name": f"{institution_id} 培训学校",
        "region_id": "jinhua",
        "category": "arts",
        "department": "culture",
        "credit_code": "91330700MA2XXXXX0X",
        "licence_number": f"LIC-{institution_id}",
        "status": "licensed",
        "profit_status": "non_profit",
        "blacklisted": False,
        "reregistration_pending": False,
        "can_enroll": True,
        "can_charge": True,
        "reason": "审核通过",
        "actor": "bureau.jinhua",
        "occurred_at": dt.datetime.now(dt.UTC),
    }
    base.update(over)
    return base


class Funds:
    def __init__(self, svc: Any, mint: Any, nats_url: str) -> None:
        self.svc = svc
        self.client: httpx.AsyncClient = svc.client
        self.mint = mint
        self.nats_url = nats_url
        self.bus: Bus | None = None
        self.bank_token = mint("bank", tenants=["bank:bank-a"])
        self.auditor = mint("auditor")

    @property
    def db(self) -> Any:
        return self.svc.ctx.db

    async def close(self) -> None:
        if self.bus is not None:
            await self.bus.close()

    # -- events in ------------------------------------------------------------

    async def publish(self, event: Any) -> None:
        if self.bus is None:
            self.bus = Bus([self.nats_url], name="test-institutions")
            self.bus.start()
            await self.bus.wait_connected(10)
        env = Envelope.wrap(event, source="institutions")
        await self.bus.ensure_stream(stream_of(env.type))
        await self.bus.js.publish(
            env.type, env.model_dump_json().encode(), headers={"Nats-Msg-Id": env.id}
        )

    async def institution(self, institution_id: str) -> Institution | None:
        async with self.db.read() as s:
            return await s.get(Institution, institution_id)

    async def license(self, institution_id: str, **over: Any) -> None:
        await self.publish(inst.LicenceGranted(**facts(institution_id, **over)))

        async def seen() -> bool:
            row = await self.institution(institution_id)
            return row is not None and row.status == over.get("status", "licensed")

        await eventually(seen)

    async def event_and_wait(self, event: Any, check: Any) -> None:
        await self.publish(event)
        await eventually(check)

    async def file_course(
        self, institution_id: str, course_id: str, price: int = 10000, lessons: int = 60
    ) -> None:
        await self.publish(
            inst.CourseFiled(
                institution_id=institution_id,
                region_id="jinhua",
                course_id=course_id,
                name="少儿美术",
                subject="art",
                subject_category="arts",
                mode="offline",
                target_grades=[3, 4],
                price_per_lesson_fen=price,
                lesson_count=lessons,
                lesson_minutes=45,
                class_size_band="10to35",
                period_start=TODAY - dt.timedelta(days=30),
                period_end=TODAY + dt.timedelta(days=365),
                filed_at=dt.datetime.now(dt.UTC),
            )
        )

        async def seen() -> bool:
            async with self.db.read() as s:
                return await s.get(Course, course_id) is not None

        await eventually(seen)

    async def family(self, guardian_id: str, *student_ids: str) -> str:
        async with self.db.transaction() as s:
            for sid in student_ids:
                await upsert(
                    s,
                    roster.guardianships,
                    {
                        "guardian_id": guardian_id,
                        "student_id": sid,
                        "relation": "parent",
                        "synced_at": dt.datetime.now(dt.UTC),
                    },
                )
        return self.mint("parent", tenants=["region:jinhua"], person_id=guardian_id)

    # -- HTTP -----------------------------------------------------------------

    async def post(
        self, path: str, token: str, body: Any, *, key: str | None = None, signed: bool = False
    ) -> httpx.Response:
        raw = json.dumps(body).encode()
        headers = {**auth(token), "Content-Type": "application/json"}
        headers["Idempotency-Key"] = key or str(uuid.uuid4())
        if signed:
            headers["X-Bank-Signature"] = sign(DEV_BANK_SECRET, int(time.time()), raw)
        return await self.client.post(path, content=raw, headers=headers)

    async def open_account(self, institution_id: str, bank: str = "bank-a") -> dict[str, Any]:
        token = self.bank_token if bank == "bank-a" else self.mint("bank", tenants=[f"bank:{bank}"])
        r = await self.post(
            "/accounts",
            token,
            {
                "institution_id": institution_id,
                "bank_id": bank,
                "account_number": f"6222{institution_id}",
            },
        )
        assert r.status_code == 201, r.text
        return r.json()

    async def ready_institution(
        self, institution_id: str, course_id: str, price: int = 10000, lessons: int = 60
    ) -> dict[str, Any]:
        await self.license(institution_id)
        await self.file_course(institution_id, course_id, price, lessons)
        return await self.open_account(institution_id)

    def purchase_body(
        self,
        institution_id: str,
        course_id: str,
        student_id: str,
        lessons: int = 10,
        price: int = 10000,
        **over: Any,
    ) -> dict[str, Any]:
        body = {
            "institution_id": institution_id,
            "course_id": course_id,
            "student_id": student_id,
            "lessons": lessons,
            "price_per_lesson_fen": price,
            "starts_on": TODAY.isoformat(),
            "ends_on": (TODAY + dt.timedelta(days=60)).isoformat(),
        }
        body.update(over)
        return body

    async def buy(self, parent: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.post("/contracts", parent, body)
        assert r.status_code == 201, r.text
        return r.json()

    async def pay(self, contract: dict[str, Any], amount: int | None = None) -> httpx.Response:
        return await self.post(
            "/bank/payments",
            self.bank_token,
            {
                "contract_id": contract["id"],
                "amount_fen": contract["total_fen"] if amount is None else amount,
                "bank_ref": f"PAY-{uuid.uuid4().hex[:12]}",
                "payer_account": "6217000011112222",
            },
            signed=True,
        )

    async def paid_contract(
        self,
        parent: str,
        institution_id: str,
        course_id: str,
        student_id: str,
        lessons: int = 10,
        price: int = 10000,
    ) -> dict[str, Any]:
        contract = await self.buy(
            parent, self.purchase_body(institution_id, course_id, student_id, lessons, price)
        )
        r = await self.pay(contract)
        assert r.status_code == 201, r.text
        return contract

    async def report(self, contract_id: str, institution_id: str) -> httpx.Response:
        token = self.mint("institution", tenants=[f"institution:{institution_id}"])
        return await self.post(
            f"/contracts/{contract_id}/lessons", token, {"delivered_on": TODAY.isoformat()}
        )

    async def answer(self, lesson_id: str, parent: str, confirm: bool = True) -> httpx.Response:
        return await self.post(f"/lessons/{lesson_id}/answer", parent, {"confirm": confirm})

    async def contract(self, contract_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/contracts/{contract_id}", headers=auth(self.auditor))
        assert r.status_code == 200, r.text
        return r.json()

    async def balance(self, code: str) -> int:
        async with self.db.read() as s:
            return await ledger.balance(s, code)

    async def account_row(self, institution_id: str) -> EscrowAccount | None:
        async with self.db.read() as s:
            return await s.scalar(
                select(EscrowAccount).where(EscrowAccount.institution_id == institution_id)
            )

    async def check_books(self) -> None:
        """FUND-09: the journal sums to zero, caches match entries, the chain verifies."""
        r = await self.client.get("/audit/trial-balance", headers=auth(self.auditor))
        assert r.status_code == 200, r.text
        tb = r.json()
        assert tb["ok"], tb
        r = await self.client.get("/audit/chain", headers=auth(self.auditor))
        assert r.json()["ok"], r.json()
