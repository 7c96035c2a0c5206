"""GW-01: every service behind one door, tokens checked at the edge, public
routes open, one merged OpenAPI document and the AsyncAPI document.

The services are the real ones (started with their lifespans against real
NATS and a real database) served over TCP, because the gateway forwards
over TCP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chassis.config import DOMAIN_SERVICES
from contracts.base import EVENT_TYPES
from gateway.docs import dangling_refs, merge_openapi
from gateway.edge import PublicRoutes
from launcher.nats_server import free_port
from services.identity.tokens import SigningKey, TokenIssuer
from tests.conftest import AUDIENCE, ISSUER, StartService
from tests.gateway.conftest import Echo, Gateway, MakeGateway, Served
from tests.support import auth, eventually

TITLES = {
    "identity": "身份与名册服务 identity",
    "homework": "作业公示与负担监测服务 homework",
    "afterschool": "课后服务 afterschool",
    "institutions": "校外培训机构监管服务 institutions",
    "funds": "预收费资金监管服务 funds",
}


@pytest.fixture
async def everything(
    start_service: StartService, served: Served, make_gateway: MakeGateway
) -> Gateway:
    urls = {}
    for name in DOMAIN_SERVICES:
        service = await start_service(name)
        urls[name] = await served.start(service.app)
    return await make_gateway(upstreams=urls, rate_limit_enabled=False)


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw01_every_service_is_routed_and_verifies_the_forwarded_token(
    everything: Gateway, mint: Any
) -> None:
    client = everything.client
    for name in DOMAIN_SERVICES:
        token = mint("bureau", tenants=["region:jinhua"], subject=f"user-{name}")
        # The service itself verified the token the gateway passed on unchanged.
        whoami = await client.get(f"/api/v1/{name}/auth/whoami", headers=auth(token))
        assert whoami.status_code == 200, (name, whoami.text)
        assert whoami.json()["subject"] == f"user-{name}"
        assert whoami.json()["tenants"] == ["region:jinhua"]
        # ... and it is the right service.
        spec = await client.get(f"/api/v1/{name}/openapi.json", headers=auth(token))
        assert spec.json()["info"]["title"] == TITLES[name]
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["services"] == dict.fromkeys(DOMAIN_SERVICES, "ok")
    unknown = await client.get("/api/v1/nosuch/x", headers=auth(mint("bureau")))
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("gateway_server", ["asgi", "fast"], indirect=True)
async def test_gw01_public_routes_pass_the_edge_without_a_token(everything: Gateway) -> None:
    client = everything.client
    jwks = await client.get("/api/v1/identity/.well-known/jwks.json")
    assert jwks.status_code == 200 and jwks.json()["keys"]
    # White list look-up, compliance code, homework publicity, complaints: the
    # edge lets them through (whatever the service then answers is the service's).
    for method, path in (
        ("GET", "/api/v1/institutions/public/whitelist"),
        ("GET", "/api/v1/institutions/public/verify/ABC123"),
        ("POST", "/api/v1/institutions/public/complaints"),
        ("GET", "/api/v1/homework/public/schools/s1/daily"),
    ):
        response = await client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code != 401, (path, response.text)
        assert "WWW-Authenticate" not in response.headers
    # ... but not a write to a read-only public prefix.
    response = await client.post("/api/v1/homework/public/schools/s1/daily", json={})
    assert response.status_code == 401


async def test_gw01_bad_tokens_are_refused_at_the_edge_before_any_service(
    served: Served, make_gateway: MakeGateway, issuer: TokenIssuer, tmp_path: Path
) -> None:
    echo = Echo()
    url = await served.start(echo)
    gateway = await make_gateway(upstreams={"funds": url}, rate_limit_enabled=False)
    other_key = SigningKey.load_or_create(tmp_path / "other.pem")
    forged = TokenIssuer([other_key], issuer=ISSUER, audience=AUDIENCE).access_token(
        subject="mallory", kind="user", roles=["bureau"], tenants=["region:jinhua"]
    )
    expired = issuer.access_token(
        subject="u",
        kind="user",
        roles=["bank"],
        tenants=[],
        now=datetime.now(UTC) - timedelta(days=1),
    )
    wrong_audience = TokenIssuer(issuer.keys, issuer=ISSUER, audience="elsewhere").access_token(
        subject="u", kind="user", roles=["bank"], tenants=[]
    )
    for headers in (
        {},
        {"Authorization": "Basic dTpw"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": f"Bearer {forged}"},
        {"Authorization": f"Bearer {expired}"},
        {"Authorization": f"Bearer {wrong_audience}"},
    ):
        response = await gateway.client.get("/api/v1/funds/accounts", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"].startswith("Bearer")
        problem = response.json()
        assert problem["status"] == 401 and problem["detail"]
        assert problem["request_id"] == response.headers["x-request-id"]
    assert echo.hits == [], "a refused request must never reach the service"


async def test_gw01_merged_openapi_has_every_service_and_refreshes_when_one_comes_back(
    start_service: StartService, served: Served, make_gateway: MakeGateway, mint: Any
) -> None:
    urls: dict[str, str] = {}
    for name in ("identity", "funds"):
        urls[name] = await served.start((await start_service(name)).app)
    homework_port = free_port()
    urls["homework"] = f"http://127.0.0.1:{homework_port}"  # down for now
    gateway = await make_gateway(upstreams=urls, rate_limit_enabled=False)
    client = gateway.client

    async def merged() -> dict[str, Any] | None:
        doc = (await client.get("/openapi.json")).json()
        return doc if "/api/v1/funds/auth/whoami" in doc["paths"] else None

    doc = await eventually(merged, timeout=10)
    assert doc["openapi"].startswith("3.1")
    assert "/api/v1/identity/oauth/token" in doc["paths"]
    assert not any(p.startswith("/api/v1/homework/") for p in doc["paths"])
    assert doc["x-services"]["homework"]["status"] == "missing"
    assert dangling_refs(doc) == []
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    assert set(schemes["OAuth2"]["flows"]) == {"password", "clientCredentials"}
    # Operations keep their zh-CN summaries; protected ones need a token.
    whoami = doc["paths"]["/api/v1/funds/auth/whoami"]["get"]
    assert whoami["summary"] == "本服务验证令牌后看到的调用者"
    assert {"bearerAuth": []} in whoami["security"]
    assert "429" in whoami["responses"] and "502" in whoami["responses"]
    # The token endpoint is public: no security requirement at the edge.
    token_op = doc["paths"]["/api/v1/identity/oauth/token"]["post"]
    assert token_op.get("security", []) in ([], [{}]) or {} in token_op["security"]
    # The gateway's own webhook API is in it.
    assert "/api/v1/gateway/webhooks/subscriptions" in doc["paths"]

    # homework comes back: the merged document picks it up by itself.
    await served.start((await start_service("homework")).app, port=homework_port)

    async def with_homework() -> dict[str, Any] | None:
        doc = (await client.get("/openapi.json")).json()
        return doc if "/api/v1/homework/auth/whoami" in doc["paths"] else None

    doc = await eventually(with_homework, timeout=10)
    assert doc["x-services"]["homework"]["status"] == "ok"
    assert dangling_refs(doc) == []
    for page, marker in (("/docs", "swagger-ui"), ("/redoc", "redoc")):
        html = await client.get(page)
        assert html.status_code == 200 and marker in html.text and "/openapi.json" in html.text
        assert 'lang="zh-CN"' in html.text


def test_gw01_merge_declashes_components_and_rewrites_refs() -> None:
    problem = {"type": "object", "properties": {"detail": {"type": "string"}}}

    def spec(item: dict[str, Any], summary: str) -> dict[str, Any]:
        return {
            "openapi": "3.1.0",
            "info": {"title": "x", "version": "1"},
            "paths": {
                "/items/{item_id}": {
                    "get": {
                        "operationId": "get_item",
                        "summary": summary,
                        "security": [{"HTTPBearer": []}],
                        "responses": {
                            "200": {
                                "description": "ok",
                                "content": {
                                    "application/json": {
                                        "schema": {"$ref": "#/components/schemas/Item"}
                                    }
                                },
                            },
                            "404": {
                                "description": "nf",
                                "content": {
                                    "application/json": {
                                        "schema": {"$ref": "#/components/schemas/Problem"}
                                    }
                                },
                            },
                        },
                    }
                },
                "/public/things": {"get": {"summary": "公开", "responses": {}}},
            },
            "components": {
                "schemas": {
                    "Item": item,
                    "Problem": problem,
                    "Page": {"properties": {"items": {"$ref": "#/components/schemas/Item"}}},
                },
                "securitySchemes": {"HTTPBearer": {"type": "http", "scheme": "bearer"}},
            },
        }

    homework = spec({"properties": {"minutes": {"type": "integer"}}}, "查看作业")
    funds = spec({"properties": {"fen": {"type": "integer"}}}, "查看账户")
    public = PublicRoutes([])
    doc = merge_openapi({"homework": homework, "funds": funds}, public=public)
    schemas = doc["components"]["schemas"]
    # Same name, different definitions: renamed per service; identical ones shared.
    assert "Item" not in schemas
    assert schemas["Homework_Item"]["properties"] == {"minutes": {"type": "integer"}}
    assert schemas["Funds_Item"]["properties"] == {"fen": {"type": "integer"}}
    assert schemas["Problem"] == problem
    # Page refers to a renamed component, so it is renamed too.
    assert schemas["Homework_Page"]["properties"]["items"]["$ref"].endswith("/Homework_Item")
    ok = doc["paths"]["/api/v1/funds/items/{item_id}"]["get"]
    assert ok["summary"] == "查看账户" and ok["operationId"] == "funds_get_item"
    ref = ok["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/Funds_Item"
    assert ok["security"] == [{"bearerAuth": []}, {"OAuth2": []}]
    assert "HTTPBearer" not in doc["components"]["securitySchemes"]
    assert dangling_refs(doc) == []


async def test_gw01_asyncapi_documents_every_integration_event(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    doc = (await gateway.client.get("/asyncapi.json")).json()
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == set(EVENT_TYPES)
    assert len(doc["operations"]) >= len(EVENT_TYPES)
    page = await gateway.client.get("/asyncapi")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for event_type in EVENT_TYPES:
        assert event_type in page.text
