"""Signing keys and token issuing (EdDSA / Ed25519, RFC 9068 access tokens)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chassis.auth import ACCESS_TOKEN_TYP


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    private_key: Ed25519PrivateKey
    kid: str

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 private key")
        else:
            key = Ed25519PrivateKey.generate()
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            path.touch(mode=0o600)
            path.write_bytes(pem)
        return cls(key, _thumbprint(key))

    def public_jwk(self) -> dict[str, Any]:
        raw = self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64(raw),
            "kid": self.kid,
            "use": "sig",
            "alg": "EdDSA",
        }


def _thumbprint(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # RFC 7638 thumbprint of the public JWK.
    canonical = f'{{"crv":"Ed25519","kty":"OKP","x":"{_b64(raw)}"}}'.encode()
    return _b64(hashlib.sha256(canonical).digest())


class TokenIssuer:
    def __init__(
        self,
        keys: list[SigningKey],
        *,
        issuer: str,
        audience: str,
        access_ttl: timedelta = timedelta(minutes=15),
    ) -> None:
        # The first key signs; the others stay in the JWKS during rotation.
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.access_ttl = access_ttl

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys]}

    def access_token(
        self,
        *,
        subject: str,
        kind: str,
        roles: list[str],
        tenants: list[str],
        scope: str = "",
        person_id: str | None = None,
        name: str | None = None,
        client_id: str | None = None,
        now: datetime | None = None,
    ) -> str:
        now = now or datetime.now(UTC)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int((now + self.access_ttl).timestamp()),
            "jti": uuid.uuid4().hex,
            "kind": kind,
            "roles": sorted(roles),
            "tenants": sorted(tenants),
        }
        if scope:
            claims["scope"] = scope
        if person_id:
            claims["pid"] = person_id
        if name:
            claims["name"] = name
        if client_id:
            claims["client_id"] = client_id
        key = self.keys[0]
        return jwt.encode(
            claims,
            key.private_key,
            algorithm="EdDSA",
            headers={"kid": key.kid, "typ": ACCESS_TOKEN_TYP},
        )


def new_refresh_token() -> tuple[str, str]:
    """A refresh token and the hash we store (the token itself is never stored)."""
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
