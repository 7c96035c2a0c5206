"""identity: accounts, tokens (OAuth2, JWKS) and the school roster."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from chassis.app import ServiceContext, ServiceSpec, create_service_app
from chassis.auth import StaticKeySource, TokenVerifier
from services.identity.api import router
from services.identity.models import Base
from services.identity.tokens import SigningKey, TokenIssuer

HERE = Path(__file__).resolve().parent


async def _on_startup(ctx: ServiceContext, app: FastAPI) -> None:
    key_file = os.environ.get("IDENTITY_SIGNING_KEY_FILE")
    path = Path(key_file) if key_file else ctx.platform.var_dir / "identity-signing-key.pem"
    keys = [SigningKey.load_or_create(path)]
    # Keys being rotated out stay in the JWKS until their tokens expire.
    for old in filter(None, os.environ.get("IDENTITY_PREVIOUS_KEY_FILES", "").split(",")):
        keys.append(SigningKey.load_or_create(Path(old)))
    ttl = int(os.environ.get("IDENTITY_ACCESS_TOKEN_TTL_SECONDS", "900"))
    issuer = TokenIssuer(
        keys,
        issuer=ctx.platform.auth_issuer,
        audience=ctx.platform.auth_audience,
        access_ttl=timedelta(seconds=ttl),
    )
    ctx.extras["issuer"] = issuer
    # identity verifies its own tokens with its own keys, no HTTP round trip.
    app.state.token_verifier = TokenVerifier(
        StaticKeySource(issuer.jwks()),
        issuer=ctx.platform.auth_issuer,
        audience=ctx.platform.auth_audience,
    )


SPEC = ServiceSpec(
    name="identity",
    title="身份与名册服务 identity",
    description="账号、OAuth2 令牌（密码模式、客户端凭证）、JWKS，以及学校名册：区域、学校、"
    "班级、教师、学生、监护人。名册的每次变更都以事件发布，其他服务据此维护只读副本。",
    routers=[router],
    metadata=Base.metadata,
    migrations_dir=HERE / "migrations",
    on_startup=_on_startup,
    openapi_tags=[
        {"name": "认证", "description": "OAuth2 令牌与公钥"},
        {"name": "区域与学校", "description": "教育局管理的区域与学校"},
        {"name": "班级与教师", "description": "班级、班主任、任课教师与在职教师名册"},
        {"name": "学生与监护人", "description": "学生、监护人与监护关系；身份证号只存哈希与掩码"},
        {"name": "账号", "description": "用户账号与第三方平台客户端"},
        {"name": "校历", "description": "法定节假日与调休（X-05）"},
    ],
)


def create_app(**kwargs: object) -> FastAPI:
    return create_service_app(SPEC, **kwargs)  # type: ignore[arg-type]
