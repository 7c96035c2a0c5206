"""One OpenAPI 3.1 document for the whole platform (GW-01).

Every service's `/openapi.json` is fetched, its paths prefixed with
`/api/v1/<service>`, its components merged: a component defined identically
by every service that has it (ProblemDetail, FieldError) is shared, one
whose definitions differ is renamed `<Service>_<Name>` in each service, and
every `$ref` is rewritten to match. Upstream bearer schemes are replaced by
the gateway's: a bearer token, and OAuth2 password and client-credentials
flows against `/api/v1/identity/oauth/token`.

`DocsRegistry` keeps the document fresh: re-fetched on a timer, sooner while
a service is missing, and at once when the proxy first sees a missing
service answer.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog

from chassis.errors import PROBLEM_MEDIA_TYPE, ProblemDetail
from gateway.aio import wait_event
from gateway.config import GATEWAY_SERVICE, GatewaySettings
from gateway.edge import PublicRoutes

log = structlog.get_logger("gateway.docs")

TOKEN_URL = "/api/v1/identity/oauth/token"
COMPONENT_SECTIONS = (
    "schemas",
    "responses",
    "parameters",
    "examples",
    "requestBodies",
    "headers",
    "securitySchemes",
    "links",
    "callbacks",
    "pathItems",
)
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Operations endpoints of each service are for the platform's operators and
# probes, not for API clients; the gateway documents its own.
HIDDEN_UPSTREAM_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
SERVICE_TITLES_ZH = {
    "identity": "身份与名册服务",
    "homework": "作业公示与负担监测服务",
    "afterschool": "课后服务",
    "institutions": "校外培训机构监管服务",
    "funds": "预收费资金监管服务",
    GATEWAY_SERVICE: "网关（Webhook 订阅）",
}
BEARER = "bearerAuth"
OAUTH2 = "OAuth2"
GATEWAY_SECURITY_SCHEMES: dict[str, Any] = {
    BEARER: {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "identity 签发的访问令牌（RS256 签名的 JWT；"
        "旧的 Ed25519 密钥签 EdDSA），放在 "
        "`Authorization: Bearer <令牌>` 中。网关在入口验证一次，服务再各自验证。",
    },
    OAUTH2: {
        "type": "oauth2",
        "description": "用户以密码模式登录；"
        "第三方平台以客户端凭证模式获取令牌（带权限范围与租户）。",
        "flows": {
            "password": {"tokenUrl": TOKEN_URL, "refreshUrl": TOKEN_URL, "scopes": {}},
            "clientCredentials": {
                "tokenUrl": TOKEN_URL,
                "scopes": {"webhooks": "管理 Webhook 订阅（GW-05）"},
            },
        },
    },
}
GATEWAY_SECURITY: list[dict[str, list[str]]] = [{BEARER: []}, {OAUTH2: []}]
INTRO = """\
双减治理平台的统一入口（GW-01）。所有接口都在 `/api/v1/<服务>/...` 之下：
identity（身份与名册）、homework（作业公示与负担监测）、afterschool（课后服务）、
institutions（校外培训机构监管）、funds（预收费资金监管），以及网关自身的 Webhook 订阅接口。

**认证**：用户用 OAuth2 密码模式登录，第三方平台用客户端凭证模式，令牌端点为
`POST /api/v1/identity/oauth/token`。除公开接口（令牌端点、公钥、节假日安排、
机构与作业的公开查询、投诉举报）外，请求须带 `Authorization: Bearer <令牌>`；
网关在入口拒绝缺失或无效的令牌（401），服务再按角色与租户逐一授权（GW-03）。

**限流**（GW-04）：按客户端与来源地址的令牌桶限流；登录、投诉提交与课后服务报名更严格。
超限返回 429 与 `Retry-After`（秒）。

