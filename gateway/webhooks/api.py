"""The gateway's own API: webhook subscriptions of third-party platforms (GW-05).

Mounted at `/api/v1/gateway`. The edge has verified the caller's token
already; these routes take the principal from the request state. Only
platform clients (OAuth2 client credentials, scope `webhooks`) manage
subscriptions, each only its own: another client's subscription is
answered exactly like a missing one (GW-03). A subscription's tenants must
be within the token's tenants.
"""

from __future__ import annotations

import base64
import ipaddress
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, func, or_, select, update

from chassis.app import _install_openapi
from chassis.auth import Principal
from chassis.db import Database, utcnow
from chassis.errors import FieldError, Problem, install_problem_handlers
from contracts.base import EVENT_TYPES
from gateway.config import GatewaySettings
from gateway.webhooks import models as m
from gateway.webhooks.intake import matches_any
from gateway.webhooks.signing import new_secret

MAX_BULK_REPLAY = 1000


@dataclass
class WebhookContext:
    db: Database
    settings: GatewaySettings
    wake: Any  # () -> None: the dispatcher's wake-up

    def is_subscribable(self, event_type: str) -> bool:
        return not matches_any(event_type, self.settings.webhook_denied_event_types)


# ---------------------------------------------------------------- schemas


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubscriptionIn(Strict):
    url: str = Field(
        min_length=8,
        max_length=2000,
        description="接收事件的 HTTPS 地址",
        examples=["https://app.example.com/hooks/shuangjian"],
    )
    event_types: list[str] = Field(
        min_length=1,
        max_length=100,
        description="订阅的事件类型；可用通配符，如 `afterschool.*`",
        examples=[["homework.burden.alert.v1", "afterschool.*"]],
    )
    tenants: list[str] | None = Field(
        default=None,
        max_length=1000,
        description="只接收这些租户的事件（须在令牌的租户之内，如 `region:jinhua`）；"
        "缺省为令牌的全部租户",
    )
    description: str | None = Field(default=None, max_length=500, description="备注")


class SubscriptionPatch(Strict):
    url: str | None = Field(default=None, min_length=8, max_length=2000)
    event_types: list[str] | None = Field(default=None, min_length=1, max_length=100)
    tenants: list[str] | None = Field(default=None, max_length=1000)
    description: str | None = Field(default=None, max_length=500)
    active: bool | None = Field(default=None, description="停用或重新启用")


class SubscriptionOut(BaseModel):
    id: str
    url: str
    description: str | None
    event_types: list[str]
    tenants: list[str]
    active: bool
    disabled_reason: str | None = Field(description="被停用的原因（如接收方返回 410）")
    created_at: datetime
    updated_at: datetime


class SubscriptionCreated(SubscriptionOut):
    secret: str = Field(description="签名密钥 `whsec_...`，只在此时返回一次，请妥善保存")


class SubscriptionList(BaseModel):
    items: list[SubscriptionOut]


class RotateIn(Strict):
    overlap_seconds: int = Field(
        default=24 * 3600,
        ge=0,
        le=7 * 24 * 3600,
        description="旧密钥继续签名的时长（秒）：期间每条消息带新旧两个签名，接收方可从容换钥",
    )


class RotateOut(BaseModel):
    secret: str = Field(description="新签名密钥，只返回一次")
    previous_secrets_expire_at: datetime


class DeliveryOut(BaseModel):
    id: str
    event_id: str = Field(description="事件编号，即 webhook-id")
    event_type: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    replays: int
    created_at: datetime
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    give_up_at: datetime = Field(description="超过此时间不再重试")


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None = None


class AttemptOut(BaseModel):
    attempted_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    response_excerpt: str | None


class DeliveryDetail(DeliveryOut):
    payload: dict[str, Any] = Field(description="投递的事件信封（请求体）")
    attempt_log: list[AttemptOut]


class ReplayIn(Strict):
    since: datetime = Field(description="重放此时间之后产生的投递")
    until: datetime | None = None
    status: Literal["any", "failed", "succeeded"] = "any"


class ReplayOut(BaseModel):
    replayed: int


