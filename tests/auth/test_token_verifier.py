"""GW-02 / X-02: the hand-written access-token check (`chassis.auth.TokenVerifier`)
gives PyJWT's verdict on every token PyJWT can judge, and is stricter where it
says so. Identity signs RS256 with the RSA keys it makes; an Ed25519 key kept
from an earlier release still signs EdDSA and still verifies."""

from __future__ import annotations

import base64
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, generate_private_key
from cryptography.hazmat.primitives.hashes import SHA256

from chassis.auth import StaticKeySource, TokenVerifier
from chassis.errors import Problem
from services.identity.tokens import SigningKey, TokenIssuer, jwk_thumbprint
from tests.conftest import AUDIENCE, ISSUER

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
REQUIRED = ["exp", "iat", "iss", "aud", "sub"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, SigningKey]:
    folder = tmp_path_factory.mktemp("verifier-keys")
    legacy = folder / "legacy-ed25519.pem"
    legacy.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return SigningKey.load_or_create(folder / "new.pem"), SigningKey.load_or_create(legacy)


def _jwks(keys: tuple[SigningKey, SigningKey]) -> dict[str, Any]:
    return {"keys": [k.public_jwk() for k in keys]}


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "u1",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "j1",
        "roles": ["parent"],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not ...}


def _sign(key: SigningKey, claims: dict[str, Any], **header: Any) -> str:
    headers = {"kid": key.kid, "typ": "at+jwt", **header}
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers=headers)