**错误**：均为 RFC 9457 `application/problem+json`，`detail` 为中文说明，`rule`
为拒绝请求的政策规则编号，`request_id` 与响应头 `X-Request-ID` 一致，便于追踪。
上游服务不可用时返回 502，超时返回 504，`service` 字段指明是哪个服务。

**事件与 Webhook**（GW-05）：集成事件见 [`/asyncapi`](/asyncapi)；第三方平台可通过
`/api/v1/gateway/webhooks/...` 订阅，投递遵循 Standard Webhooks 签名规范。
"""


def _ref_key(ref: str) -> tuple[str, str, str] | None:
    """`#/components/schemas/Foo/properties/x` -> ("schemas", "Foo", "/properties/x")."""
    if not ref.startswith("#/components/"):
        return None
    parts = ref[len("#/components/") :].split("/", 2)
    if len(parts) < 2:
        return None
    name = parts[1].replace("~1", "/").replace("~0", "~")
    return parts[0], name, ("/" + parts[2]) if len(parts) == 3 else ""


def _walk_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            elif key == "mapping" and isinstance(value, dict):
                yield from (v for v in value.values() if isinstance(v, str))
            else:
                yield from _walk_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_refs(item)


def _rewrite_refs(node: Any, renames: Mapping[tuple[str, str], str]) -> Any:
    def fix(ref: str) -> str:
        key = _ref_key(ref)
        if key is None:
            return ref
        new = renames.get((key[0], key[1]))
        return ref if new is None else f"#/components/{key[0]}/{new}{key[2]}"

    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                out[key] = fix(value)
            elif key == "mapping" and isinstance(value, dict):
                out[key] = {k: fix(v) if isinstance(v, str) else v for k, v in value.items()}
            else:
                out[key] = _rewrite_refs(value, renames)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item, renames) for item in node]
    return node


def dangling_refs(doc: Mapping[str, Any]) -> list[str]:
    """Every `$ref` (and discriminator mapping) that points nowhere in `doc`."""
    missing = []
    components = doc.get("components", {})
    for ref in _walk_refs(doc):
        key = _ref_key(ref)
        if key is None:
            if ref.startswith("#"):
                missing.append(ref)
            continue
        section, name, _ = key
        if name not in components.get(section, {}):
            missing.append(ref)
    return sorted(set(missing))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _is_token_scheme(scheme: Any) -> bool:
    if not isinstance(scheme, dict):
        return False
    kind = scheme.get("type")
    return kind == "oauth2" or (
        kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer"
    )


def _prefix(service: str) -> str:
    return service[:1].upper() + service[1:]


def _problem_schemas() -> dict[str, Any]:
    schema = ProblemDetail.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {**defs, "ProblemDetail": schema}


def merge_openapi(
    specs: Mapping[str, Mapping[str, Any]],
    *,
    public: PublicRoutes | None = None,
    status: Mapping[str, Mapping[str, Any]] | None = None,
    version: str = "1.0.0",
) -> dict[str, Any]:
    """Merge per-service OpenAPI documents (keyed by service name)."""
    specs = {name: copy.deepcopy(dict(spec)) for name, spec in specs.items()}
    token_schemes: dict[str, set[str]] = {}
    for name, spec in specs.items():
        schemes = spec.get("components", {}).get("securitySchemes", {})
        token_schemes[name] = {k for k, v in schemes.items() if _is_token_scheme(v)}
        for k in token_schemes[name]:
            del schemes[k]

    # Which component names are defined where, and are they the same?
    definitions: dict[tuple[str, str], dict[str, Any]] = {}
    for name, spec in specs.items():
        for section in COMPONENT_SECTIONS:
            for comp, body in spec.get("components", {}).get(section, {}).items():
                definitions.setdefault((section, comp), {})[name] = body
    clashing = {k for k, d in definitions.items() if len(d) > 1}
    shared = {k for k in clashing if len({_canonical(v) for v in definitions[k].values()}) == 1}
    # A shared definition stays shared only if everything it refers to does.
    changed = True
    while changed:
        changed = False
        for key in sorted(shared):
            body = next(iter(definitions[key].values()))
            for ref in _walk_refs(body):
                target = _ref_key(ref)
                if target and (target[0], target[1]) in clashing - shared:
                    shared.discard(key)
                    changed = True
                    break
    taken = {comp for (_, comp) in definitions}
    renames: dict[str, dict[tuple[str, str], str]] = {name: {} for name in specs}
    for key in sorted(clashing - shared):
        section, comp = key
        for name in definitions[key]:
            new = f"{_prefix(name)}_{comp}"
            n = 2
            while new in taken:
                new = f"{_prefix(name)}_{comp}_{n}"
                n += 1
            taken.add(new)
            renames[name][key] = new

    merged_components: dict[str, dict[str, Any]] = {}
    paths: dict[str, Any] = {}
    tags: list[dict[str, Any]] = []
    tag_groups: list[dict[str, Any]] = []
    for name, spec in specs.items():
        spec = _rewrite_refs(spec, renames[name])
        for section in COMPONENT_SECTIONS:
            for comp, body in spec.get("components", {}).get(section, {}).items():
                merged_components.setdefault(section, {})[
                    renames[name].get((section, comp), comp)
                ] = body
        title = SERVICE_TITLES_ZH.get(name, name)
        tag_descriptions = {
            t["name"]: t.get("description", "")
            for t in spec.get("tags", [])
            if isinstance(t, dict) and "name" in t
        }
        group: list[str] = []

        def tag_name(tag: str, title: str = title) -> str:
            return f"{title} · {tag}"

        top_security = spec.get("security")
        for path, item in spec.get("paths", {}).items():
            if name != GATEWAY_SERVICE and path in HIDDEN_UPSTREAM_PATHS:
                continue
            full = f"/api/v1/{name}{path}"
            item = dict(item)
            for method in HTTP_METHODS:
                op = item.get(method)
                if not isinstance(op, dict):
                    continue
                op = dict(op)
                if "operationId" in op:
                    op["operationId"] = f"{name}_{op['operationId']}"
                op_tags = op.get("tags") or [title]
                op["tags"] = [tag_name(t) if t != title else t for t in op_tags]
                for t, original in zip(op["tags"], op_tags, strict=True):
                    if t not in group:
                        group.append(t)
                        tags.append(
                            {
                                "name": t,
                                "description": tag_descriptions.get(original, f"{title}（{name}）"),
                            }
                        )
                is_public = public is not None and public.matches(
                    name, method.upper(), _template_as_path(path)
                )
                security = op.get("security", top_security)
                op["security"] = _convert_security(security, token_schemes[name], is_public)
                if not op["security"]:
                    op.pop("security")
                responses = dict(op.get("responses", {}))
                if not is_public:
                    responses.setdefault("401", _problem_response("缺少或无效的访问令牌"))
                responses.setdefault(
                    "429",
                    _problem_response(
                        "请求过于频繁（GW-04），见 Retry-After 响应头",
                        headers={
                            "Retry-After": {
                                "description": "多少秒后可以重试",
                                "schema": {"type": "integer"},
                            }
                        },
                    ),
                )
                if name != GATEWAY_SERVICE:
                    responses.setdefault("502", _problem_response("上游服务不可用"))
                    responses.setdefault("504", _problem_response("上游服务超时"))
                op["responses"] = responses
                item[method] = op
            paths[full] = item
        tag_groups.append({"name": f"{title}（{name}）", "tags": group})

    schemas = merged_components.setdefault("schemas", {})
    for comp, body in _problem_schemas().items():
        schemas.setdefault(comp, body)
    merged_components.setdefault("securitySchemes", {}).update(GATEWAY_SECURITY_SCHEMES)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "双减治理平台 API",
            "version": version,
            "description": INTRO + _status_table(specs, status),
        },
        "servers": [{"url": "/", "description": "本网关"}],
        "paths": paths,
        "components": merged_components,
        "tags": tags,
        "x-tagGroups": tag_groups,
    }
    if status is not None:
        doc["x-services"] = {k: dict(v) for k, v in status.items()}
    return doc


def _template_as_path(template: str) -> str:
    # `/public/verify/{code}` matches public patterns like `/public/**`.
    return re.sub(r"\{[^/}]+\}", "x", template)


def _convert_security(security: Any, token_schemes: set[str], is_public: bool) -> list[Any]:
    if is_public:
        # The edge lets these through; a token, if sent, is still honoured.
        if security:
            return [{}, *_convert_security(security, token_schemes, False)]
        return []
    out: list[Any] = []
    converted = False
    for requirement in security or []:
        if isinstance(requirement, dict) and requirement and set(requirement) <= token_schemes:
            if not converted:
                out.extend(GATEWAY_SECURITY)
                converted = True
        elif isinstance(requirement, dict) and requirement:
            out.append(requirement)
    if not out:
        # The edge demands a token on every route that is not public.
        out = list(GATEWAY_SECURITY)
    return out


def _problem_response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}},
    }
    if headers:
        response["headers"] = headers
    return response


def _status_table(specs: Mapping[str, Any], status: Mapping[str, Mapping[str, Any]] | None) -> str:
    if not status:
        return ""
    lines = ["\n**服务文档状态**\n", "| 服务 | 状态 | 获取时间 |", "|---|---|---|"]
    labels = {
        "ok": "已合并",
        "stale": "暂不可达，使用上次获取的文档",
        "missing": "暂不可达，未合并",
    }
    for name, st in status.items():
        lines.append(
            f"| {name} | {labels.get(st.get('status', ''), st.get('status'))} | "
            f"{st.get('fetched_at') or '—'} |"
        )
    return "\n".join(lines) + "\n"


class RouteIndex:
    """Maps a request path to its OpenAPI path template (metrics labels)."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self._index: dict[tuple[str, str], list[tuple[re.Pattern[str], str]]] = {}
        for template in doc.get("paths", {}):
            parts = template.split("/", 4)
            if len(parts) < 5:
                continue
            service, rest = parts[3], "/" + parts[4]
            first = rest.split("/", 2)[1] if rest.count("/") >= 1 else ""
            key = (service, "*" if "{" in first else first)
            regex = "".join(
                "[^/]+" if seg.startswith("{") and seg.endswith("}") else re.escape(seg)
                for seg in re.split(r"(\{[^/}]+\})", rest)
            )
            self._index.setdefault(key, []).append((re.compile(regex + r"\Z"), template))
        for entries in self._index.values():
            # Literal segments before parameters: `/schools/me` before `/schools/{id}`.
            entries.sort(key=lambda e: (e[1].count("{"), -len(e[1])))

    def match(self, service: str, path: str) -> str | None:
        first = path.split("/", 2)[1] if path.count("/") >= 1 else ""
        for key in ((service, first), (service, "*")):
            for pattern, template in self._index.get(key, ()):
                if pattern.match(path):
                    return template
        return None