class EventTypeOut(BaseModel):
    type: str
    description: str
    producer: str
    public: bool = Field(description="公开事件：不论租户都会投递")


# ---------------------------------------------------------------- dependencies

_bearer = HTTPBearer(auto_error=False, description="平台客户端的访问令牌（客户端凭证模式）")


def context(request: Request) -> WebhookContext:
    ctx: WebhookContext | None = getattr(request.app.state, "webhooks", None)
    if ctx is None:
        raise Problem(503, "Webhook 功能未启用。")
    return ctx


async def platform_client(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        raise Problem(
            401, "缺少访问令牌（Authorization: Bearer …）。", headers={"WWW-Authenticate": "Bearer"}
        )
    if principal.kind != "client" or not principal.client_id:
        raise Problem(
            403, "只有第三方平台（OAuth2 客户端凭证）可以管理 Webhook 订阅。", rule="GW-05"
        )
    scope = getattr(request.app.state, "webhook_scope", "")
    if scope and scope not in principal.scopes:
        raise Problem(403, f"令牌缺少所需权限范围 {scope}。", rule="GW-05")
    return principal


Ctx = Annotated[WebhookContext, Depends(context)]
Client = Annotated[Principal, Depends(platform_client)]


def _field_problem(field: str, message: str, status: int = 422) -> Problem:
    return Problem(status, message, errors=[FieldError(field=field, message=message)], rule="GW-05")


BLOCKED_SUFFIXES = (".local", ".localhost", ".internal", ".svc", ".cluster.local", ".invalid")


def _check_url(url: str, settings: GatewaySettings) -> str:
    parts = urlsplit(url)
    schemes = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parts.scheme not in schemes:
        raise _field_problem("body.url", "接收地址须为 https 地址。")
    host = parts.hostname or ""
    if not host:
        raise _field_problem("body.url", "接收地址缺少主机名。")
    if parts.username or parts.password:
        raise _field_problem("body.url", "接收地址不能包含用户名或密码。")
    if not settings.webhook_allow_private_targets:
        try:
            private = not ipaddress.ip_address(host).is_global
        except ValueError:
            private = host == "localhost" or host.endswith(BLOCKED_SUFFIXES) or "." not in host
        if private:
            raise _field_problem("body.url", "接收地址须为公网地址。")
    return url


def _check_event_types(types: list[str], ctx: WebhookContext) -> list[str]:
    out = []
    for t in types:
        t = t.strip()
        if "*" in t or "?" in t:
            if not any(matches_any(k, [t]) and ctx.is_subscribable(k) for k in EVENT_TYPES):
                raise _field_problem(
                    "body.event_types", f"通配符 {t} 没有匹配任何可订阅的事件类型。"
                )
        elif t not in EVENT_TYPES:
            raise _field_problem("body.event_types", f"未知的事件类型 {t}。")
        elif not ctx.is_subscribable(t):
            raise _field_problem(
                "body.event_types",
                f"事件类型 {t} 含未成年人或教职工个人信息，不向第三方平台推送（X-06）。",
            )
        if t not in out:
            out.append(t)
    return out


def _check_tenants(requested: list[str] | None, principal: Principal) -> list[str]:
    if requested is None:
        return sorted(principal.tenants)
    outside = sorted(set(requested) - principal.tenants)
    if outside:
        raise Problem(
            403,
            "不能订阅令牌授权范围之外的租户：" + "，".join(outside) + "。",
            rule="GW-05",
            errors=[FieldError(field="body.tenants", message="超出授权范围")],
        )
    return sorted(set(requested))


def _out(row: Any) -> SubscriptionOut:
    return SubscriptionOut.model_validate(dict(row._mapping))


async def _owned(ctx: WebhookContext, principal: Principal, subscription_id: str) -> Any:
    s = m.subscriptions
    async with ctx.db.read() as session:
        row = (
            await session.execute(
                select(s).where(s.c.id == subscription_id, s.c.owner == principal.client_id)
            )
        ).first()
    if row is None:
        raise Problem(404, "订阅不存在。")
    return row


# ---------------------------------------------------------------- routes

router = APIRouter(prefix="/webhooks")
SUBS = "Webhook 订阅"
LOG = "Webhook 投递记录"


@router.get(
    "/event-types", response_model=list[EventTypeOut], tags=[SUBS], summary="可订阅的事件类型"
)
async def event_types(ctx: Ctx, _: Client) -> list[EventTypeOut]:
    return [
        EventTypeOut(
            type=t,
            description=cls.DESCRIPTION,
            producer=t.split(".", 1)[0],
            public=matches_any(t, ctx.settings.webhook_public_event_types),
        )
        for t, cls in sorted(EVENT_TYPES.items())
        if ctx.is_subscribable(t)
    ]


@router.post(
    "/subscriptions",
    response_model=SubscriptionCreated,
    status_code=201,
    tags=[SUBS],
    summary="新建订阅（返回签名密钥，仅此一次）",
)
async def create_subscription(
    body: SubscriptionIn, ctx: Ctx, principal: Client
) -> SubscriptionCreated:
    url = _check_url(body.url, ctx.settings)
    types = _check_event_types(body.event_types, ctx)
    tenants = _check_tenants(body.tenants, principal)
    s = m.subscriptions
    now = utcnow()
    secret = new_secret()
    sub_id = str(uuid.uuid4())
    async with ctx.db.transaction() as session:
        count = (
            await session.execute(
                select(func.count()).select_from(s).where(s.c.owner == principal.client_id)
            )
        ).scalar() or 0
        if count >= ctx.settings.webhook_max_subscriptions:
            raise Problem(
                409, f"每个平台最多 {ctx.settings.webhook_max_subscriptions} 个订阅。", rule="GW-05"
            )
        await session.execute(
            s.insert().values(
                id=sub_id,
                owner=principal.client_id,
                url=url,
                description=body.description,
                event_types=types,
                tenants=tenants,
                active=True,
                disabled_reason=None,
                created_at=now,
                updated_at=now,
            )
        )
        await session.execute(
            m.secrets.insert().values(
                subscription_id=sub_id, secret=secret, created_at=now, expires_at=None
            )
        )
    row = await _owned(ctx, principal, sub_id)
    return SubscriptionCreated(**_out(row).model_dump(), secret=secret)


@router.get("/subscriptions", response_model=SubscriptionList, tags=[SUBS], summary="本平台的订阅")
async def list_subscriptions(ctx: Ctx, principal: Client) -> SubscriptionList:
    s = m.subscriptions
    async with ctx.db.read() as session:
        rows = (
            await session.execute(
                select(s).where(s.c.owner == principal.client_id).order_by(s.c.created_at)
            )
        ).all()
    return SubscriptionList(items=[_out(r) for r in rows])


@router.get(
    "/subscriptions/{subscription_id}",
    response_model=SubscriptionOut,
    tags=[SUBS],
    summary="查看订阅",
)
async def get_subscription(subscription_id: str, ctx: Ctx, principal: Client) -> SubscriptionOut:
    return _out(await _owned(ctx, principal, subscription_id))


@router.patch(
    "/subscriptions/{subscription_id}",
    response_model=SubscriptionOut,
    tags=[SUBS],
    summary="修改订阅（地址、事件类型、租户、启停）",
)
async def update_subscription(
    subscription_id: str, body: SubscriptionPatch, ctx: Ctx, principal: Client
) -> SubscriptionOut:
    await _owned(ctx, principal, subscription_id)
    values: dict[str, Any] = {}
    if body.url is not None:
        values["url"] = _check_url(body.url, ctx.settings)
    if body.event_types is not None:
        values["event_types"] = _check_event_types(body.event_types, ctx)
    if body.tenants is not None:
        values["tenants"] = _check_tenants(body.tenants, principal)
    if body.description is not None:
        values["description"] = body.description
    if body.active is not None:
        values["active"] = body.active
        if body.active:
            values["disabled_reason"] = None
    if values:
        values["updated_at"] = utcnow()
        s = m.subscriptions
        async with ctx.db.transaction() as session:
            await session.execute(update(s).where(s.c.id == subscription_id).values(**values))
        if values.get("active"):
            ctx.wake()
    return _out(await _owned(ctx, principal, subscription_id))


@router.delete(
    "/subscriptions/{subscription_id}",
    status_code=204,
    tags=[SUBS],
    summary="删除订阅（连同投递记录）",
)
async def delete_subscription(subscription_id: str, ctx: Ctx, principal: Client) -> None:
    await _owned(ctx, principal, subscription_id)
    async with ctx.db.transaction() as session:
        await session.execute(
            m.subscriptions.delete().where(m.subscriptions.c.id == subscription_id)
        )


@router.post(
    "/subscriptions/{subscription_id}/rotate-secret",
    response_model=RotateOut,
    tags=[SUBS],
    summary="轮换签名密钥（新旧密钥在过渡期内同时签名，不停机）",
)
async def rotate_secret(
    subscription_id: str, ctx: Ctx, principal: Client, body: RotateIn | None = None
) -> RotateOut:
    await _owned(ctx, principal, subscription_id)
    overlap = (body or RotateIn()).overlap_seconds
    now = utcnow()
    expires = now + timedelta(seconds=overlap)
    secret = new_secret()
    k = m.secrets
    async with ctx.db.transaction() as session:
        # Secrets still signing now stop at the end of the overlap (never later
        # than they would have anyway).
        await session.execute(
            update(k)
            .where(k.c.subscription_id == subscription_id, k.c.expires_at.is_(None))
            .values(expires_at=expires)
        )
        await session.execute(
            update(k)
            .where(k.c.subscription_id == subscription_id, k.c.expires_at > expires)
            .values(expires_at=expires)
        )
        await session.execute(
            k.insert().values(
                subscription_id=subscription_id, secret=secret, created_at=now, expires_at=None
            )
        )
        await session.execute(
            k.delete().where(
                k.c.subscription_id == subscription_id, k.c.expires_at < now - timedelta(days=1)
            )
        )
    return RotateOut(secret=secret, previous_secrets_expire_at=expires)


def _encode_cursor(created_at: datetime, delivery_id: str) -> str:
    raw = f"{created_at.isoformat()}|{delivery_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, delivery_id = raw.partition("|")
        return datetime.fromisoformat(at), delivery_id
    except (ValueError, UnicodeDecodeError):
        raise Problem(
            422, "分页游标无效。", errors=[FieldError(field="query.cursor", message="游标无效")]
        ) from None


@router.get(
    "/subscriptions/{subscription_id}/deliveries",
    response_model=DeliveryPage,
    tags=[LOG],
    summary="投递记录（新的在前）",
)
async def list_deliveries(
    subscription_id: str,
    ctx: Ctx,
    principal: Client,
    status: Annotated[
        Literal["pending", "succeeded", "failed"] | None, Query(description="按状态筛选")
    ] = None,
    event_type: Annotated[str | None, Query(description="按事件类型筛选")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="每页条数")] = 50,
    cursor: Annotated[str | None, Query(description="上一页返回的 next_cursor")] = None,
) -> DeliveryPage:
    await _owned(ctx, principal, subscription_id)
    d = m.deliveries
    query = select(d).where(d.c.subscription_id == subscription_id)
    if status:
        query = query.where(d.c.status == status)
    if event_type:
        query = query.where(d.c.event_type == event_type)
    if cursor:
        at, last_id = _decode_cursor(cursor)
        query = query.where(or_(d.c.created_at < at, and_(d.c.created_at == at, d.c.id < last_id)))
    query = query.order_by(d.c.created_at.desc(), d.c.id.desc()).limit(limit + 1)
    async with ctx.db.read() as session:
        rows = (await session.execute(query)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [DeliveryOut.model_validate(dict(r._mapping)) for r in rows]
    next_cursor = _encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return DeliveryPage(items=items, next_cursor=next_cursor)


async def _owned_delivery(ctx: WebhookContext, subscription_id: str, delivery_id: str) -> Any:
    d = m.deliveries
    async with ctx.db.read() as session:
        row = (
            await session.execute(
                select(d).where(d.c.id == delivery_id, d.c.subscription_id == subscription_id)
            )
        ).first()
    if row is None:
        raise Problem(404, "投递记录不存在。")
    return row


@router.get(
    "/subscriptions/{subscription_id}/deliveries/{delivery_id}",
    response_model=DeliveryDetail,
    tags=[LOG],
    summary="一次投递的详情与每次尝试",
)
async def get_delivery(
    subscription_id: str, delivery_id: str, ctx: Ctx, principal: Client
) -> DeliveryDetail:
    import json

    await _owned(ctx, principal, subscription_id)
    row = await _owned_delivery(ctx, subscription_id, delivery_id)
    a = m.attempts
    async with ctx.db.read() as session:
        tries = (
            await session.execute(select(a).where(a.c.delivery_id == delivery_id).order_by(a.c.id))
        ).all()
    data = dict(row._mapping)
    data["payload"] = json.loads(data["payload"])
    data["attempt_log"] = [AttemptOut.model_validate(dict(t._mapping)) for t in tries]
    return DeliveryDetail.model_validate(data)


def _replay_values(ctx: WebhookContext) -> dict[str, Any]:
    now = utcnow()
    return {
        "status": "pending",
        "next_attempt_at": now,
        "give_up_at": now + timedelta(seconds=ctx.settings.webhook_retry_window_seconds),
        "replays": m.deliveries.c.replays + 1,
    }


@router.post(
    "/subscriptions/{subscription_id}/deliveries/{delivery_id}/replay",
    response_model=DeliveryOut,
    status_code=202,
    tags=[LOG],
    summary="重新投递一条（同一 webhook-id，接收方可去重）",
)
async def replay_delivery(
    subscription_id: str, delivery_id: str, ctx: Ctx, principal: Client
) -> DeliveryOut:
    await _owned(ctx, principal, subscription_id)
    await _owned_delivery(ctx, subscription_id, delivery_id)
    d = m.deliveries
    async with ctx.db.transaction() as session:
        await session.execute(update(d).where(d.c.id == delivery_id).values(**_replay_values(ctx)))
    ctx.wake()
    return DeliveryOut.model_validate(
        dict((await _owned_delivery(ctx, subscription_id, delivery_id))._mapping)
    )


@router.post(
    "/subscriptions/{subscription_id}/replay",
    response_model=ReplayOut,
    status_code=202,
    tags=[LOG],
    summary=f"按时间段重新投递（一次最多 {MAX_BULK_REPLAY} 条）",
)
async def replay_range(
    subscription_id: str, body: ReplayIn, ctx: Ctx, principal: Client
) -> ReplayOut:
    await _owned(ctx, principal, subscription_id)
    d = m.deliveries
    conditions = [
        d.c.subscription_id == subscription_id,
        d.c.created_at >= body.since,
        d.c.status != "pending",
    ]
    if body.until is not None:
        conditions.append(d.c.created_at < body.until)
    if body.status != "any":
        conditions.append(d.c.status == body.status)
    async with ctx.db.transaction() as session:
        ids = list(
            (
                await session.execute(
                    select(d.c.id)
                    .where(*conditions)
                    .order_by(d.c.created_at)
                    .limit(MAX_BULK_REPLAY)
                )
            ).scalars()
        )
        if ids:
            await session.execute(update(d).where(d.c.id.in_(ids)).values(**_replay_values(ctx)))
    if ids:
        ctx.wake()
    return ReplayOut(replayed=len(ids))


def create_api() -> FastAPI:
    app = FastAPI(
        title="网关 gateway",
        description="网关自身的接口：第三方平台的 Webhook 订阅、签名密钥轮换、"
        "投递记录与重放（GW-05）。"
        "需要客户端凭证模式的访问令牌（权限范围 `webhooks`）。",
        version="1.0.0",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        openapi_tags=[
            {
                "name": SUBS,
                "description": "订阅事件、轮换签名密钥。投递遵循 Standard Webhooks："
                "请求头 webhook-id、webhook-timestamp、webhook-signature"
                '（v1,Base64(HMAC-SHA256(密钥, "id.timestamp.body"))）。',
            },
            {
                "name": LOG,
                "description": "每次投递与每次尝试的记录；失败的投递按指数退避重试 24 小时，"
                "也可手动重放。",
            },
        ],
    )
    install_problem_handlers(app)
    app.include_router(router)
    _install_openapi(app)
    return app
