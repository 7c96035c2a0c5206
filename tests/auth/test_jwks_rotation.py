"""Verifiers fetch identity's JWKS over HTTP, cache it, and pick up a rotated key."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from chassis.auth import JwksKeySource, TokenVerifier
from chassis.errors import Problem
from launcher.nats_server import free_port
from services.identity.tokens import SigningKey, TokenIssuer
from tests.conftest import AUDIENCE, ISSUER

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def jwks_server():
    state = {"jwks": {"keys": []}, "hits": 0}

    async def jwks(_request):
        state["hits"] += 1
        return JSONResponse(state["jwks"])

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/jwks", jwks)]), port=port, log_level="warning", lifespan="off"
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)

    async def stop() -> None:
        server.should_exit = True
        await task

    state["stop"] = stop
    yield state, f"http://127.0.0.1:{port}/jwks"
    if not task.done():
        await stop()


async def test_keys_are_cached_and_a_rotated_key_is_fetched_on_first_sight(jwks_server, tmp_path):
    state, url = jwks_server
    old = SigningKey.load_or_create(tmp_path / "old.pem")
    new = SigningKey.load_or_create(tmp_path / "new.pem")
    state["jwks"] = TokenIssuer([old], issuer=ISSUER, audience=AUDIENCE).jwks()
    verifier = TokenVerifier(JwksKeySource(url, min_refetch=0.0), issuer=ISSUER, audience=AUDIENCE)

    def token(key: SigningKey) -> str:
        return TokenIssuer([key], issuer=ISSUER, audience=AUDIENCE).access_token(
            subject="u", kind="user", roles=["teacher"], tenants=[]
        )

    for _ in range(5):
        assert (await verifier.verify(token(old))).subject == "u"
    assert state["hits"] == 1  # cached

    # Rotation: identity now publishes both keys and signs with the new one.
    state["jwks"] = TokenIssuer([new, old], issuer=ISSUER, audience=AUDIENCE).jwks()
    assert (await verifier.verify(token(new))).roles == frozenset({"teacher"})
    assert state["hits"] == 2
    assert (await verifier.verify(token(old))).subject == "u"  # old tokens still valid

    # A key identity never published is refused after one refetch.
    stranger = SigningKey.load_or_create(tmp_path / "stranger.pem")
    with pytest.raises(Problem) as refused:
        await verifier.verify(token(stranger))
    assert refused.value.status == 401


async def test_identity_outage_keeps_known_keys(jwks_server, tmp_path):
    state, url = jwks_server
    key = SigningKey.load_or_create(tmp_path / "k.pem")
    state["jwks"] = TokenIssuer([key], issuer=ISSUER, audience=AUDIENCE).jwks()
    source = JwksKeySource(url, ttl=0.0, min_refetch=0.0)  # refetch on every call
    assert await source.key_for(key.kid) is not None
    await state["stop"]()
    # identity is down and the cache is stale: the known key is still used.
    assert await source.key_for(key.kid) is not None
    assert await source.key_for("never-published") is None
