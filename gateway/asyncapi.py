"""AsyncAPI 3.0 document of every integration event in `contracts.EVENT_TYPES`,
and a readable HTML page of it.

One channel per event type; its address is the NATS subject (= the type).
Each message's payload is the envelope schema with `data` replaced by the
event model's JSON schema. The same bytes are the body of a webhook.
"""

from __future__ import annotations

import copy
import html
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import contracts  # noqa: F401  (registers every event type)
from contracts.base import STREAMS, Envelope, IntegrationEvent

SCHEMA_REF = "#/components/schemas/{model}"
PRODUCER_ZH = {
    "identity": "身份与名册服务",
    "homework": "作业服务",
    "afterschool": "课后服务",
    "institutions": "机构监管服务",
    "funds": "资金监管服务",
}
DESCRIPTION = """\
双减治理平台各服务之间的集成事件（事务性发件箱 → NATS JetStream）。每个事件类型是一个
主题（subject），由产生它的服务所在的流承载（流名为服务名大写，如 `IDENTITY`）。
消息体是统一的事件信封：`id`（事件编号，也是 `Nats-Msg-Id`）、`type`、`source`、
`time`（UTC）、`subject`（聚合根编号）与 `data`（事件内容）。

第三方平台不直接连接 NATS，而是通过网关订阅 Webhook（GW-05）：
`POST /api/v1/gateway/webhooks/subscriptions`。投递的请求体就是同一个事件信封，
遵循 Standard Webhooks：请求头 `webhook-id`（事件编号，重试时不变，可用于去重）、
`webhook-timestamp`（Unix 秒）与 `webhook-signature`（`v1,<Base64(HMAC-SHA256(密钥,
"id.timestamp.body"))>`，密钥轮换期间新旧密钥各签一份，以空格分隔）。
失败时按指数退避重试，最长 24 小时；订阅方只会收到其有权访问的租户（区域、学校、机构）的事件。
"""


def _channel_id(type_name: str) -> str:
    return type_name.replace(".", "_")


