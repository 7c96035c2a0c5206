"""Access-token verification and typed authorization dependencies.

Tokens are signed by identity (RS256, or EdDSA with an older Ed25519 key;
RFC 9068 `typ: at+jwt`) and
verified everywhere against identity's JWKS. Nothing is trusted because it
came from inside: every service checks every token itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import httpx
import jwt
import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jwt import PyJWK

from chassis.errors import Problem

log = structlog.get_logger("auth")

# RS256 for keys identity makes; EdDSA for Ed25519 keys kept from earlier
# releases. Each key's JWK fixes its algorithm; the token's header must match it.
ALLOWED_ALGORITHMS = frozenset({"RS256", "EdDSA"})
ACCESS_TOKEN_TYP = "at+jwt"

ROLES = frozenset(
    {
        "bureau",
        "regulator",
        "school_admin",
        "head_teacher",
        "teacher",
        "parent",
        "student",
        "institution",
        "bank",
        "auditor",
        "platform",  # a third-party platform acting through client credentials
    }
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (password flow) or a client (client credentials).

    `tenants` are the objects the caller may act on, as "kind:id" strings:
    region:<id>, school:<id>, institution:<id>, bank:<id>, department:<code>.
    `person_id` links a user to the roster (teacher, guardian or student id).
    """

    subject: str
    kind: str  # "user" | "client"
    roles: frozenset[str]
    tenants: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    person_id: str | None = None
    client_id: str | None = None
    name: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def has_role(self, *roles: str) -> bool:
        return bool(self.roles.intersection(roles))

    def tenant_ids(self, kind: str) -> set[str]:
        prefix = kind + ":"
        return {t[len(prefix) :] for t in self.tenants if t.startswith(prefix)}

    def has_tenant(self, kind: str, tenant_id: str) -> bool:
        return f"{kind}:{tenant_id}" in self.tenants

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> Principal:
        return cls(
            subject=str(claims["sub"]),
            kind=str(claims.get("kind", "user")),
            roles=frozenset(claims.get("roles", [])),
            tenants=frozenset(claims.get("tenants", [])),
            scopes=frozenset(str(claims.get("scope", "")).split()),
            person_id=claims.get("pid"),
            client_id=claims.get("client_id"),
            name=claims.get("name"),
            claims=claims,
        )


class KeySource(Protocol):
    async def key_for(self, kid: str | None) -> PyJWK | None: ...


