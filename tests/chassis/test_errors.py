"""RFC 9457 problem+json for every error (X-03), documented in OpenAPI."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from chassis.db import Database
from chassis.errors import Problem, install_problem_handlers, rule_violation
from chassis.observability import Metrics, RequestContextMiddleware

pytestmark = pytest.mark.asyncio


class Body(BaseModel):
    minutes: int


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware, metrics=Metrics("t"), access_log=False)
    install_problem_handlers(app)

    @app.post("/publish")
    async def publish(body: Body) -> dict[str, int]:
        if body.minutes > 60:
            raise rule_violation("HW-02", "超过每日书面作业时长上限。", limit=60, used=40)
        return {"minutes": body.minutes}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    @app.get("/conflict")
    async def conflict() -> None:
        raise Problem(409, "状态冲突。")

    @app.post("/codes/{code}")
    async def register(code: str) -> dict[str, str]:
        async with app.state.db.transaction() as session:
            await session.execute(text("INSERT INTO codes (code) VALUES (:c)"), {"c": code})
        return {"code": code}

    @app.get("/rush")
    async def rush() -> None:
        engine = create_async_engine(
            app.state.db.url, pool_size=1, max_overflow=0, pool_timeout=0.1
        )
        try:
            async with engine.connect(), engine.connect():  # the second waits, then times out
                pass
        finally:
            await engine.dispose()

    return app


@pytest.fixture
async def client(tmp_path):
    app = _app()
    app.state.db = Database(f"sqlite+aiosqlite:///{tmp_path / 'errors.sqlite3'}")
    async with app.state.db.transaction() as session:
        await session.execute(text("CREATE TABLE codes (code TEXT PRIMARY KEY)"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c
    await app.state.db.dispose()


def _is_problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["title"] and body["type"].startswith("https://")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in body["detail"]), body["detail"]
    assert body["request_id"] == r.headers["x-request-id"]
    return body


async def test_x03_rule_refusal_names_rule_and_numbers(client):
    body = _is_problem(await client.post("/publish", json={"minutes": 90}), 422)
    assert body["rule"] == "HW-02"
    assert body["limit"] == 60 and body["used"] == 40
    assert body["type"].endswith("/rule/HW-02")


async def test_x03_validation_lists_fields(client):
    body = _is_problem(await client.post("/publish", json={"minutes": "many"}), 422)
    assert body["errors"][0]["field"] == "body.minutes"
    assert "rule" not in body
    malformed = await client.post(
        "/publish", content=b"{not json", headers={"content-type": "application/json"}
    )
    _is_problem(malformed, 422)


async def test_x03_unhandled_error_is_500_without_leaking_internals(client):
    r = await client.get("/boom")
    body = _is_problem(r, 500)
    assert "secret" not in r.text and "Traceback" not in r.text and "passwd" not in r.text
    assert body["detail"] == "服务器内部错误，请稍后再试。"


async def test_x03_404_405_409_are_problems(client):
    _is_problem(await client.get("/nowhere"), 404)
    _is_problem(await client.delete("/publish"), 405)
    _is_problem(await client.get("/conflict"), 409)


async def test_x03_lost_uniqueness_race_is_409_problem_not_500(client):
    assert (await client.post("/codes/91350100M000100Y43")).status_code == 200
    again = await client.post("/codes/91350100M000100Y43")
    body = _is_problem(again, 409)
    assert "UNIQUE" not in body["detail"] and "codes" not in body["detail"]  # no internals


async def test_x03_exhausted_connection_pool_is_503_with_retry_after(client):
    r = await client.get("/rush")
    _is_problem(r, 503)
    assert r.headers["retry-after"] == "1"


async def test_request_id_is_propagated_when_given(client):
    r = await client.get("/nowhere", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["request_id"] == "abc-123"


@pytest.mark.parametrize(
    "service", ["identity", "homework", "afterschool", "institutions", "funds"]
)
async def test_openapi_documents_problem_responses(service, start_service):
    svc = await start_service(service)
    doc = (await svc.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert "ProblemDetail" in doc["components"]["schemas"]
    whoami = doc["paths"]["/auth/whoami"]["get"]
    for status in ("401", "403", "422", "500"):
        content = whoami["responses"][status]["content"]
        assert content["application/problem+json"]["schema"]["$ref"].endswith("/ProblemDetail")
    assert whoami["security"] == [{"HTTPBearer": []}]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert path in doc["paths"]
    ready = await svc.client.get("/readyz")
    assert ready.status_code in (200, 503)
    metrics = await svc.client.get("/metrics")
    assert "http_requests_total" in metrics.text


@pytest.mark.parametrize(
    "path",
    ["/enrollments", "/a b/c", "/课程/x", "/x%3Fy", "/a?b", "/a#b", "/a\\b", "//twice", "/"],
)
async def test_url_path_is_the_url_path_starlette_builds(path):
    from starlette.requests import Request

    from chassis.errors import url_path

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": b"x=1&y=%E4%B8%AD",
        "headers": [(b"host", b"svc.example:8080")],
        "server": ("127.0.0.1", 8080),
        "scheme": "http",
    }
    request = Request(scope)
    assert url_path(request) == request.url.path
