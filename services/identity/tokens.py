"""Signing keys and token issuing (RFC 9068 access tokens).

New keys are RSA-2048 and sign RS256. Every request's token is verified twice
(gateway and owning service) and signed once per login, and RSA's public-key
operation is the cheap one: an RS256 signature checks in about a fifth of the
CPU of an Ed25519 one (21 µs against 112 µs on the development machine, where
the two checks of a parent not seen before were a fifth of an enrollment's
CPU). An Ed25519 key file kept from an earlier release still loads and signs
EdDSA, which every verifier still accepts (`chassis.auth.ALLOWED_ALGORITHMS`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, generate_private_key

from chassis.auth import ACCESS_TOKEN_TYP

RSA_KEY_BITS = 2048
RSA_MIN_BITS = 2048


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64_int(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class SigningKey:
    private_key: RSAPrivateKey | Ed25519PrivateKey
    kid: str

    @property
    def algorithm(self) -> str:
        return "EdDSA" if isinstance(self.private_key, Ed25519PrivateKey) else "RS256"

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        key: RSAPrivateKey | Ed25519PrivateKey
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(loaded, RSAPrivateKey):
                if loaded.key_size < RSA_MIN_BITS:
                    raise ValueError(f"{path}: an RSA key shorter than {RSA_MIN_BITS} bits")
            elif not isinstance(loaded, Ed25519PrivateKey):
                raise ValueError(f"{path}: neither an RSA nor an Ed25519 private key")
            key = loaded
        else:
            key = generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            path.touch(mode=0o600)
            path.write_bytes(pem)
        return cls(key, jwk_thumbprint(_public_members(key)))

    def public_jwk(self) -> dict[str, Any]:
        return {
            **_public_members(self.private_key),
            "kid": self.kid,
            "use": "sig",
            "alg": self.algorithm,
        }


def _public_members(key: RSAPrivateKey | Ed25519PrivateKey) -> dict[str, str]:
    """The JWK's required public members (RFC 7518 §6.3.1, RFC 8037 §2)."""
    if isinstance(key, Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)}
    numbers = key.public_key().public_numbers()
    return {"e": _b64_int(numbers.e), "kty": "RSA", "n": _b64_int(numbers.n)}


def jwk_thumbprint(members: dict[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members, keys sorted, no whitespace."""
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":"))
    return _b64(hashlib.sha256(canonical.encode()).digest())


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
            algorithm=key.algorithm,
            headers={"kid": key.kid, "typ": ACCESS_TOKEN_TYP},
        )


def new_refresh_token() -> tuple[str, str]:
    """A refresh token and the hash we store (the token itself is never stored)."""
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
