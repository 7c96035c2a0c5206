"""Every service verifies every token itself (GW-02): bad tokens get 401 problem+json."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from tests.conftest import AUDIENCE, ISSUER
from tests.support import auth

pytestmark = pytest.mark.asyncio
SERVICES = ("identity", "homework", "afterschool", "institutions", "funds")


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**overrides):
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "u1",
        "iat": now,
        "exp": now + 300,
        "roles": ["bureau"],
        "tenants": ["region:jinhua"],
    }
    claims.update(overrides)
    return claims


def bad_tokens(signing_key) -> dict[str, str]:
    kid = signing_key.kid
    headers = {"kid": kid, "typ": "at+jwt"}
    sign, alg = signing_key.private_key, signing_key.algorithm
    now = int(time.time())
    return {
        "expired": jwt.encode(
            _claims(iat=now - 3600, exp=now - 600), sign, algorithm=alg, headers=headers
        ),
        "alg_none": _b64({"alg": "none", "typ": "at+jwt", "kid": kid})
        + "."
        + _b64(_claims())
        + ".",
        "hs256_with_public_key_material": jwt.encode(
            _claims(),
            "public-key-as-hmac-secret-that-is-long-enough",
            algorithm="HS256",
            headers=headers,
        ),
        "wrong_audience": jwt.encode(
            _claims(aud="someone-else"), sign, algorithm=alg, headers=headers
        ),
        "wrong_issuer": jwt.encode(
            _claims(iss="https://evil.example"), sign, algorithm=alg, headers=headers
        ),
        "wrong_key": jwt.encode(
            _claims(),
            generate_private_key(public_exponent=65537, key_size=2048),
            algorithm=alg,
            headers=headers,
        ),
        # The key's JWK fixes its algorithm: an Ed25519 signature under the
        # RSA key's kid is refused before any signature check.
        "algorithm_not_the_keys": jwt.encode(
            _claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers=headers
        ),
        "not_yet_valid": jwt.encode(
            _claims(iat=now + 3600, nbf=now + 3600, exp=now + 7200),
            sign,
            algorithm=alg,
            headers=headers,
        ),
        "critical_extension": jwt.encode(
            _claims(), sign, algorithm=alg, headers={**headers, "crit": ["exp"]}
        ),
        "unknown_kid": jwt.encode(
            _claims(), sign, algorithm=alg, headers={"kid": "other", "typ": "at+jwt"}
        ),
        "id_token_typ": jwt.encode(
            _claims(), sign, algorithm=alg, headers={"kid": kid, "typ": "JWT"}
        ),
        "garbage": "not-a-jwt",
    }


@pytest.mark.parametrize("service", SERVICES)
async def test_gw02_token_negatives_are_401_problem_json_on_every_service(
    service, start_service, signing_key, mint
):
    svc = await start_service(service)
    missing = await svc.client.get("/auth/whoami")
    assert missing.status_code == 401
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    for name, token in bad_tokens(signing_key).items():
        r = await svc.client.get("/auth/whoami", headers=auth(token))
        assert r.status_code == 401, (service, name, r.text)
        assert r.headers["content-type"] == "application/problem+json", name
        assert r.json()["status"] == 401
    good = await svc.client.get(
        "/auth/whoami", headers=auth(mint("bureau", tenants=["region:jinhua"]))
    )
    assert good.status_code == 200
    assert good.json()["roles"] == ["bureau"]