class StaticKeySource:
    """Keys known up front (identity verifying its own tokens, tests)."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self._keys = {k.get("kid"): PyJWK(k) for k in jwks.get("keys", [])}

    async def key_for(self, kid: str | None) -> PyJWK | None:
        return self._keys.get(kid)


class JwksKeySource:
    """Identity's JWKS over HTTP, cached; refetched on an unknown `kid`
    (key rotation), at most once per `min_refetch` seconds."""

    def __init__(self, url: str, *, ttl: float = 300.0, min_refetch: float = 10.0) -> None:
        self.url = url
        self.ttl = ttl
        self.min_refetch = min_refetch
        self._keys: dict[str | None, PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None) -> PyJWK | None:
        now = time.monotonic()
        stale = now - self._fetched_at > self.ttl
        if kid not in self._keys or stale:
            async with self._lock:
                now = time.monotonic()
                if (kid not in self._keys and now - self._fetched_at > self.min_refetch) or (
                    now - self._fetched_at > self.ttl
                ):
                    await self._refresh()
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(self.url)
                response.raise_for_status()
                jwks = response.json()
            self._keys = {k.get("kid"): PyJWK(k) for k in jwks.get("keys", [])}
            self._fetched_at = time.monotonic()
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            # Keep the keys we had: a short identity outage must not log everyone out.
            log.warning("jwks_fetch_failed", url=self.url, error=str(exc))
            self._fetched_at = time.monotonic() - self.ttl + self.min_refetch


class TokenVerifier:
    """Checks a compact JWS access token (RFC 7515, RFC 9068) by hand rather
    than through ``jwt.decode``: PyJWT's generic path (option merging, every
    segment decoded twice, per-claim dispatch) cost four times the RS256
    signature check itself, and every request pays it twice (gateway and
    service). What it checks, each proven in tests/auth (and against PyJWT's
    verdicts on the same tokens in test_token_verifier.py): strict base64url
    segments; a JSON object header with an allowed ``alg`` that is the key's
    own (no algorithm confusion: the JWK fixes it), ``typ`` at+jwt, no
    ``crit``/``b64`` extensions; the signature over the first two segments;
    a JSON object payload with ``exp``, ``iat``, ``iss``, ``aud``, ``sub``,
    ``exp``/``nbf``/``iat`` within the leeway, the issuer and audience ours."""

    def __init__(self, keys: KeySource, *, issuer: str, audience: str, leeway: int = 30) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    async def verify(self, token: str) -> Principal:
        return Principal.from_claims((await self.verify_payload(token))[0])

    async def verify_payload(self, token: str) -> tuple[dict[str, Any], bytes]:
        """The verified token's claims, and its payload as the JSON text they
        were read from (what `CachedVerifier` keeps: no re-serialising)."""
        try:
            header_segment, payload_segment, signature_segment = _segments(token)
            header = _json_object(_b64url_decode(header_segment))
            if not isinstance(header.get("kid", ""), str):
                raise ValueError("kid is not a string")
        except ValueError as exc:
            raise _unauthorized("访问令牌格式无效。") from exc
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise _unauthorized("访问令牌的签名算法不被接受。")
        if str(header.get("typ", "")).lower() != ACCESS_TOKEN_TYP:
            raise _unauthorized("令牌类型不是访问令牌。")
        if "crit" in header or "b64" in header:
            raise _unauthorized("访问令牌含有不支持的扩展。")
        key = await self.keys.key_for(header.get("kid"))
        if key is None:
            raise _unauthorized("访问令牌的签名密钥未知。")
        if key.algorithm_name != alg:
            raise _unauthorized("访问令牌的签名算法与密钥不符。")
        try:
            signature = _b64url_decode(signature_segment)
            signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
            if not key.Algorithm.verify(signing_input, key.key, signature):
                raise ValueError("bad signature")
            payload = _b64url_decode(payload_segment)
            claims = _json_object(payload)
        except ValueError as exc:
            raise _unauthorized("访问令牌无效。") from exc
        self._check_claims(claims)
        return claims, payload

    def _check_claims(self, claims: dict[str, Any]) -> None:
        for name in ("exp", "iat", "iss", "aud", "sub"):
            if name not in claims:
                raise _unauthorized("访问令牌无效。")
        now = time.time()
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf", 0)
        if not all(_is_number(value) for value in (exp, iat, nbf)):
            raise _unauthorized("访问令牌无效。")
        if int(exp) <= now - self.leeway:
            raise _unauthorized("访问令牌已过期。")
        if int(iat) > now + self.leeway or int(nbf) > now + self.leeway:
            raise _unauthorized("访问令牌尚未生效。")
        if claims["iss"] != self.issuer:
            raise _unauthorized("访问令牌的签发方不正确。")
        audience = claims["aud"]
        audiences = [audience] if isinstance(audience, str) else audience
        if (
            not isinstance(audiences, list)
            or not all(isinstance(a, str) for a in audiences)
            or self.audience not in audiences
        ):
            raise _unauthorized("访问令牌的受众不正确。")
        if not isinstance(claims["sub"], str) or not isinstance(claims.get("jti", ""), str):
            raise _unauthorized("访问令牌无效。")


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _segments(token: str) -> tuple[str, str, str]:
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise ValueError("not a compact JWS")
    return parts[0], parts[1], parts[2]


def _b64url_decode(segment: str) -> bytes:
    """Strict base64url without padding (RFC 7515 §2): Python's decoder alone
    skips characters outside the alphabet."""
    if len(segment) % 4 == 1 or not _B64URL.fullmatch(segment):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_object(data: bytes) -> dict[str, Any]:
    value = json.loads(data)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class CachedVerifier:
    """A token check (about 40 µs of CPU for RS256 on the development machine,
    more for EdDSA) is paid by the gateway and the service on every request;
    a token verified once is remembered until it expires and
    at most `max_age` seconds: a token is immutable, so the answer can only
    change when its signing key is withdrawn, which `max_age` bounds. Bounded
    in size; the oldest entries go first. `max_age` 0 turns the cache off.

    An entry is the token's claims as the JSON text of its payload (bytes, as
    verified: not serialised again) and the time it ends, and a
    hit rebuilds the principal from them (``Principal.from_claims``, as the
    verification does): bytes and a float, which the garbage collector stops
    tracking at the first collection the entry survives. A cached Principal
    was nine tracked objects (itself, its __dict__, three frozensets, the
    claims dict and its lists, the entry): in a rush of parents not seen
    before the cache's entries were most of what every middle collection
    walked — 50-70 ms pauses on the development machine, the largest stalls
    left in the sold-out answers."""

    def __init__(
        self, verifier: TokenVerifier, *, size: int = 10_000, max_age: float = 30.0
    ) -> None:
        self.verifier = verifier
        self.size = size
        self.max_age = max_age
        self._cache: dict[str, tuple[bytes, float]] = {}

    def cached(self, token: str) -> Principal | None:
        """The principal of a token verified before and not yet expired
        (no await: the gateway's edge answers from it synchronously)."""
        hit = self._cache.get(token)
        if hit is not None and hit[1] > time.time():
            return Principal.from_claims(json.loads(hit[0]))
        return None

    async def verify(self, token: str) -> Principal:
        now = time.time()
        hit = self._cache.get(token)
        if hit is not None:
            if hit[1] > now:
                return Principal.from_claims(json.loads(hit[0]))
            del self._cache[token]
        claims, payload = await self.verifier.verify_payload(token)
        principal = Principal.from_claims(claims)
        exp = claims.get("exp")
        until = now + self.max_age
        if isinstance(exp, int | float):
            until = min(until, float(exp))
        if self.size > 0 and until > now:
            if len(self._cache) >= self.size:
                # Drop the oldest eighth (dicts keep insertion order).
                for key in list(self._cache)[: max(1, self.size // 8)]:
                    self._cache.pop(key, None)
            self._cache[token] = (payload, until)
        return principal


# Documents the bearer scheme in OpenAPI; errors are ours (problem+json).
_bearer_scheme = HTTPBearer(auto_error=False, description="identity 签发的访问令牌")


async def current_principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
) -> Principal:
    token = bearer_token(request)
    if token is None:
        raise Problem(
            401, "缺少访问令牌（Authorization: Bearer …）。", headers={"WWW-Authenticate": "Bearer"}
        )
    verifier: TokenVerifier | CachedVerifier = request.app.state.token_verifier
    principal = await verifier.verify(token)
    request.state.principal = principal
    return principal


async def optional_principal(request: Request) -> Principal | None:
    if bearer_token(request) is None:
        return None
    return await current_principal(request, None)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
OptionalPrincipal = Annotated[Principal | None, Depends(optional_principal)]


def require_roles(*roles: str) -> Callable[[Principal], Awaitable[Principal]]:
    """Dependency: the caller holds at least one of `roles`."""
    unknown = set(roles) - ROLES
    if unknown:
        raise ValueError(f"unknown roles: {unknown}")

    async def dependency(principal: CurrentPrincipal) -> Principal:
        if not principal.has_role(*roles):
            raise Problem(403, "您的角色无权执行此操作。")
        return principal

    return dependency


def require_scope(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    """Dependency for client-credential callers: the token carries `scope`."""

    async def dependency(principal: CurrentPrincipal) -> Principal:
        if principal.kind == "client" and scope not in principal.scopes:
            raise Problem(403, f"令牌缺少所需权限范围 {scope}。")
        return principal

    return dependency


def ensure_tenant(principal: Principal, kind: str, tenant_id: str) -> None:
    """Object-level check: someone else's object looks exactly like a missing one
    (GW-03), so the caller learns nothing about what exists."""
    if not principal.has_tenant(kind, tenant_id):
        raise Problem(404)