Fetcher = Callable[[str], Awaitable[dict[str, Any] | None]]


class DocsRegistry:
    def __init__(
        self,
        settings: GatewaySettings,
        upstreams: Mapping[str, str],
        *,
        own_spec: Callable[[], dict[str, Any]],
        public: PublicRoutes,
        on_change: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.upstreams = dict(upstreams)
        self.own_spec = own_spec
        self.public = public
        self.on_change = on_change
        self.http: aiohttp.ClientSession | None = None
        self.specs: dict[str, dict[str, Any]] = {}
        self.fetched_at: dict[str, str] = {}
        self.reachable: set[str] = set()
        self.document: dict[str, Any] = {}
        self.document_bytes = b""
        self.route_index = RouteIndex({})
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0
        self.rebuild()

    @property
    def missing(self) -> set[str]:
        return set(self.upstreams) - set(self.specs)

    def notice_up(self, service: str) -> None:
        """The proxy saw `service` answer: fetch its document if we lack it."""
        if service not in self.reachable and service in self.upstreams:
            self.reachable.add(service)
            self._wake.set()

    def start(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self._task = asyncio.create_task(self._run(), name="gateway-docs-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("docs_refresh_failed", error=repr(exc))
            delay = (
                self.settings.docs_retry_seconds
                if self.missing
                else self.settings.docs_refresh_seconds
            )
            self._wake.clear()
            await wait_event(self._wake, delay)

    async def _fetch(self, name: str, base: str) -> dict[str, Any] | None:
        assert self.http is not None
        timeout = aiohttp.ClientTimeout(total=self.settings.docs_fetch_timeout_seconds)
        try:
            async with self.http.get(f"{base}/openapi.json", timeout=timeout) as response:
                if response.status != 200:
                    return None
                spec = json.loads(await response.read())
                return spec if isinstance(spec, dict) and "paths" in spec else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def refresh(self) -> None:
        names = list(self.upstreams)
        results = await asyncio.gather(*(self._fetch(n, self.upstreams[n]) for n in names))
        changed: set[str] = set()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        self.reachable = set()
        for name, spec in zip(names, results, strict=True):
            if spec is None:
                continue
            self.reachable.add(name)
            self.fetched_at[name] = now
            if _canonical(spec) != _canonical(self.specs.get(name)):
                self.specs[name] = spec
                changed.add(name)
        self.refreshes += 1
        if changed or self.refreshes == 1:
            self.rebuild()
            if changed:
                log.info("openapi_merged", changed=sorted(changed), missing=sorted(self.missing))
            if self.on_change is not None:
                self.on_change(changed)

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in self.upstreams:
            if name not in self.specs:
                state = "missing"
            elif name in self.reachable:
                state = "ok"
            else:
                state = "stale"
            out[name] = {"status": state, "fetched_at": self.fetched_at.get(name)}
        return out

    def rebuild(self) -> None:
        specs: dict[str, Any] = {n: self.specs[n] for n in self.upstreams if n in self.specs}
        try:
            specs[GATEWAY_SERVICE] = self.own_spec()
        except Exception as exc:  # the gateway's own routes must not hide the rest
            log.warning("gateway_openapi_failed", error=repr(exc))
        started = time.perf_counter()
        self.document = merge_openapi(specs, public=self.public, status=self.status())
        self.document_bytes = json.dumps(self.document, ensure_ascii=False).encode()
        self.route_index = RouteIndex(self.document)
        log.debug("openapi_rebuilt", ms=round((time.perf_counter() - started) * 1000, 1))

    def route_label(self, service: str, path: str) -> str | None:
        return self.route_index.match(service, path)


def swagger_html(openapi_url: str = "/openapi.json") -> str:
    from fastapi.openapi.docs import get_swagger_ui_html

    response = get_swagger_ui_html(
        openapi_url=openapi_url,
        title="双减治理平台 API 文档",
        oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_ui_parameters={
            "persistAuthorization": True,
            "displayRequestDuration": True,
            "filter": True,
            "docExpansion": "none",
        },
    )
    return bytes(response.body).decode().replace("<html>", '<html lang="zh-CN">', 1)


def swagger_redirect_html() -> str:
    from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html

    return bytes(get_swagger_ui_oauth2_redirect_html().body).decode()


def redoc_html(openapi_url: str = "/openapi.json") -> str:
    from fastapi.openapi.docs import get_redoc_html

    response = get_redoc_html(openapi_url=openapi_url, title="双减治理平台 API 文档（ReDoc）")
    return bytes(response.body).decode().replace("<html>", '<html lang="zh-CN">', 1)
