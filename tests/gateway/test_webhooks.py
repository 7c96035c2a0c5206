"""GW-05: webhook subscriptions of third-party platforms, fed by the services'
JetStream streams (real NATS) and delivered per the Standard Webhooks spec,
checked by an independent verifier (the `standardwebhooks` package)."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.types import Receive, Scope, Send

from chassis.events import Bus
from contracts.base import STREAMS, Envelope, IntegrationEvent
from contracts.homework import AssignmentPublished, BurdenAlertOpened
from contracts.identity import SchoolUpserted, StudentUpserted
from gateway.webhooks.signing import webhook_headers
from launcher.nats_server import EmbeddedNats
from services.identity.tokens import TokenIssuer
from tests.conftest import StartService
from tests.gateway.conftest import Gateway, MakeGateway, Served, client_token
from tests.support import auth, eventually

ALERT = "homework.burden.alert.opened.v1"
PUBLISHED = "homework.assignment.published.v1"


class Receiver:
    """A subscriber's endpoint: records every delivery; answers the statuses
    queued for its path (then 200)."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.statuses: dict[str, list[int]] = {}
        self.url = ""

    def at(self, path: str) -> list[dict[str, Any]]:
        return [g for g in self.got if g["path"] == path]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        queued = self.statuses.get(scope["path"], [])
        status = queued.pop(0) if queued else 200
        self.got.append(
            {
                "path": scope["path"],
                "headers": headers,
                "body": body,
                "at": time.monotonic(),
                "answered": status,
            }
        )
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class Publisher:
    """Publishes events to the producers' streams as their outbox relays do."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def publish(self, event: IntegrationEvent) -> Envelope:
        envelope = Envelope.wrap(event, source=event.TYPE.split(".", 1)[0])
        await self.bus.ensure_stream(STREAMS[envelope.source])
        await self.bus.js.publish(
            envelope.type,
            envelope.model_dump_json().encode(),
            headers={"Nats-Msg-Id": envelope.id},
        )
        return envelope


@pytest.fixture
async def publisher(nats_server: EmbeddedNats) -> AsyncIterator[Publisher]:
    bus = Bus([nats_server.url], name="test-producer")
    bus.start()
    await bus.wait_connected(10)
    yield Publisher(bus)
    await bus.close()


@pytest.fixture
async def receiver(served: Served) -> Receiver:
    r = Receiver()
    r.url = await served.start(r)
    return r


@pytest.fixture
async def gateway(make_gateway: MakeGateway, nats_server: EmbeddedNats) -> Gateway:
    return await make_gateway(
        webhooks_enabled=True,
        nats_url=nats_server.url,
        webhook_retry_base_seconds=0.3,
        webhook_poll_seconds=0.05,
        webhook_tenant_wait_seconds=5,
    )


async def subscribe(gateway: Gateway, token: str, url: str, **body: Any) -> dict[str, Any]:
    response = await gateway.client.post(
        "/api/v1/gateway/webhooks/subscriptions", headers=auth(token), json={"url": url, **body}
    )
    assert response.status_code == 201, response.text
    return response.json()


def alert(region: str, school: str, klass: str = "c1") -> BurdenAlertOpened:
    return BurdenAlertOpened(
        alert_id=f"alert-{school}-{klass}",
        school_id=school,
        region_id=region,
        class_id=klass,
        grade=3,
        median_minutes=75.0,
        limit_minutes=60,
        window_start=dt.date(2026, 11, 9),
        window_end=dt.date(2026, 11, 20),
        window_school_days=10,
    )


def assignment(school: str, klass: str) -> AssignmentPublished:
    return AssignmentPublished(
        id=f"hw-{school}-{klass}",
        school_id=school,
        class_id=klass,
        grade=3,
        date=dt.date(2026, 11, 23),
        subject="数学",
        kind="written",
        layer="basic",
        location="at_home",
        estimated_minutes=30,
    )


async def delivered(receiver: Receiver, path: str, count: int = 1) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        got = receiver.at(path)
        return got if len(got) >= count else None

    return await eventually(check, timeout=20)


async def deliveries(gateway: Gateway, token: str, sub_id: str) -> list[dict[str, Any]]:
    response = await gateway.client.get(
        f"/api/v1/gateway/webhooks/subscriptions/{sub_id}/deliveries", headers=auth(token)
    )
    assert response.status_code == 200, response.text
    return response.json()["items"]


async def test_gw05_signature_verified_independently_tampering_stale_and_replays_rejected(
    gateway: Gateway, receiver: Receiver, publisher: Publisher, issuer: TokenIssuer
) -> None:
    token = client_token(issuer, "edu-app", ["region:jinhua"])
    sub = await subscribe(gateway, token, f"{receiver.url}/hooks", event_types=[ALERT])
    assert sub["secret"].startswith("whsec_") and sub["tenants"] == ["region:jinhua"]
    envelope = await publisher.publish(alert("jinhua", "s-jh"))
    (first,) = await delivered(receiver, "/hooks")
    verifier = Webhook(sub["secret"])
    payload = verifier.verify(first["body"], first["headers"])
    assert payload["id"] == envelope.id and payload["type"] == ALERT
    assert payload["data"]["school_id"] == "s-jh"
    assert first["headers"]["webhook-id"] == envelope.id
    assert first["headers"]["content-type"] == "application/json"

    # A tampered body is rejected.
    tampered = first["body"].replace(b"s-jh", b"s-xx")
    with pytest.raises(WebhookVerificationError):
        verifier.verify(tampered, first["headers"])
    # So is a different secret.
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43 + "=").verify(first["body"], first["headers"])
    # A captured message resent later: a moved timestamp breaks the signature,
    # and one correctly signed but older than the tolerance is refused as stale.
    moved = {**first["headers"], "webhook-timestamp": str(int(time.time()) - 60)}
    with pytest.raises(WebhookVerificationError):
        verifier.verify(first["body"], moved)
    stale_at = int(time.time()) - 10 * 60
    stale = webhook_headers([sub["secret"]], envelope.id, stale_at, first["body"])
    assert stale["webhook-signature"] != first["headers"]["webhook-signature"]
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier.verify(first["body"], stale)

    # A replay (manual, by the platform) carries the same webhook-id with a
    # fresh timestamp: authentic, and a receiver that remembers ids drops it.
    async def recorded() -> dict[str, Any] | None:
        rows = await deliveries(gateway, token, sub["id"])
        return rows[0] if rows and rows[0]["status"] == "succeeded" else None

    row = await eventually(recorded, timeout=5)  # the answer is logged just after it arrives
    assert row["event_id"] == envelope.id
    replay = await gateway.client.post(
        f"/api/v1/gateway/webhooks/subscriptions/{sub['id']}/deliveries/{row['id']}/replay",
        headers=auth(token),
    )
    assert replay.status_code == 202, replay.text
    second = (await delivered(receiver, "/hooks", 2))[1]
    assert verifier.verify(second["body"], second["headers"])["id"] == envelope.id
    seen: set[str] = set()

    def accept(message: dict[str, Any]) -> bool:
        verifier.verify(message["body"], message["headers"])
        if message["headers"]["webhook-id"] in seen:
            return False
        seen.add(message["headers"]["webhook-id"])
        return True

    assert [accept(first), accept(second)] == [True, False]
    (row,) = await deliveries(gateway, token, sub["id"])
    assert row["replays"] == 1


async def test_gw05_retries_with_back_off_log_every_attempt_and_give_up_then_replay(
    make_gateway: MakeGateway,
    nats_server: EmbeddedNats,
    receiver: Receiver,
    publisher: Publisher,
    issuer: TokenIssuer,
) -> None:
    gateway = await make_gateway(
        webhooks_enabled=True,
        nats_url=nats_server.url,
        webhook_retry_base_seconds=0.3,
        webhook_poll_seconds=0.05,
        webhook_retry_window_seconds=3.0,
    )
    token = client_token(issuer, "retry-app", ["region:jinhua"])
    sub = await subscribe(gateway, token, f"{receiver.url}/flaky", event_types=["homework.*"])
    receiver.statuses["/flaky"] = [500, 503, 200]
    envelope = await publisher.publish(alert("jinhua", "s1"))
    got = await delivered(receiver, "/flaky", 3)
    assert [g["answered"] for g in got] == [500, 503, 200]
    assert {g["headers"]["webhook-id"] for g in got} == {envelope.id}
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(got)]
    # base 0.3 s doubling, ±20 %: about 0.3 s, then about 0.6 s.
    assert 0.2 < gaps[0] < 0.6 and gaps[1] > gaps[0], gaps

    async def succeeded() -> dict[str, Any] | None:
        rows = await deliveries(gateway, token, sub["id"])
        return rows[0] if rows and rows[0]["status"] == "succeeded" else None

    row = await eventually(succeeded, timeout=5)
    assert row["attempts"] == 3 and row["last_status_code"] == 200
    detail = await gateway.client.get(
        f"/api/v1/gateway/webhooks/subscriptions/{sub['id']}/deliveries/{row['id']}",
        headers=auth(token),
    )
    assert [a["status_code"] for a in detail.json()["attempt_log"]] == [500, 503, 200]
    assert detail.json()["payload"]["id"] == envelope.id

    # A receiver that keeps failing: retried until the window ends, then failed.
    receiver.statuses["/flaky"] = [500] * 100
    second = await publisher.publish(alert("jinhua", "s2"))

    async def failed() -> dict[str, Any] | None:
        rows = await deliveries(gateway, token, sub["id"])
        row = next((r for r in rows if r["event_id"] == second.id), None)
        return row if row and row["status"] == "failed" else None

    row = await eventually(failed, timeout=15)
    tries = row["attempts"]
    assert tries >= 3
    await asyncio.sleep(1.0)
    assert (
        len([g for g in receiver.at("/flaky") if g["headers"]["webhook-id"] == second.id]) == tries
    ), "no attempts after giving up"
    # Manual replay of everything that failed since a moment: delivered again.
    receiver.statuses["/flaky"] = []
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).isoformat()
    replay = await gateway.client.post(
        f"/api/v1/gateway/webhooks/subscriptions/{sub['id']}/replay",
        headers=auth(token),
        json={"since": since, "status": "failed"},
    )
    assert replay.status_code == 202 and replay.json() == {"replayed": 1}

    async def redelivered() -> dict[str, Any] | None:
        rows = await deliveries(gateway, token, sub["id"])
        row = next((r for r in rows if r["event_id"] == second.id), None)
        return row if row and row["status"] == "succeeded" else None

    row = await eventually(redelivered, timeout=10)
    assert row["replays"] == 1 and row["attempts"] == tries + 1


async def test_gw05_subscribers_receive_only_their_tenants_events(
    gateway: Gateway, receiver: Receiver, publisher: Publisher, issuer: TokenIssuer
) -> None:
    jinhua = client_token(issuer, "jinhua-app", ["region:jinhua"])
    wangcheng = client_token(issuer, "wangcheng-app", ["region:wangcheng"])
    one_school = client_token(issuer, "school-app", ["school:s-jh-1"])
    subs = {}
    for name, token in (("jinhua", jinhua), ("wangcheng", wangcheng), ("school", one_school)):
        subs[name] = await subscribe(
            gateway, token, f"{receiver.url}/{name}", event_types=["homework.*"]
        )
    # identity's roster teaches the gateway which region a school is in.
    await publisher.publish(
        SchoolUpserted(
            id="s-jh-1",
            region_id="jinhua",
            name="金华一小",
            school_system="6-3",
            stage="primary",
        )
    )
    # An assignment names only its school and class: the region comes from the link.
    published = await publisher.publish(assignment("s-jh-1", "c-1"))
    other_school = await publisher.publish(alert("jinhua", "s-jh-2"))
    wc = await publisher.publish(alert("wangcheng", "s-wc-1"))

    def ids(path: str) -> set[str]:
        return {json.loads(g["body"])["id"] for g in receiver.at(path)}

    await delivered(receiver, "/wangcheng")
    await delivered(receiver, "/jinhua", 2)
    await delivered(receiver, "/school")
    await asyncio.sleep(0.5)
    assert ids("/jinhua") == {published.id, other_school.id}
    assert ids("/wangcheng") == {wc.id}
    assert ids("/school") == {published.id}
    # The delivery logs agree (what was queued, not only what arrived).
    assert {
        r["event_id"] for r in await deliveries(gateway, wangcheng, subs["wangcheng"]["id"])
    } == {wc.id}
    assert {r["event_id"] for r in await deliveries(gateway, one_school, subs["school"]["id"])} == {
        published.id
    }


async def test_gw05_subscriptions_are_per_platform_within_its_tenants(
    gateway: Gateway, receiver: Receiver, issuer: TokenIssuer, mint: Any
) -> None:
    base = "/api/v1/gateway/webhooks/subscriptions"
    mine = client_token(issuer, "app-a", ["region:jinhua"])
    theirs = client_token(issuer, "app-b", ["region:jinhua"])
    sub = await subscribe(gateway, mine, f"{receiver.url}/a", event_types=["institutions.*"])
    # Another platform's subscription is answered exactly like a missing one.
    for method in ("GET", "PATCH", "DELETE"):
        response = await gateway.client.request(
            method,
            f"{base}/{sub['id']}",
            headers=auth(theirs),
            json={"active": False} if method == "PATCH" else None,
        )
        assert response.status_code == 404, (method, response.text)
    missing = await gateway.client.get(f"{base}/no-such-id", headers=auth(theirs))
    assert missing.json()["detail"] == response.json()["detail"]
    assert (await gateway.client.get(base, headers=auth(theirs))).json()["items"] == []
    # Tenants beyond the token's are refused.
    beyond = await gateway.client.post(
        base,
        headers=auth(mine),
        json={"url": f"{receiver.url}/a", "event_types": [ALERT], "tenants": ["region:rongchang"]},
    )
    assert beyond.status_code == 403 and beyond.json()["rule"] == "GW-05"
    # Minors' personal data is never pushed out (X-06).
    student = await gateway.client.post(
        base,
        headers=auth(mine),
        json={"url": f"{receiver.url}/a", "event_types": [StudentUpserted.TYPE]},
    )
    assert student.status_code == 422
    # Only platforms (client credentials with the webhooks scope) manage subscriptions.
    user = await gateway.client.get(base, headers=auth(mint("bureau", tenants=["region:jinhua"])))
    assert user.status_code == 403
    no_scope = client_token(issuer, "app-c", ["region:jinhua"], scope="read")
    assert (await gateway.client.get(base, headers=auth(no_scope))).status_code == 403
    # No token: refused at the edge.
    anonymous = await gateway.client.get(base)
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"
    types = await gateway.client.get("/api/v1/gateway/webhooks/event-types", headers=auth(mine))
    listed = {t["type"] for t in types.json()}
    assert ALERT in listed and StudentUpserted.TYPE not in listed


async def test_gw05_secret_rotation_signs_with_both_secrets_during_the_overlap(
    gateway: Gateway, receiver: Receiver, publisher: Publisher, issuer: TokenIssuer
) -> None:
    token = client_token(issuer, "rotating-app", ["region:jinhua"])
    sub = await subscribe(gateway, token, f"{receiver.url}/r", event_types=[ALERT])
    old = sub["secret"]
    rotated = await gateway.client.post(
        f"/api/v1/gateway/webhooks/subscriptions/{sub['id']}/rotate-secret",
        headers=auth(token),
        json={"overlap_seconds": 3600},
    )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old
    await publisher.publish(alert("jinhua", "s1"))
    (message,) = await delivered(receiver, "/r")
    assert len(message["headers"]["webhook-signature"].split(" ")) == 2
    for secret in (old, new):  # a receiver on either secret accepts it: no downtime
        Webhook(secret).verify(message["body"], message["headers"])
    # Rotating again with no overlap: only the newest secret signs.
    final = await gateway.client.post(
        f"/api/v1/gateway/webhooks/subscriptions/{sub['id']}/rotate-secret",
        headers=auth(token),
        json={"overlap_seconds": 0},
    )
    newest = final.json()["secret"]
    await publisher.publish(alert("jinhua", "s2"))
    message = (await delivered(receiver, "/r", 2))[1]
    Webhook(newest).verify(message["body"], message["headers"])
    for secret in (old, new):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(message["body"], message["headers"])


async def test_gw05_redelivered_event_is_queued_once(
    gateway: Gateway, receiver: Receiver, publisher: Publisher, issuer: TokenIssuer
) -> None:
    token = client_token(issuer, "once-app", ["region:jinhua"])
    sub = await subscribe(gateway, token, f"{receiver.url}/once", event_types=[ALERT])
    envelope = Envelope.wrap(alert("jinhua", "s1"), source="homework")
    await publisher.bus.ensure_stream(STREAMS["homework"])
    # The same event published twice past JetStream's de-duplication (as a
    # redelivery would arrive): the gateway's inbox handles it once.
    for i in range(2):
        await publisher.bus.js.publish(
            envelope.type,
            envelope.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{envelope.id}-{i}"},
        )
    await delivered(receiver, "/once")
    await asyncio.sleep(1.0)
    assert len(receiver.at("/once")) == 1
    assert len(await deliveries(gateway, token, sub["id"])) == 1


def test_gw05_gateway_database_is_migrated_by_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from chassis.config import platform_settings
    from launcher.cli import main

    monkeypatch.setenv("VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("GATEWAY_DATABASE_URL", raising=False)
    platform_settings.cache_clear()
    try:
        (tmp_path / "var").mkdir()
        assert main(["migrate", "gateway"]) == 0
    finally:
        platform_settings.cache_clear()
    with sqlite3.connect(tmp_path / "var" / "gateway.sqlite3") as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    assert {"webhook_subscriptions", "webhook_deliveries", "webhook_secrets", "inbox"} <= tables


async def test_gw05_platform_registered_in_identity_gets_identity_events_of_its_region(
    start_service: StartService,
    served: Served,
    make_gateway: MakeGateway,
    nats_server: EmbeddedNats,
    receiver: Receiver,
) -> None:
    from services.identity import schemas as id_schemas
    from services.identity import service as id_service

    identity = await start_service("identity")
    db = identity.ctx.db
    gateway = await make_gateway(
        upstreams={"identity": await served.start(identity.app)},
        webhooks_enabled=True,
        nats_url=nats_server.url,
        webhook_poll_seconds=0.05,
    )
    client, secret = await id_service.create_client(
        db, id_schemas.ClientIn(name="家校平台", scopes=["webhooks"], tenants=["region:jinhua"])
    )
    # The platform logs in through the gateway (client credentials, a public route).
    login = await gateway.client.post(
        "/api/v1/identity/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client.client_id,
            "client_secret": secret,
            "scope": "webhooks",
        },
    )
    assert login.status_code == 200, login.text
    token = login.json()["access_token"]
    sub = await subscribe(
        gateway, token, f"{receiver.url}/platform", event_types=["identity.school.*"]
    )
    for region, profile in (("jinhua", "jinhua"), ("wangcheng", "changsha-wangcheng")):
        await id_service.upsert_region(
            db, id_schemas.RegionIn(id=region, name=region, profile_id=profile)
        )
    theirs = await id_service.create_school(
        db,
        id_schemas.SchoolIn(
            region_id="wangcheng", name="望城一小", school_system="6-3", stage="primary"
        ),
    )
    ours = await id_service.create_school(
        db,
        id_schemas.SchoolIn(
            region_id="jinhua", name="金华一小", school_system="6-3", stage="primary"
        ),
    )
    (message,) = await delivered(receiver, "/platform")
    payload = Webhook(sub["secret"]).verify(message["body"], message["headers"])
    assert payload["type"] == SchoolUpserted.TYPE and payload["data"]["id"] == ours.id
    await asyncio.sleep(0.5)
    assert [json.loads(m["body"])["data"]["id"] for m in receiver.at("/platform")] == [ours.id]
    assert theirs.id != ours.id
