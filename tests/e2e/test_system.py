"""The whole system started the way `make run` starts it: real processes,
an embedded NATS server, every service and the gateway, demo data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from launcher.nats_server import free_port
from tests.conftest import USE_POSTGRES, DatabaseFactory
from tests.support import auth, eventually

SERVICES = ("gateway", "identity", "homework", "afterschool", "institutions", "funds")
STARTED = "双减治理平台已启动"


class System:
    def __init__(self, gateway: str, log: Path, process: subprocess.Popen[bytes]) -> None:
        self.gateway = gateway
        self.log = log
        self.process = process

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
async def system(tmp_path: Path, databases: DatabaseFactory) -> Iterator[System]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_URL", "GATEWAY_"))}
    env.update({"VAR_DIR": str(tmp_path / "var"), "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    for name in SERVICES:
        env[f"{name.upper()}_PORT"] = str(free_port())
    if USE_POSTGRES:
        for name in SERVICES[1:]:
            env[f"{name.upper()}_DATABASE_URL"] = await databases.url(name)
    log = tmp_path / "system.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
    system = System(f"http://127.0.0.1:{env['GATEWAY_PORT']}", log, process)
    deadline = time.monotonic() + 120
    while STARTED not in system.output():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("system did not start:\n" + system.output()[-4000:])
        time.sleep(0.3)
    yield system
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(40)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


async def test_e2e_login_through_gateway_create_class_and_see_it_in_homework(system: System):
    async with httpx.AsyncClient(base_url=system.gateway, timeout=10) as client:
        ready = await eventually(lambda: _ready(client), timeout=30)
        assert set(ready["services"]) == {
            "identity",
            "homework",
            "afterschool",
            "institutions",
            "funds",
        }
        login = await client.post(
            "/api/v1/identity/oauth/token",
            data={"grant_type": "password", "username": "admin.huancui", "password": "demo-2026!"},
        )
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        schools = (await client.get("/api/v1/identity/schools", headers=auth(token))).json()
        assert len(schools["items"]) == 1
        school = schools["items"][0]
        assert school["school_system"] == "5-4"
        created = await client.post(
            f"/api/v1/identity/schools/{school['id']}/classes",
            headers=auth(token),
            json={"grade": 5, "name": "五年级(2)班"},
        )
        assert created.status_code == 201, created.text
        class_id = created.json()["id"]

        async def in_homework():
            r = await client.get(f"/api/v1/homework/classes/{class_id}", headers=auth(token))
            return r.json() if r.status_code == 200 else None

        copy = await eventually(in_homework, timeout=20)
        assert copy["grade"] == 5 and copy["school_id"] == school["id"]
        assert copy["school_system"] == "5-4"  # the school's event arrived too
        # Every domain service verifies the same token itself, via identity's JWKS.
        for service in ("homework", "afterschool", "institutions", "funds"):
            who = await client.get(f"/api/v1/{service}/auth/whoami", headers=auth(token))
            assert who.status_code == 200, (service, who.text)
            assert who.json()["roles"] == ["school_admin"]
    system.process.send_signal(signal.SIGINT)
    assert system.process.wait(40) == 0
    assert "已停止" in system.output()


async def _ready(client: httpx.AsyncClient):
    r = await client.get("/readyz")
    return r.json() if r.status_code == 200 else None
