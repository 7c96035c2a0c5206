"""X-02 authentication: the verified-token cache every service and the gateway
use never accepts what full verification would refuse, except a token whose
signing key was withdrawn less than `max_age` ago."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from chassis.auth import CachedVerifier, StaticKeySource, TokenVerifier
from chassis.errors import Problem
from services.identity.tokens import TokenIssuer
from tests.conftest import AUDIENCE, ISSUER

pytestmark = pytest.mark.asyncio


class CountingKeys:
    """A key source that counts look-ups and can withdraw its keys."""

    def __init__(self, jwks: dict) -> None:
        self.inner = StaticKeySource(jwks)
        self.lookups = 0
        self.withdrawn = False

    async def key_for(self, kid: str | None):  # type: ignore[no-untyped-def]
        self.lookups += 1
        return None if self.withdrawn else await self.inner.key_for(kid)


def _token(issuer: TokenIssuer, **kwargs: object) -> str:
    return issuer.access_token(subject="u1", kind="user", roles=["parent"], tenants=[], **kwargs)


async def test_x02_a_verified_token_is_remembered_until_max_age(issuer: TokenIssuer) -> None:
    keys = CountingKeys(issuer.jwks())
    cached = CachedVerifier(TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE), max_age=30)
    token = _token(issuer)
    first = await cached.verify(token)
    again = await cached.verify(token)
    assert again.subject == first.subject == "u1"
    assert keys.lookups == 1  # the second call did not verify again
    keys.withdrawn = True  # within max_age the remembered answer stands …
    assert (await cached.verify(token)).subject == "u1"
    with pytest.raises(Problem) as refused:  # … but a token never seen is checked in full
        await cached.verify(_token(issuer))
    assert refused.value.status == 401


async def test_x02_the_cache_never_outlives_the_token_or_max_age(issuer: TokenIssuer) -> None:
    keys = CountingKeys(issuer.jwks())
    nearly_expired = _token(
        issuer, now=datetime.now(UTC) - issuer.access_ttl + timedelta(seconds=1)
    )
    cached = CachedVerifier(TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE), max_age=30)
    await cached.verify(nearly_expired)
    assert cached._cache[nearly_expired][1] <= datetime.now(UTC).timestamp() + 1

    off = CachedVerifier(TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE), max_age=0)
    token = _token(issuer)
    await off.verify(token)
    await off.verify(token)
    assert token not in off._cache


async def test_x02_a_tampered_token_is_refused_and_not_remembered(issuer: TokenIssuer) -> None:
    keys = CountingKeys(issuer.jwks())
    cached = CachedVerifier(TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE))
    header, payload, signature = _token(issuer).split(".")
    # One bit of the signature flipped (replacing its last characters could
    # leave the decoded bytes unchanged: 1 run in 256 did).
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 1
    flipped = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    tampered = f"{header}.{payload}.{flipped}"
    for _ in range(2):
        with pytest.raises(Problem) as refused:
            await cached.verify(tampered)
        assert refused.value.status == 401
    assert tampered not in cached._cache


async def test_x02_the_cache_is_bounded(issuer: TokenIssuer) -> None:
    cached = CachedVerifier(
        TokenVerifier(StaticKeySource(issuer.jwks()), issuer=ISSUER, audience=AUDIENCE), size=8
    )
    for _ in range(20):
        await cached.verify(_token(issuer))
    assert len(cached._cache) <= 8


async def test_x02_a_cached_principal_is_the_verified_one_and_not_tracked_by_gc(
    issuer: TokenIssuer,
) -> None:
    """The cache keeps the payload bytes and a float per token: the collector stops
    tracking an entry at the first collection (a rush of new tokens must not
    swell every middle collection), and what comes back is the principal as
    verified."""
    import gc

    cached = CachedVerifier(
        TokenVerifier(StaticKeySource(issuer.jwks()), issuer=ISSUER, audience=AUDIENCE)
    )
    token = issuer.access_token(
        subject="u9",
        kind="user",
        roles=["parent", "teacher"],
        tenants=["school:s1", "region:r1"],
        person_id="g9",
    )
    verified = await cached.verify(token)
    again = await cached.verify(token)
    assert again is not verified  # rebuilt from the packed entry ...
    assert again == verified and again.claims == verified.claims  # ... equal, claims too
    assert cached.cached(token) == verified
    assert again.roles == frozenset({"parent", "teacher"}) and again.person_id == "g9"
    gc.collect()
    assert not gc.is_tracked(cached._cache[token])
