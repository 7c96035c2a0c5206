"""FUND-09 crash: the funds service process, SIGKILLed during a stream of
money requests, leaves no half transaction; the chain verifies afterwards and
every contract's rows agree with its journal; the restarted service goes on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from services.funds import ledger
from services.funds.api import sign
from services.funds.app import DEV_BANK_SECRET
from services.funds.models import Contract, JournalEntry, JournalTransaction
from tests.conftest import AUDIENCE, ISSUER
from tests.funds.harness import Funds
from tests.support import auth

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _jwks_server(jwks: dict[str, Any]) -> ThreadingHTTPServer:
    body = json.dumps(jwks).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _start(funds: Funds, jwks_url: str, nats_url: str, port: int, log: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FUNDS_DATABASE_URL": funds.db.url,
        "FUNDS_RUN_MIGRATIONS": "false",
        "NATS_URL": nats_url,
        "AUTH_JWKS_URL": jwks_url,
        "AUTH_ISSUER": ISSUER,
        "AUTH_AUDIENCE": AUDIENCE,
        "LOG_LEVEL": "WARNING",
        "VAR_DIR": str(log.parent),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "serve", "funds", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def _healthy(base: str, proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "funds process exited"
            try:
                if (await client.get(f"{base}/healthz", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("funds process did not start")


async def test_fund09_service_killed_mid_stream_leaves_no_half_transaction(
    funds: Funds, issuer: Any, nats_server: Any, tmp_path: Path
) -> None:
    await funds.ready_institution("i1", "c1", price=1000)
    parent = await funds.family("g1", *(f"s{i}" for i in range(8)))
    contracts = [
        await funds.paid_contract(parent, "i1", "c1", f"s{i}", lessons=50, price=1000)
        for i in range(4)
    ]
    unpaid = [
        await funds.buy(parent, funds.purchase_body("i1", "c1", f"s{i}", lessons=5, price=1000))
        for i in range(4, 8)
    ]
    lessons = [
        [(await funds.report(c["id"], "i1")).json()["id"] for _ in range(40)] for c in contracts
    ]

    jwks = _jwks_server(issuer.jwks())
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    jwks_url = f"http://127.0.0.1:{jwks.server_address[1]}/jwks.json"
    proc = _start(funds, jwks_url, nats_server.url, port, tmp_path / "funds.log")
    try:
        await _healthy(base, proc)
        ok = 0
        stop = asyncio.Event()

        async def post(client: httpx.AsyncClient, path: str, token: str, body: Any) -> None:
            nonlocal ok
            raw = json.dumps(body).encode()
            headers = {
                **auth(token),
                "Content-Type": "application/json",
                "Idempotency-Key": str(uuid.uuid4()),
                "X-Bank-Signature": sign(DEV_BANK_SECRET, int(time.time()), raw),
            }
            try:
                r = await client.post(base + path, content=raw, headers=headers, timeout=10)
            except httpx.HTTPError:
                stop.set()  # the process is gone
                return
            assert r.status_code in (200, 201, 409), r.text
            ok += r.status_code in (200, 201)

        async def confirmer(ids: list[str]) -> None:
            async with httpx.AsyncClient() as client:
                for i in range(0, len(ids), 2):
                    if stop.is_set():
                        return
                    if i % 4 == 0:
                        await post(
                            client, "/lessons/confirmations", parent, {"lesson_ids": ids[i : i + 2]}
                        )
                    else:
                        await post(client, f"/lessons/{ids[i]}/answer", parent, {"confirm": True})
                        await post(
                            client, f"/lessons/{ids[i + 1]}/answer", parent, {"confirm": True}
                        )

        async def payer() -> None:
            async with httpx.AsyncClient() as client:
                for c in unpaid:
                    if stop.is_set():
                        return
                    await post(
                        client,
                        "/bank/payments",
                        funds.bank_token,
                        {
                            "contract_id": c["id"],
                            "amount_fen": c["total_fen"],
                            "bank_ref": f"P-{c['id']}",
                            "payer_account": "6217000011112222",
                        },
                    )

        async def killer() -> None:
            while ok < 25 and proc.poll() is None:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            stop.set()

        await asyncio.gather(killer(), payer(), *(confirmer(ids) for ids in lessons))
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # Nothing half-written: the chain verifies, the journal balances, and every
    # contract's rows agree with its journal (rows and postings commit together).
    await funds.check_books()
    async with funds.db.read() as s:
        for c in (await s.execute(select(Contract))).scalars():
            escrow = await ledger.balance(s, ledger.escrow(c.id))
            assert escrow == c.paid_fen - c.released_gross_fen
            assert c.released_gross_fen == c.confirmed_lessons * c.price_per_lesson_fen
            payments = await s.scalar(
                select(func.count())
                .select_from(JournalTransaction)
                .where(JournalTransaction.kind == "payment", JournalTransaction.ref == c.id)
            )
            assert payments == (1 if c.paid_fen else 0)
        legs = await s.scalar(select(func.count()).select_from(JournalEntry))
        assert legs and legs > 0
    # The service starts again on the same database and goes on posting.
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(funds, jwks_url, nats_server.url, port, tmp_path / "funds.log")
    try:
        await _healthy(base, proc)
        async with funds.db.read() as s:
            reported = (
                (await s.execute(select(Contract).where(Contract.reported_lessons > 0)))
                .scalars()
                .first()
            )
        assert reported is not None
        r = await funds.client.get(f"/contracts/{reported.id}/lessons", headers=auth(parent))
        pending = [x["id"] for x in r.json() if x["status"] == "reported"]
        async with httpx.AsyncClient() as client:
            r = await client.post(
                f"{base}/lessons/{pending[0]}/answer",
                json={"confirm": True},
                headers={**auth(parent), "Idempotency-Key": str(uuid.uuid4())},
                timeout=10,
            )
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        jwks.shutdown()
    await funds.check_books()
