"""The compliance code (合规码, INST-04): a signed plate anyone can check.

A compliance code is a compact JWS (EdDSA / Ed25519) naming the institution,
its credit code and licence. The institution prints it as a QR code; anyone
verifies it offline against the published keys (``/public/compliance-keys``,
a JWKS) or online (``/public/verify/{code}``), which adds the *live* licence
status, so an old plate of a revoked institution shows "revoked".

The key lives in ``INSTITUTIONS_SIGNING_KEY_FILE`` (default
``var/institutions-compliance-key.pem``), created on first start; keys being
rotated out stay published while ``INSTITUTIONS_PREVIOUS_KEY_FILES`` lists them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

COMPLIANCE_TYP = "inst-compliance+jwt"
COMPLIANCE_ISSUER = "institutions"
SHANGHAI = timezone(timedelta(hours=8))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class ComplianceKey:
    private_key: Ed25519PrivateKey
    kid: str

    @classmethod
    def load_or_create(cls, path: Path) -> ComplianceKey:
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
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        # RFC 7638 thumbprint of the public JWK.
        canonical = f'{{"crv":"Ed25519","kty":"OKP","x":"{_b64(raw)}"}}'.encode()
        return cls(key, _b64(hashlib.sha256(canonical).digest()))

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


class InvalidComplianceCode(ValueError):
    """The code is not a compliance code signed by one of our keys."""


class ComplianceSigner:
    def __init__(self, keys: list[ComplianceKey]) -> None:
        if not keys:
            raise ValueError("at least one key")
        self.keys = keys  # the first signs; all verify
        self._by_kid = {k.kid: k for k in keys}

    @classmethod
    def from_environment(cls, var_dir: Path) -> ComplianceSigner:
        configured = os.environ.get("INSTITUTIONS_SIGNING_KEY_FILE")
        path = Path(configured) if configured else var_dir / "institutions-compliance-key.pem"
        keys = [ComplianceKey.load_or_create(path)]
        previous = os.environ.get("INSTITUTIONS_PREVIOUS_KEY_FILES", "")
        keys += [ComplianceKey.load_or_create(Path(p)) for p in filter(None, previous.split(","))]
        return cls(keys)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys]}

    def issue(
        self,
        *,
        institution_id: str,
        name: str,
        credit_code: str,
        licence_number: str,
        region_id: str,
        category: str,
        valid_until: date | None,
        now: datetime | None = None,
    ) -> str:
        now = now or datetime.now(UTC)
        claims: dict[str, Any] = {
            "iss": COMPLIANCE_ISSUER,
            "sub": institution_id,
            "jti": uuid.uuid4().hex,
            "iat": int(now.timestamp()),
            "name": name,
            "credit_code": credit_code,
            "licence_number": licence_number,
            "region_id": region_id,
            "category": category,
        }
        if valid_until is not None:
            # The plate expires with the licence (end of that day, Beijing time).
            end = datetime.combine(valid_until + timedelta(days=1), time(0), SHANGHAI)
            claims["exp"] = int(end.timestamp())
        key = self.keys[0]
        return jwt.encode(
            claims,
            key.private_key,
            algorithm="EdDSA",
            headers={"kid": key.kid, "typ": COMPLIANCE_TYP},
        )

    def verify(self, code: str) -> tuple[dict[str, Any], bool]:
        """Claims of a genuine code and whether it has expired; raises
        ``InvalidComplianceCode`` for anything we did not sign."""
        try:
            header = jwt.get_unverified_header(code)
        except jwt.PyJWTError as exc:
            raise InvalidComplianceCode("不是有效的合规码") from exc
        if header.get("alg") != "EdDSA" or header.get("typ") != COMPLIANCE_TYP:
            raise InvalidComplianceCode("不是本平台签发的合规码")
        key = self._by_kid.get(str(header.get("kid")))
        if key is None:
            raise InvalidComplianceCode("合规码的签名密钥未知")
        try:
            claims = jwt.decode(
                code,
                key.private_key.public_key(),
                algorithms=["EdDSA"],
                issuer=COMPLIANCE_ISSUER,
                options={"verify_exp": False, "require": ["iss", "sub", "iat"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidComplianceCode("合规码签名无效") from exc
        exp = claims.get("exp")
        expired = isinstance(exp, int) and exp < datetime.now(UTC).timestamp()
        return claims, expired