def _rs256_raw(key: SigningKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """Signed as given (PyJWT rewrites some header members)."""
    signing_input = f"{_b64(header)}.{_b64(claims)}"
    assert isinstance(key.private_key, RSAPrivateKey)
    signature = key.private_key.sign(signing_input.encode(), PKCS1v15(), SHA256())
    return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def _b64(data: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _pyjwt_accepts(token: str, jwks: dict[str, Any]) -> bool:
    try:
        header = jwt.get_unverified_header(token)
        if str(header.get("typ", "")).lower() != "at+jwt":
            return False  # RFC 9068: PyJWT leaves the type to its caller
        jwk = next((k for k in jwks["keys"] if k["kid"] == header.get("kid")), None)
        if jwk is None:
            return False
        jwt.decode(
            token,
            jwt.PyJWK(jwk),
            algorithms=["RS256", "EdDSA"],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=30,
            options={"require": REQUIRED},
        )
        return True
    except (jwt.PyJWTError, ValueError, TypeError):
        return False


async def _ours_accepts(verifier: TokenVerifier, token: str) -> bool:
    try:
        await verifier.verify(token)
        return True
    except Problem as problem:
        assert problem.status == 401
        assert problem.headers["WWW-Authenticate"].startswith("Bearer")
        return False


def _corpus(keys: tuple[SigningKey, SigningKey]) -> dict[str, str]:
    rsa, ed = keys
    now = int(time.time())
    tokens: dict[str, str] = {}
    for key in keys:
        name = key.algorithm
        good = _sign(key, _claims())
        tokens[f"{name} good"] = good
        header, payload, signature = good.split(".")
        for segment_index, segment in enumerate((header, payload, signature)):
            for position in range(0, len(segment), 5):
                swapped = ALPHABET[(ALPHABET.index(segment[position]) + 17) % 64]
                parts = [header, payload, signature]
                parts[segment_index] = segment[:position] + swapped + segment[position + 1 :]
                tokens[f"{name} segment {segment_index} char {position}"] = ".".join(parts)
        tokens[f"{name} no signature"] = f"{header}.{payload}."
        tokens[f"{name} four segments"] = good + ".e30"
        tokens[f"{name} signature of another token"] = (
            f"{header}.{_b64(_claims(roles=['bureau']))}.{signature}"
        )
        variants = {
            "expired": _claims(iat=now - 3600, nbf=now - 3600, exp=now - 600),
            "expired within leeway": _claims(exp=now - 10),
            "issued in the future": _claims(iat=now + 600, nbf=now, exp=now + 900),
            "issued just ahead, within leeway": _claims(iat=now + 10),
            "not yet valid": _claims(nbf=now + 600, exp=now + 900),
            "audience list with ours": _claims(aud=["other", AUDIENCE]),
            "audience list without ours": _claims(aud=["other"]),
            "audience a number": _claims(aud=7),
            "wrong issuer": _claims(iss="https://evil.example"),
            "subject a number": _claims(sub=7),
            "jti a number": _claims(jti=7),
            "exp a float": _claims(exp=now + 300.5),
            "payload a list": ["not", "an", "object"],
            **{f"no {claim}": _claims(**{claim: ...}) for claim in REQUIRED},
        }
        for variant, claims in variants.items():
            if isinstance(claims, list):
                payload_segment = base64.urlsafe_b64encode(json.dumps(claims).encode())
                token = jwt.api_jws.encode(
                    payload_segment.rstrip(b"="),
                    key.private_key,
                    algorithm=key.algorithm,
                    headers={"kid": key.kid, "typ": "at+jwt"},
                )
                tokens[f"{name} {variant}"] = token
            else:
                tokens[f"{name} {variant}"] = _sign(key, claims)
        tokens[f"{name} id token type"] = _sign(key, _claims(), typ="JWT")
        tokens[f"{name} unknown kid"] = _sign(key, _claims(), kid="someone-else")
    # Algorithm confusion: each key's kid with the other algorithm's signature.
    tokens["EdDSA signature under the RSA kid"] = jwt.encode(
        _claims(), ed.private_key, algorithm="EdDSA", headers={"kid": rsa.kid, "typ": "at+jwt"}
    )
    tokens["RS256 signature under the Ed25519 kid"] = jwt.encode(
        _claims(), rsa.private_key, algorithm="RS256", headers={"kid": ed.kid, "typ": "at+jwt"}
    )
    signing_input = _b64({"alg": "HS256", "typ": "at+jwt", "kid": rsa.kid}) + "."
    signing_input += _b64(_claims())
    mac = hmac.new(json.dumps(rsa.public_jwk()).encode(), signing_input.encode(), "sha256")
    tokens["HS256 keyed with the public JWK"] = (
        signing_input + "." + base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()
    )
    tokens["alg none"] = _b64({"alg": "none", "typ": "at+jwt", "kid": rsa.kid}) + "."
    tokens["alg none"] += _b64(_claims()) + "."
    tokens["garbage"] = "not-a-jwt"
    tokens["empty"] = ""
    tokens["header not JSON"] = "bm90IGpzb24." + _b64(_claims()) + ".c2ln"
    return tokens


@pytest.mark.asyncio
async def test_gw02_the_token_check_agrees_with_pyjwt_on_every_token(
    keys: tuple[SigningKey, SigningKey],
) -> None:
    jwks = _jwks(keys)
    verifier = TokenVerifier(StaticKeySource(jwks), issuer=ISSUER, audience=AUDIENCE)
    corpus = _corpus(keys)
    verdicts = {name: await _ours_accepts(verifier, token) for name, token in corpus.items()}
    disagreements = {
        name: verdicts[name]
        for name, token in corpus.items()
        if verdicts[name] != _pyjwt_accepts(token, jwks)
    }
    assert disagreements == {}
    accepted = {name for name, ok in verdicts.items() if ok}
    # The corpus exercises both verdicts for both algorithms.
    for algorithm in ("RS256", "EdDSA"):
        assert f"{algorithm} good" in accepted
        assert f"{algorithm} audience list with ours" in accepted
        assert f"{algorithm} expired within leeway" in accepted
        assert f"{algorithm} expired" not in accepted
        assert f"{algorithm} signature of another token" not in accepted
    assert "EdDSA signature under the RSA kid" not in accepted
    assert "RS256 signature under the Ed25519 kid" not in accepted
    assert len(corpus) - len(accepted) > 100


@pytest.mark.asyncio
async def test_gw02_the_token_check_is_stricter_than_pyjwt_where_it_says(
    keys: tuple[SigningKey, SigningKey],
) -> None:
    rsa = keys[0]
    verifier = TokenVerifier(StaticKeySource(_jwks(keys)), issuer=ISSUER, audience=AUDIENCE)
    now = int(time.time())
    good = _sign(rsa, _claims())
    header, payload, signature = good.split(".")
    stricter = {
        # PyJWT turns "exp": "<digits>" into a number; a time is a JSON number.
        "exp a numeric string": _sign(rsa, _claims(exp=str(now + 300))),
        "exp true": _sign(rsa, _claims(exp=True)),
        "critical header extension": _sign(rsa, _claims(), crit=["exp"]),
        "unencoded payload option": _rs256_raw(
            rsa, {"alg": "RS256", "typ": "at+jwt", "kid": rsa.kid, "b64": True}, _claims()
        ),
        "a character outside base64url": f"{header}.{payload}.{signature[:-4]}+/{signature[-2:]}",
        "padding on the signature (RFC 7515 §2: none)": good + "==",
        "white space in a segment": f"{header}.{payload[:8]} {payload[8:]}.{signature}",
    }
    for name, token in stricter.items():
        assert not await _ours_accepts(verifier, token), name
    assert await _ours_accepts(verifier, good)


@pytest.mark.asyncio
async def test_gw02_a_legacy_ed25519_key_signs_eddsa_and_keeps_its_kid(
    keys: tuple[SigningKey, SigningKey], tmp_path: Path
) -> None:
    rsa, ed = keys
    assert rsa.algorithm == "RS256" and ed.algorithm == "EdDSA"
    assert rsa.public_jwk()["kty"] == "RSA" and "d" not in rsa.public_jwk()
    raw = ed.private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    # The kid an Ed25519 key had before RSA keys existed (same canonical JSON).
    assert ed.kid == jwk_thumbprint({"crv": "Ed25519", "kty": "OKP", "x": x})
    # Rotation from the legacy key to a new RSA key: both verify while both are published.
    issuer = TokenIssuer([rsa, ed], issuer=ISSUER, audience=AUDIENCE)
    verifier = TokenVerifier(StaticKeySource(issuer.jwks()), issuer=ISSUER, audience=AUDIENCE)
    for key in (rsa, ed):
        principal = await verifier.verify(_sign(key, _claims(sub=f"by-{key.algorithm}")))
        assert principal.subject == f"by-{key.algorithm}"
    assert (
        jwt.get_unverified_header(
            issuer.access_token(subject="u", kind="user", roles=["parent"], tenants=[])
        )["alg"]
        == "RS256"
    )
    reloaded = SigningKey.load_or_create(tmp_path / "k.pem")
    assert SigningKey.load_or_create(tmp_path / "k.pem").kid == reloaded.kid


def test_gw02_key_ids_are_rfc7638_thumbprints() -> None:
    # RFC 7638 §3.1's example key and thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    assert (
        jwk_thumbprint({"kty": "RSA", "n": n, "e": "AQAB"})
        == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    )


def test_gw02_a_short_rsa_key_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.pem"
    short.write_bytes(
        generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="shorter than 2048"):
        SigningKey.load_or_create(short)