def build_asyncapi(
    event_types: Mapping[str, type[IntegrationEvent]], *, nats_url: str = "nats://127.0.0.1:4222"
) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    envelope = Envelope.model_json_schema(ref_template=SCHEMA_REF)
    for name, body in envelope.pop("$defs", {}).items():
        schemas[name] = body
    schemas["Envelope"] = envelope
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    for type_name in sorted(event_types):
        model = event_types[type_name]
        producer = type_name.split(".", 1)[0]
        schema = model.model_json_schema(ref_template=SCHEMA_REF)
        renames: dict[str, str] = {}
        for name, body in schema.pop("$defs", {}).items():
            target = name
            if target in schemas and schemas[target] != body:
                target = f"{producer}.{name}"
            schemas.setdefault(target, body)
            if target != name:
                renames[name] = target
        if renames:
            text = json.dumps(schema, ensure_ascii=False)
            for old, new in renames.items():
                text = text.replace(
                    f'"#/components/schemas/{old}"', f'"#/components/schemas/{new}"'
                )
            schema = json.loads(text)
        schema.setdefault("description", model.DESCRIPTION)
        schemas[type_name] = schema
        payload = copy.deepcopy(envelope)
        payload["title"] = f"{model.__name__} 事件信封"
        props = payload.setdefault("properties", {})
        props["type"] = {**props.get("type", {}), "const": type_name}
        props["source"] = {**props.get("source", {}), "const": producer}
        props["data"] = {
            "$ref": f"#/components/schemas/{type_name}",
            "description": props.get("data", {}).get("description", "事件内容"),
        }
        cid = _channel_id(type_name)
        messages[cid] = {
            "name": type_name,
            "title": model.__name__,
            "summary": model.DESCRIPTION,
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {
                    "Nats-Msg-Id": {
                        "type": "string",
                        "description": "等于事件编号 id，JetStream 据此去重",
                    }
                },
            },
            "payload": payload,
        }
        stream = STREAMS[producer].name if producer in STREAMS else producer.upper()
        channels[cid] = {
            "address": type_name,
            "title": model.DESCRIPTION or type_name,
            "description": f"由 {PRODUCER_ZH.get(producer, producer)}（{producer}）发布，"
            f"JetStream 流 `{stream}`。",
            "servers": [{"$ref": "#/servers/nats"}],
            "messages": {cid: {"$ref": f"#/components/messages/{cid}"}},
        }
        operations[f"publish_{cid}"] = {
            "action": "send",
            "title": f"发布 {type_name}",
            "summary": model.DESCRIPTION,
            "channel": {"$ref": f"#/channels/{cid}"},
            "messages": [{"$ref": f"#/channels/{cid}/messages/{cid}"}],
        }

    host = urlsplit(nats_url.split(",")[0].strip()).netloc or "127.0.0.1:4222"
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "双减治理平台 集成事件",
            "version": "1.0.0",
            "description": DESCRIPTION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": host,
                "protocol": "nats",
                "description": "NATS JetStream（平台内部）；第三方平台经网关 Webhook 接收事件",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def _type_label(prop: Mapping[str, Any]) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in prop:
        return " | ".join(_type_label(p) for p in prop["anyOf"])
    kind = prop.get("type", "")
    if kind == "array":
        return f"{_type_label(prop.get('items', {}))}[]"
    if "enum" in prop:
        return " | ".join(json.dumps(v, ensure_ascii=False) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"], ensure_ascii=False)
    fmt = prop.get("format")
    return f"{kind} ({fmt})" if fmt else str(kind or "any")


def _fields_table(schema: Mapping[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        desc = prop.get("description", "")
        rows.append(
            f"<tr><td><code>{html.escape(name)}</code></td>"
            f"<td><code>{html.escape(_type_label(prop))}</code></td>"
            f"<td>{'是' if name in required else '否'}</td><td>{html.escape(desc)}</td></tr>"
        )
    if not rows:
        return "<p>（无字段）</p>"
    return (
        "<table><thead><tr><th>字段</th><th>类型</th><th>必填</th><th>说明</th></tr>"
        "</thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def render_html(doc: Mapping[str, Any]) -> str:
    schemas = doc["components"]["schemas"]
    sections = []
    toc = []
    for cid, channel in doc["channels"].items():
        address = channel["address"]
        schema = schemas.get(address, {})
        toc.append(
            f'<li><a href="#{html.escape(cid)}"><code>{html.escape(address)}</code></a>'
            f" — {html.escape(channel.get('title', ''))}</li>"
        )
        nested = []
        for ref in sorted(set(_refs(schema))):
            name = ref.rsplit("/", 1)[-1]
            if name in schemas:
                nested.append(
                    f"<h4><code>{html.escape(name)}</code></h4>" + _fields_table(schemas[name])
                )
        sections.append(
            f'<section id="{html.escape(cid)}"><h3><code>{html.escape(address)}</code></h3>'
            f"<p>{html.escape(channel.get('title', ''))}</p>"
            f"<p class=meta>{html.escape(channel.get('description', ''))}</p>"
            f"<h4>data</h4>{_fields_table(schema)}{''.join(nested)}</section>"
        )
    description = "".join(
        f"<p>{html.escape(p)}</p>" for p in doc["info"]["description"].split("\n\n")
    )
    return f"""<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(doc["info"]["title"])}（AsyncAPI {html.escape(doc["asyncapi"])}）</title>
<style>
body{{font-family:system-ui,-apple-system,"PingFang SC","Microsoft YaHei",sans-serif;
max-width:70rem;margin:2rem auto;padding:0 1rem;line-height:1.6;color:#222}}
table{{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}}
th,td{{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}}
th{{background:#f5f5f5}} code{{background:#f3f3f3;padding:0 .2rem;border-radius:3px}}
section{{border-top:1px solid #ccc;padding-top:.5rem}} .meta{{color:#666}}
</style></head><body>
<h1>{html.escape(doc["info"]["title"])}</h1>
<p class=meta>AsyncAPI {html.escape(doc["asyncapi"])} ·
<a href="/asyncapi.json">/asyncapi.json</a> · <a href="/docs">HTTP 接口文档</a></p>
{description}
<h2>事件信封</h2>{_fields_table(schemas["Envelope"])}
<h2>事件类型（{len(doc["channels"])}）</h2><ul>{"".join(toc)}</ul>
{"".join(sections)}
</body></html>"""


def _refs(node: Any) -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                out.append(value)
            else:
                out.extend(_refs(value))
    elif isinstance(node, list):
        for item in node:
            out.extend(_refs(item))
    return out
